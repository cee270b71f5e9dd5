"""Smooth scanner fields of the phantom: B1+ transmit, receive sensitivity, B0 and TE = 0 phase.

All patterns are functions of position in mm relative to the centre of the brain, so they look the
same at every resolution; ``seed`` perturbs them slightly (centre shift, gradients, coil positions)
so that two subjects do not share identical fields.

B0 is computed physically: the head (tissue about -9.05 ppm) in air (+0.36 ppm) produces a background
field by the continuous dipole kernel ``1/3 - (k.b)^2/k^2`` (:func:`band_limited_field`) with enough zero
padding (padding = air) that the FFT does not wrap; the neck continues below the grid (the bottom
slices are extended by :data:`NECK_EXTENSION_MM`, as a neck continues out of a head scan's field of
view); the brain's own susceptibility variations give the local field; a small linear term stands
for the residual of a first-order shim. The scanner's centre frequency is set on the brain: the mean
total field over the brain is 0.

Fair field (no inverse crime)
-----------------------------
An inversion that uses the kernel of the data's own grid would invert a field made with that same
kernel exactly. :func:`band_limited_field` therefore computes the field of the *fine* susceptibility
map (``factor`` times finer than the grid the field is wanted on, e.g. the oversampled phantom) and
keeps only the frequencies of the coarse grid (a k-space crop, centred on the coarse voxels), with
padding sizes unrelated to the data grid: the field is the band-limited field of the fine object,
not the discrete forward model of the coarse truth. The crop rings next to the air-tissue jumps of the
field (a few % of chi within about 2 mm, see ``tests/phantom/test_fair_field.py``), as a scanner's
finite k-space does; at ``factor`` 1 nothing is cropped.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from ..core.dipole import _rfft_kernel, _unit_vector
from .simulate import block_average, coarsen_affine
from .tissues import CHI_AIR_PPM, CHI_WATER_PPM

__all__ = [
    "transmit_field",
    "receive_sensitivity",
    "body_receive_sensitivity",
    "phase_offset",
    "b0_fields",
    "shim_residual",
    "TRANSMIT_RANGE",
    "RECEIVE_VARIATION",
    "BODY_RECEIVE_VARIATION",
    "FIELD_GRID_MM",
    "band_limited_field",
    "fine_grid_field",
    "NECK_EXTENSION_MM",
]

#: Target B1+ ratio at the brain centre and at ~80 mm from it (3 T head coil: centre-bright).
TRANSMIT_RANGE = (0.86, 1.22)
#: Largest relative deviation of the receive sensitivity from its brain mean.
RECEIVE_VARIATION = 0.30
#: Largest relative deviation of the body coil's receive sensitivity from its brain mean.
BODY_RECEIVE_VARIATION = 0.03
#: Finest grid (mm) on which the dipole model of B0 is computed (see ``truth.make_phantom``).
FIELD_GRID_MM = 1.0
#: How far (mm) the sources of the field continue below the grid: the neck leaves the field of view.
NECK_EXTENSION_MM = 80.0
#: Length (mm) that normalises positions in the polynomial/Gaussian patterns.
_HEAD_RADIUS_MM = 80.0


def _rng(seed, stream):
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _unit(vector):
    return vector / np.linalg.norm(vector)


def _normalised_axes(shape, affine, centre_mm):
    axes = [(affine[i, i] * np.arange(shape[i]) + affine[i, 3] - centre_mm[i]) / _HEAD_RADIUS_MM for i in range(3)]
    return np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)


def transmit_field(shape, affine, centre_mm, *, seed=0):
    """Smooth B1+ ratio (actual / nominal flip angle), brighter in the centre as at 3 T.

    A Gaussian bump (wider along z) from about 0.86 at 80 mm off-centre to 1.22 at the centre, with a
    seeded shift of its centre (sd 4 mm) and a weak linear gradient (4 % per 80 mm, seeded direction)
    mimicking the left-right asymmetry of a birdcage coil loaded by a head.

    Parameters
    ----------
    shape : tuple of 3 int
    affine : ndarray (4, 4)
        Axis-aligned voxel -> mm.
    centre_mm : sequence of 3 float
        Brain centre (mm).
    seed : int

    Returns
    -------
    ndarray of float32, shape ``shape``
    """
    rng = _rng(seed, 1)
    centre = np.asarray(centre_mm, float) + rng.normal(0, 4.0, 3)
    x, y, z = _normalised_axes(shape, affine, centre)
    width = np.array([0.62, 0.66, 0.85]) * (1 + rng.uniform(-0.05, 0.05))
    bump = np.exp(-0.5 * ((x / width[0]) ** 2 + (y / width[1]) ** 2 + (z / width[2]) ** 2))
    low, high = TRANSMIT_RANGE
    edge = np.exp(-0.5 / width[0] ** 2)  # bump value 80 mm off-centre along x
    amplitude = (high - low) / (1 - edge)
    gradient = 0.04 * _unit(rng.normal(size=3))
    b1 = high - amplitude * (1 - bump) + gradient[0] * x + gradient[1] * y + gradient[2] * z
    return np.clip(b1, 0.5, 1.5).astype(np.float32)


def receive_sensitivity(shape, affine, centre_mm, brain_mask, *, seed=0):
    """Smooth receive sensitivity of a multi-channel head coil (sum of squares of loop elements).

    Eight loop elements on a ring (radius 110 mm) around the head plus one above it; each element's
    sensitivity falls off like the on-axis field of a loop of radius 50 mm,
    ``(1 + (d / 50 mm)^2)^(-3/2)``. The root-sum-of-squares combination is brighter at the periphery;
    it is scaled to mean 1 over ``brain_mask`` and its deviations to at most 30 % there.

    Parameters
    ----------
    shape, affine, centre_mm
        See :func:`transmit_field`.
    brain_mask : ndarray of bool
    seed : int

    Returns
    -------
    ndarray of float32
    """
    rng = _rng(seed, 2)
    x, y, z = _normalised_axes(shape, affine, centre_mm)
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False) + rng.uniform(0, np.pi / 4)
    ring = 110.0 / _HEAD_RADIUS_MM
    elements = [(ring * np.cos(a), ring * np.sin(a), 0.15 + rng.normal(0, 0.05)) for a in angles]
    elements.append((0.0, 0.05, 1.35))
    loop = 50.0 / _HEAD_RADIUS_MM
    power = np.zeros(shape, dtype=np.float32)
    for ex, ey, ez in elements:
        falloff = 1 + ((x - ex) ** 2 + (y - ey) ** 2 + (z - ez) ** 2) / np.float32(loop**2)
        np.reciprocal(falloff, out=falloff)
        weight = np.float32(rng.uniform(0.8, 1.2))
        power += weight**2 * falloff * falloff * falloff
    receive = _scaled_on_brain(np.sqrt(power), brain_mask, RECEIVE_VARIATION)
    return np.clip(receive, 0.2, None).astype(np.float32)


def _scaled_on_brain(pattern, brain_mask, variation):
    """``1 + variation * (pattern - mean) / largest deviation``, mean and deviation over the brain."""
    inside = pattern[brain_mask]
    mean = inside.mean()
    deviation = np.abs(inside - mean).max()
    del inside
    return 1 + variation * (pattern - mean) / deviation


def body_receive_sensitivity(shape, affine, centre_mm, brain_mask, *, seed=0):
    """Receive sensitivity of the body coil: nearly, but not exactly, uniform over the head.

    The body coil is the reference of the RB1COR pair (head-coil image / body-coil image = relative
    head-coil sensitivity) because it is large and far from the head; at 3 T it is still not flat:
    the RF wavelength in tissue (~12 cm) makes it slightly centre-bright, and the loaded coil is not
    symmetric. Modelled as a broad centre-bright quadratic bowl (weaker along z) plus a linear
    gradient of half its size in a seeded direction, scaled to mean 1 over ``brain_mask`` and a
    largest deviation of :data:`BODY_RECEIVE_VARIATION` (3 %) there. An estimate of the head-coil
    sensitivity from the RB1COR ratio is therefore biased by up to about 3 %, as on a scanner.

    Parameters and returns as :func:`receive_sensitivity`.
    """
    rng = _rng(seed, 5)
    x, y, z = _normalised_axes(shape, affine, centre_mm)
    gradient = 0.5 * _unit(rng.normal(size=3))
    pattern = (
        -(x * x + y * y)
        - np.float32(0.5) * z * z
        + np.float32(gradient[0]) * x
        + np.float32(gradient[1]) * y
        + np.float32(gradient[2]) * z
    )
    pattern = np.broadcast_to(pattern, shape)
    return _scaled_on_brain(pattern, brain_mask, BODY_RECEIVE_VARIATION).astype(np.float32)


def shim_residual(shape, affine, centre_mm, *, seed=0):
    """Linear residual (ppm) of a first-order shim: about 0.05 ppm per 80 mm, seeded direction.

    Zero at ``centre_mm``; broadcastable to ``shape`` (float32).
    """
    rng = _rng(seed, 4)
    slope = 0.05 * _unit(rng.normal(size=3))
    x, y, z = _normalised_axes(shape, affine, centre_mm)
    return (slope[0] * x + slope[1] * y + slope[2] * z).astype(np.float32)


def phase_offset(shape, affine, centre_mm, *, seed=0):
    """Smooth TE = 0 phase (rad): a constant, linear and quadratic terms with seeded coefficients.

    Spans a few radians over the head (it wraps), as the transceive phase of a receive array does.

    Returns
    -------
    ndarray of float32
    """
    rng = _rng(seed, 3)
    x, y, z = _normalised_axes(shape, affine, centre_mm)
    constant = rng.uniform(-np.pi, np.pi)
    linear = rng.normal(0, 0.8, 3)
    quadratic = rng.normal(0, 0.5, 3)
    cross = rng.normal(0, 0.3)
    phase = (
        constant
        + linear[0] * x
        + linear[1] * y
        + linear[2] * z
        + quadratic[0] * x * x
        + quadratic[1] * y * y
        + quadratic[2] * z * z
        + cross * x * y
    )
    return np.broadcast_to(phase, shape).astype(np.float32)


def b0_fields(
    chi,
    tissue_fraction,
    brain_mask,
    voxel_size,
    centre_mm,
    affine,
    *,
    b0_direction=(0, 0, 1),
    seed=0,
    factor=1,
    polyphase=1,
):
    """Total, background and local field (ppm of B0) of the head in air.

    Parameters
    ----------
    chi : ndarray
        Susceptibility (ppm) relative to water/CSF, 0 in air.
    tissue_fraction : ndarray
        Volume fraction of tissue (1 - air) per voxel.
    brain_mask : ndarray of bool
        Sources inside it make the *local* field; everything else (the head's bulk in air, skull,
        scalp, and the brain's water-level susceptibility) the *background* field.
    voxel_size : float
    centre_mm : sequence of 3 float
        Brain centre; the linear shim residual is zero there.
    affine : ndarray (4, 4)
    b0_direction : sequence of 3 float
        Main-field direction in voxel axes.
    seed : int
    factor : int, optional
        The fields are wanted on the grid ``factor`` times coarser (block centres): computed from
        the fine maps and cropped in k-space (:func:`band_limited_field`).
    polyphase : int, optional
        With ``factor`` 1: run the transforms on a grid ``polyphase`` times coarser and assemble
        the field at every voxel of the maps' own grid (:func:`fine_grid_field`; half the memory
        of one transform on the maps' grid).

    Returns
    -------
    total, background, local : ndarray of float32
        On the coarse grid when ``factor > 1``. ``total = local + background + shim residual``;
        the constant (centre frequency) is part of ``background`` and chosen so that the mean of
        ``total`` over the brain is 0.
    """
    sources = np.empty(chi.shape + (2,), dtype=np.float32)
    sources[..., 0] = chi + np.float32(CHI_WATER_PPM - CHI_AIR_PPM) * tissue_fraction
    sources[..., 1] = np.where(brain_mask, chi, 0)
    factor, polyphase = int(factor), int(polyphase)
    if factor > 1 and polyphase > 1:
        raise ValueError("b0_fields: give factor or polyphase, not both")
    # the neck in voxels of the grid the transforms run on
    neck = int(round(NECK_EXTENSION_MM / (voxel_size * factor * polyphase)))
    if polyphase > 1:
        fields = fine_grid_field(sources, voxel_size, polyphase, b0_direction=b0_direction, extend_low=(0, 0, neck))
    else:
        fields = band_limited_field(sources, voxel_size, factor, b0_direction=b0_direction, extend_low=(0, 0, neck))
    del sources
    if factor > 1:
        # the results live on the coarse grid: mask, shim and centre frequency there
        brain_mask = block_average(brain_mask, factor) >= 0.5
        affine = coarsen_affine(affine, factor)
    total, local = fields[..., 0], np.ascontiguousarray(fields[..., 1])
    background = total - local
    del fields, total
    shim = np.broadcast_to(shim_residual(local.shape, affine, centre_mm, seed=seed), local.shape)
    background -= np.float32((local + background + shim)[brain_mask].mean())
    total = local + background + shim
    return total.astype(np.float32), background.astype(np.float32), local.astype(np.float32)


def _polyphase_grid(shape, factor, b0_direction, pad, extend_low):
    """Factor, unit B0, fine / coarse / extended shapes, padding and padded coarse FFT shape."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    direction = _unit_vector(b0_direction)
    fine = tuple(shape[:3])
    coarse = tuple(-(-n // factor) for n in fine)
    extend = tuple(int(e) for e in extend_low)
    extended = tuple(n + e for n, e in zip(coarse, extend))
    pad = [n // 2 for n in extended] if pad is None else [int(p) for p in pad]
    padded = tuple(scipy.fft.next_fast_len(n + 2 * p, real=True) for n, p in zip(extended, pad))
    return factor, direction, fine, coarse, extend, extended, pad, padded


def band_limited_field(
    maps, voxel_size, factor=1, *, b0_direction=(0, 0, 1), pad=None, extend_low=(0, 0, 0), workers=-1
):
    """Field (ppm) of fine susceptibility maps, brought to a ``factor`` times coarser grid in k-space.

    The fine grid is split into its ``factor**3`` polyphase components (fine voxels ``factor * m + s``);
    the sum of their coarse spectra, each shifted by its sub-voxel offset, is exactly the fine grid's
    spectrum at the coarse grid's frequencies, so the result is the field of the fine map, computed
    with the continuous kernel ``1/3 - (k.b)^2/|k|^2`` and cropped to the coarse band (Nyquist planes
    dropped), sampled at the centres of the ``factor**3`` blocks (the grid of
    :func:`~.simulate.coarsen_affine`). Memory is that of the padded coarse grid.

    Parameters
    ----------
    maps : ndarray, shape (X, Y, Z) or (X, Y, Z, N)
        Susceptibility (ppm) relative to the medium outside the grid, on the fine grid; edge-padded
        to a multiple of ``factor``.
    voxel_size : float
        Fine voxel size (mm), isotropic.
    factor : int, optional
        Coarsening factor (1: the field on the grid of ``maps``).
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel axes.
    pad : None or sequence of 3 int, optional
        Zero (medium) voxels of the coarse grid added on each side; ``None``: half the coarse length
        (after the extension) on each side.
    extend_low : sequence of 3 int, optional
        Coarse voxels by which the maps continue before index 0 of each axis (the first slice
        repeated): sources that leave the field of view, e.g. the neck.
    workers : int, optional
        Threads of :mod:`scipy.fft`.

    Returns
    -------
    ndarray of float32, shape ``ceil(shape / factor)`` (with N last if given)
    """
    maps = np.asarray(maps, dtype=np.float32)
    stacked = maps if maps.ndim == 4 else maps[..., np.newaxis]
    factor, direction, fine, coarse, extend, extended, pad, padded = _polyphase_grid(
        stacked.shape, factor, b0_direction, pad, extend_low
    )
    coarse_voxel = float(voxel_size) * factor
    kernel = _rfft_kernel(padded, np.full(3, coarse_voxel), direction, np.float32)
    frequencies = [
        np.fft.fftfreq(padded[0], d=coarse_voxel),
        np.fft.fftfreq(padded[1], d=coarse_voxel),
        np.fft.rfftfreq(padded[2], d=coarse_voxel),
    ]
    # Nyquist planes have no symmetric partner after the sub-voxel shifts: crop them (factor > 1
    # only; at factor 1 they are kept, dropping them would leave a checkerboard in the field).
    for axis, n in enumerate(padded):
        if factor > 1 and n % 2 == 0:
            index = [slice(None)] * 3
            index[axis] = n // 2
            kernel[tuple(index)] = 0
    region = tuple(slice(p + e, p + e + n) for p, e, n in zip(pad, extend, coarse))
    source_region = tuple(slice(p, p + n) for p, n in zip(pad, extended))
    centre = (factor - 1) / 2.0
    out = np.empty(coarse + (stacked.shape[3],), dtype=np.float32)
    for index in range(stacked.shape[3]):
        spectrum = None
        for offsets in np.ndindex(factor, factor, factor):
            component = stacked[offsets[0] :: factor, offsets[1] :: factor, offsets[2] :: factor, index]
            missing = [(0, n - m) for n, m in zip(coarse, component.shape)]
            if any(m for _, m in missing) or any(extend):
                component = np.pad(component, [(e, m) for e, (_, m) in zip(extend, missing)], mode="edge")
            grid = np.zeros(padded, dtype=np.float32)
            grid[source_region] = component
            part = scipy.fft.rfftn(grid, workers=workers, overwrite_x=True)
            del grid
            if factor > 1:
                shifts = [
                    np.exp(-2j * np.pi * f * (s - centre) * float(voxel_size)).astype(np.complex64)
                    for f, s in zip(frequencies, offsets)
                ]
                part *= shifts[0][:, None, None]
                part *= shifts[1][None, :, None]
                part *= shifts[2][None, None, :]
            if spectrum is None:
                spectrum = part
            else:
                spectrum += part
            del part
        spectrum *= kernel / np.float32(factor**3)
        out[..., index] = scipy.fft.irfftn(spectrum, s=padded, workers=workers, overwrite_x=True)[region]
        del spectrum
    return out if maps.ndim == 4 else out[..., 0]


def _signed_kernel(frequencies, nyquist, direction):
    """Continuous dipole kernel on a (sparse) grid of signed frequencies; 0 at k = 0.

    At a Nyquist frequency (``nyquist`` true), +k and -k are the same sample, so the kernel is
    averaged over both signs of that component: the cross terms of ``(k.b)^2`` that hold it drop.
    The fine spectrum then stays Hermitian, as the field of a real map must be.
    """
    grids = np.meshgrid(*[np.asarray(f, dtype=np.float32) for f in frequencies], indexing="ij", sparse=True)
    flags = np.meshgrid(*[np.asarray(n, dtype=bool) for n in nyquist], indexing="ij", sparse=True)
    k_squared = sum(k * k for k in grids)
    projection = sum(np.where(flag, np.float32(0.0), k) * np.float32(b) for k, flag, b in zip(grids, flags, direction))
    projection = projection * projection
    for k, flag, b in zip(grids, flags, direction):
        projection = projection + np.where(flag, k * k * np.float32(b * b), np.float32(0.0))
    kernel = np.float32(1.0 / 3.0) - projection / np.where(k_squared > 0, k_squared, np.float32(1.0))
    return np.where(k_squared > 0, kernel, np.float32(0.0)).astype(np.float32, copy=False)


def fine_grid_field(maps, voxel_size, factor, *, b0_direction=(0, 0, 1), pad=None, extend_low=(0, 0, 0), workers=-1):
    """Field (ppm) of fine susceptibility maps at every fine voxel, through coarse-grid FFTs.

    The result is the field of :func:`band_limited_field` at ``factor`` 1 (every frequency of the
    fine grid, continuous kernel), but the fine grid's transform is assembled from the
    ``factor**3`` polyphase components' coarse transforms: the fine spectrum at frequency
    ``p + j N`` is a length-``factor`` DFT over the components (per axis) of their spectra at ``p``,
    each shifted by its sub-voxel offset, and the field at the fine voxels of offset ``s`` comes
    back the same way. It needs the memory of ``factor**3`` padded coarse half-spectra (about half
    that of one fine FFT with its input), and nothing of the data grid's discrete model.

    Unlike the k-space crop of :func:`band_limited_field`, the field keeps the jumps that strong
    boundaries (air, bone) put into it without ringing: a crop to a 1 mm band rings with a 2 mm
    period that a 1 mm voxel does not average away, and its non-harmonic ripple reaches deep into
    the brain.

    Parameters
    ----------
    maps : ndarray, shape (X, Y, Z) or (X, Y, Z, N)
        Susceptibility (ppm) relative to the medium outside the grid, on the fine grid.
    voxel_size : float
        Fine voxel size (mm), isotropic.
    factor : int
        Polyphase factor: the transforms run on the grid ``factor`` times coarser.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel axes.
    pad : None or sequence of 3 int, optional
        Zero (medium) voxels of the coarse grid added on each side; ``None``: half the coarse
        length (after the extension) on each side, as :func:`band_limited_field`.
    extend_low : sequence of 3 int, optional
        Coarse voxels by which the maps continue before index 0 of each axis (the first fine
        slice repeated); beyond the last fine voxel the maps are edge-padded to a multiple of
        ``factor``.
    workers : int, optional
        Threads of :mod:`scipy.fft`.

    Returns
    -------
    ndarray of float32, shape of ``maps``
    """
    maps = np.asarray(maps, dtype=np.float32)
    stacked = maps if maps.ndim == 4 else maps[..., np.newaxis]
    factor, direction, fine, coarse, extend, extended, pad, padded = _polyphase_grid(
        stacked.shape, factor, b0_direction, pad, extend_low
    )
    half = padded[:2] + (padded[2] // 2 + 1,)
    fine_length = [factor * n for n in padded]
    # integer frequency index p of the coarse transforms (unsigned: the derivation's DFT index)
    index = [np.arange(padded[0]), np.arange(padded[1]), np.arange(half[2])]
    source_region = tuple(slice(p, p + n) for p, n in zip(pad, extended))
    offsets = list(np.ndindex(factor, factor, factor))
    out = np.empty(fine + (stacked.shape[3],), dtype=np.float32)
    spectra = np.empty((factor, factor, factor) + half, dtype=np.complex64)
    region = tuple(slice(p + e, p + e + n) for p, e, n in zip(pad, extend, coarse))

    def shift(offset, sign):
        """exp(sign 2 pi i p.s / (factor N)) as three broadcastable factors."""
        return [
            np.exp(sign * 2j * np.pi * i * s / length).astype(np.complex64)
            for i, s, length in zip(index, offset, fine_length)
        ]

    for map_index in range(stacked.shape[3]):
        for offset in offsets:
            # The fine map edge-padded to a multiple of factor and continued below index 0 by its
            # first fine slice, sampled at this offset.
            picks = [
                np.clip(np.arange(n) * factor + s - factor * e, 0, length - 1)
                for n, s, e, length in zip(extended, offset, extend, fine)
            ]
            grid = np.zeros(padded, dtype=np.float32)
            grid[source_region] = stacked[np.ix_(*picks, [map_index])][..., 0]
            part = scipy.fft.rfftn(grid, workers=workers, overwrite_x=True)
            del grid
            if factor > 1:
                x, y, z = shift(offset, -1)
                part *= x[:, None, None]
                part *= y[None, :, None]
                part *= z[None, None, :]
            spectra[offset] = part
            del part
        # Slab by slab along the first axis: DFT over the offsets (the fine spectrum at p + j N),
        # the kernel at those fine frequencies, and the inverse DFT (the field's components).
        slab = max(1, int(2**22 // max(1, factor**3 * half[1] * half[2])))
        for start in range(0, half[0], slab):
            stop = min(half[0], start + slab)
            block = spectra[:, :, :, start:stop]
            if factor > 1:
                block = scipy.fft.fftn(block, axes=(0, 1, 2), workers=workers)
            for alias in offsets:
                frequencies, nyquist = [], []
                for axis, (lo, hi) in enumerate(((start, stop), (0, half[1]), (0, half[2]))):
                    q = index[axis][lo:hi] + alias[axis] * padded[axis]
                    length = fine_length[axis]
                    signed = np.where(2 * q < length, q, q - length)
                    frequencies.append(signed / (length * float(voxel_size)))
                    nyquist.append(2 * q == length)
                block[alias] *= _signed_kernel(frequencies, nyquist, direction)
            if factor > 1:
                block = scipy.fft.ifftn(block, axes=(0, 1, 2), workers=workers, overwrite_x=True)
            spectra[:, :, :, start:stop] = block
            del block
        for offset in offsets:
            part = spectra[offset]
            if factor > 1:
                x, y, z = shift(offset, 1)
                part *= x[:, None, None]
                part *= y[None, :, None]
                part *= z[None, None, :]
            field = scipy.fft.irfftn(part, s=padded, workers=workers)
            values = field[region]
            target = out[offset[0] :: factor, offset[1] :: factor, offset[2] :: factor, map_index]
            target[...] = values[: target.shape[0], : target.shape[1], : target.shape[2]]
            del field
    del spectra
    return out if maps.ndim == 4 else out[..., 0]
