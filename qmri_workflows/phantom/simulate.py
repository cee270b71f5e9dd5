"""Protocol simulator: raw images of every sequence from the phantom's ground-truth maps.

Signal model
------------
Every voxel is simulated from its own truth with the signal equations of
:mod:`qmri_workflows.core.signal`, except the bSSFP, which has its own steady-state simulator
(:mod:`qmri_workflows.phantom.bssfp_steady_state`: exact Bloch propagation of one TR with finite
rectangular RF pulses, apart from the closed form the R2 fit inverts):

* actual flip angle = ``b1 * nominal``;
* equilibrium magnetisation ``M0 = pd / 100 * receive * SIGNAL_SCALE`` (for the body coil of the
  RB1COR pair ``receive`` is the body coil's own, nearly uniform ``truth.body_receive``);
* frequency offset ``f = b0_ppm * 1e-6 * GYROMAGNETIC_RATIO * field_strength`` (Hz); gradient-echo
  phase ``phase_offset + 2 pi f TE``, wrapped to (-pi, pi]; bSSFP: the frequency ``f`` acts during
  free precession and during the RF pulse (plus the same transceive phase);
* the spoiled sequences (SPGR, AFI, RB1COR) spoil as a scanner does (``Protocol.spoiling = "epg"``,
  the default): the TE = 0 signal is the ideal-spoiling one (Ernst; Yarnykh 2007 for AFI) times the
  ratio of the extended-phase-graph steady state of the actual protocol (quadratic RF phase
  schedule, spoiler moment, diffusion; :mod:`qmri_workflows.phantom.epg`) to it, at the voxel's own
  T1, T2 and actual flip angle. The ratio is tabulated once per protocol over (T1, T2, B1+) and
  interpolated per voxel (:func:`spoiling_ratio_map`). The receiver follows the RF phase of the
  current pulse, so the echo is demodulated; its magnitude then decays with R2* to the echo time and
  its phase is the transceive and off-resonance phase, as with ideal spoiling. Diffusion: tissue
  :data:`TISSUE_DIFFUSION`, free water (CSF) :data:`FREE_WATER_DIFFUSION`, log-linear in T2 between
  :data:`DIFFUSION_T2_RANGE` (the phantom has no diffusion map; long T2 means free water).
  ``Protocol.spoiling = "ideal"`` keeps the ideal-spoiling equations.

Noise and coils
---------------
Complex Gaussian noise of standard deviation ``sigma`` is added to the real and to the imaginary part
of every receive channel, independently per voxel. ``sigma`` is fixed for the whole dataset, like a
receiver with fixed gain: it is the median noiseless white-matter magnitude of the first echo of the
lowest-flip-angle VFA image of the first subject, divided by ``snr`` (:func:`reference_sigma`).
``snr=inf`` gives noiseless data. With ``PhantomScanner.noise_gfactor`` (a map on the main grid,
:func:`gfactor_map`) the noise SD of the main-grid images is ``sigma x g`` voxel by voxel, as with
parallel imaging; RB1COR images keep the uniform ``sigma``.

With one channel the magnitude is Rician. With ``n_coils > 1`` the channels are
:class:`ReceiveCoils` whose root-sum-of-squares equals ``truth.receive`` exactly; the magnitude is
the root-sum-of-squares of the noisy channels (non-central chi with ``2 n_coils`` degrees of freedom,
``E[M^2] = A^2 + 2 n_coils sigma^2``) and the phase that of the sensitivity-weighted (Roemer-type)
combination with the known sensitivities, so that the noiseless combined image equals the
single-channel model times ``receive`` and the truth stays exact.

Oversampling
------------
With ``oversample = K > 1`` the phantom is built on a grid ``K`` times finer; every channel's
complex image is reduced to the target grid by averaging it over each voxel's footprint by default
(``kspace_filter="box"``: partial volume and intravoxel dephasing of the complex signal, no ringing),
or by cropping the centred k-space with or without a Tukey filter (the scanner's finite sampling,
with its ringing; see :func:`kspace_downsample`), and the noise is added on the target grid.
The target grid is the fine grid coarsened by ``K`` (voxel centres at
the centres of the ``K^3`` blocks; the fine grid is edge-padded to a multiple of ``K``), so it may be
one voxel larger than the grid of ``make_phantom(resolution=K * fine)``. The truth maps written for
it are block averages of the fine truth (segmentation: majority label; masks: at least half the
block) and are then only approximate: e.g. the R2* of a voxel with a field gradient across it is
larger than the average of its sub-voxels' R2*.

Interior masks (:meth:`PhantomScanner.interior_masks`) mark, per label, the target voxels whose
whole fine footprint has that label without partial volume: there the block-averaged truth is what
a fit should find; the rest of each region shows the effect of partial volume and dephasing.

Memory and time: volumes are simulated one at a time, each in slabs along the third axis of the fine
grid (:data:`SLAB_VOXELS` fine voxels, complex128), reduced in-plane slab by slab and along the third
axis at the end (exact: the box average and the k-space crop are separable). The fine truth
dominates: about 60 bytes per
fine voxel, i.e. 0.5 GB at 1 mm and 4 GB for 1 mm at ``oversample=2`` (69 million fine voxels).
What the echoes of an SPGR flip angle share, its TE = 0 amplitude (:func:`spgr_amplitude`: steady
state, spoiling ratio, MT), is computed once and kept on the fine grid while its echoes are simulated
(8 bytes per fine voxel); each echo then only decays it with R2* and adds its off-resonance phase.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.fft

from qmri_workflows.core.signal import afi_signals, spgr_signal
from qmri_workflows.phantom.bssfp_steady_state import bssfp_steady_state
from qmri_workflows.phantom.epg import RatioTable, afi_ratio_table, dephasing_from_gradient_moment, spgr_ratio_table

__all__ = [
    "DIFFUSION_T2_RANGE",
    "FREE_WATER_DIFFUSION",
    "GYROMAGNETIC_RATIO",
    "SIGNAL_SCALE",
    "TISSUE_DIFFUSION",
    "PhantomScanner",
    "ReceiveCoils",
    "VolumeSpec",
    "block_average",
    "block_majority",
    "coarsen_affine",
    "kspace_downsample",
    "list_volumes",
    "mt_signal_factor",
    "noiseless_signal",
    "spgr_amplitude",
    "reference_sigma",
    "gfactor_map",
    "spoiling_ratio_map",
    "tfl_flip_angle_map",
    "white_matter_labels",
    "PURE_FRACTION",
    "MIN_ERODED_VOXELS",
    "KSPACE_FILTERS",
    "TUKEY_FLAT_FRACTION",
    "SLAB_VOXELS",
]

GYROMAGNETIC_RATIO = 42.577478e6
"""Proton gyromagnetic ratio over 2 pi (Hz/T), CODATA 2018."""

SIGNAL_SCALE = 1000.0
"""Signal of pure water (PD 100 %) at unit receive sensitivity, full relaxation and 90 degrees."""

TISSUE_DIFFUSION = 1.0e-3
"""Apparent diffusion coefficient of brain tissue (mm^2/s; 1e-9 m^2/s) in the spoiling simulation."""

FREE_WATER_DIFFUSION = 3.0e-3
"""Diffusion coefficient of CSF (free water at 37 degC, mm^2/s) in the spoiling simulation."""

DIFFUSION_T2_RANGE = (0.3, 1.2)
"""T2 (s) up to which a voxel diffuses as tissue and from which as free water (log-linear between)."""


# --------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------
def _check_factor(factor):
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"the coarsening factor must be a positive integer, got {factor!r}")
    return int(factor)


def coarsen_affine(affine, factor):
    """Affine of the grid coarsened by ``factor``: voxel centres at the centres of the blocks.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Affine of the fine grid.
    factor : int
        Integer coarsening factor.

    Returns
    -------
    numpy.ndarray, shape (4, 4)
    """
    factor = _check_factor(factor)
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    coarse = affine.copy()
    coarse[:3, :3] = affine[:3, :3] * factor
    coarse[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, (factor - 1) / 2.0)
    return coarse


def coarse_shape(shape, factor):
    """Shape of the grid coarsened by ``factor`` (the fine grid padded to a multiple)."""
    factor = _check_factor(factor)
    return tuple(int(math.ceil(n / factor)) for n in shape[:3])


def _blocks(array, factor):
    """View of a 3-D array padded to a multiple of ``factor`` as (n0, f, n1, f, n2, f)."""
    array = _pad_axes(np.asarray(array), factor, (0, 1, 2))
    n0, n1, n2 = (n // factor for n in array.shape[:3])
    return array.reshape(n0, factor, n1, factor, n2, factor)


def block_average(array, factor):
    """Average of ``factor**3`` blocks of a 3-D array (edge-padded to a multiple of ``factor``).

    Parameters
    ----------
    array : array_like, shape (X, Y, Z)
    factor : int

    Returns
    -------
    numpy.ndarray, shape ``coarse_shape((X, Y, Z), factor)``, float64
    """
    factor = _check_factor(factor)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"block_average needs a 3-D array, got shape {array.shape}")
    if factor == 1:
        return array.astype(float)
    return _blocks(array.astype(float, copy=False), factor).mean(axis=(1, 3, 5))


def block_majority(labels, factor):
    """Most frequent label in each ``factor**3`` block (ties go to the smaller label).

    Parameters
    ----------
    labels : array_like of int, shape (X, Y, Z)
    factor : int

    Returns
    -------
    numpy.ndarray, coarse shape, same dtype as ``labels``
    """
    factor = _check_factor(factor)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"block_majority needs a 3-D array, got shape {labels.shape}")
    if factor == 1:
        return labels.copy()
    blocks = _blocks(labels, factor)
    best_label = np.zeros(blocks.shape[::2], dtype=labels.dtype)
    best_count = np.full(blocks.shape[::2], -1, dtype=np.int32)
    for value in np.unique(labels):
        count = (blocks == value).sum(axis=(1, 3, 5), dtype=np.int32)
        better = count > best_count
        best_label[better] = value
        best_count[better] = count[better]
    return best_label


def _pad_axes(array, factor, axes):
    """Edge-pad ``array`` along ``axes`` to a multiple of ``factor``."""
    pad = [(0, (-array.shape[axis]) % factor if axis in axes else 0) for axis in range(array.ndim)]
    if not any(p[1] for p in pad):
        return array
    return np.pad(array, pad, mode="edge")


KSPACE_FILTERS = ("box", "tukey", "none")
"""How :func:`kspace_downsample` forms a voxel: ``"box"`` (default), ``"tukey"`` or ``"none"``."""

#: Fraction of the kept k-space (from the centre outwards) that the Tukey filter leaves untouched.
TUKEY_FLAT_FRACTION = 0.5


def _kspace_window(frequencies, n_coarse, kspace_filter):
    """1-D filter over the kept frequencies: 1 in the centre, a cosine taper to the edge."""
    if kspace_filter == "none":
        return np.ones(frequencies.size)
    radius = np.abs(frequencies) / (n_coarse / 2.0)  # 1 at the edge of the kept k-space
    taper = (radius - TUKEY_FLAT_FRACTION) / (1.0 - TUKEY_FLAT_FRACTION)
    return np.where(radius <= TUKEY_FLAT_FRACTION, 1.0, 0.5 * (1.0 + np.cos(np.pi * np.clip(taper, 0, 1))))


def _check_filter(kspace_filter):
    if kspace_filter not in KSPACE_FILTERS:
        raise ValueError(f"kspace_filter must be one of {KSPACE_FILTERS}, got {kspace_filter!r}")
    return kspace_filter


def _crop_kspace(image, factor, axes, workers, kspace_filter="box"):
    """Keep the lowest ``n // factor`` spatial frequencies along each of ``axes`` (see
    :func:`kspace_downsample`); the axes must already be multiples of ``factor``."""
    if kspace_filter == "box":
        return _box_average(image, factor, axes)
    shift = (factor - 1) / 2.0
    result = image
    for axis in axes:
        n_fine = result.shape[axis]
        n_coarse = n_fine // factor
        spectrum = scipy.fft.fft(result, axis=axis, workers=workers)
        del result
        keep = np.r_[0 : (n_coarse + 1) // 2, n_fine - n_coarse // 2 : n_fine]
        frequencies = np.fft.fftfreq(n_fine, d=1.0 / n_fine)[keep]
        spectrum = np.take(spectrum, keep, axis=axis)
        ramp_shape = [1] * spectrum.ndim
        ramp_shape[axis] = keep.size
        ramp = np.exp(2j * np.pi * frequencies * shift / n_fine) * _kspace_window(frequencies, n_coarse, kspace_filter)
        spectrum *= ramp.reshape(ramp_shape)
        result = scipy.fft.ifft(spectrum, axis=axis, workers=workers, overwrite_x=True)
        del spectrum
        result *= n_coarse / n_fine
    return result


def _box_average(image, factor, axes):
    """Mean over blocks of ``factor`` samples along each of ``axes`` (multiples of ``factor``)."""
    result = image
    for axis in axes:
        shape = list(result.shape)
        shape[axis : axis + 1] = [shape[axis] // factor, factor]
        result = result.reshape(shape).mean(axis=axis + 1)
    return result


def kspace_downsample(image, factor, *, workers=-1, kspace_filter="box"):
    """Reduce a complex 3-D image to the coarser grid by cropping its centred k-space.

    The fine image is edge-padded to a multiple of ``factor``; along each axis the lowest
    ``n // factor`` spatial frequencies are kept (the scanner samples only those), weighted by the
    reconstruction filter, and a linear phase shifts the samples to the block centres of
    :func:`coarsen_affine`. The result is scaled so that a constant image keeps its value. Crop and
    filter are separable: :class:`PhantomScanner` applies them to the two in-plane axes slab by slab
    and to the third axis at the end, with the same result.

    Voxel shape: ``"box"`` (default) averages the complex signal over each voxel's footprint, the
    ideal rectangular voxel: partial volume and intravoxel dephasing, no ringing (its spectrum is
    the sinc of the voxel, so the sum is not band-limited; an interior voxel holds its own tissue
    only, which makes region interiors a fair ground truth). The two others crop k-space.
    ``"tukey"`` leaves the inner half of the kept k-space (:data:`TUKEY_FLAT_FRACTION`)
    untouched and tapers the outer half with a half cosine to 0 at its edge, per axis, like the
    k-space ("raw") filters of scanner reconstructions. Without it (``"none"``) the Gibbs ringing of
    every edge of the head reaches deep into the brain, and because the ringing carries the
    off-resonance of its source it changes from echo to echo: at 2 mm it moves R2* in deep white
    matter by +-4 % (median; 5-95 % range +-10 %), against 0.1 % with the filter.

    Parameters
    ----------
    image : array_like, shape (X, Y, Z), real or complex
    factor : int
    workers : int, optional
        Threads for :mod:`scipy.fft`.
    kspace_filter : {"box", "tukey", "none"}, optional
        Voxel shape / reconstruction filter (ignored when ``factor`` is 1).

    Returns
    -------
    numpy.ndarray of complex128, shape ``coarse_shape((X, Y, Z), factor)``
    """
    factor = _check_factor(factor)
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"kspace_downsample needs a 3-D image, got shape {image.shape}")
    _check_filter(kspace_filter)
    result = image.astype(np.complex128, copy=factor == 1)
    if factor == 1:
        return result
    return _crop_kspace(_pad_axes(result, factor, (0, 1, 2)), factor, (0, 1, 2), workers, kspace_filter)


# --------------------------------------------------------------------------------------------------
# receive coils
# --------------------------------------------------------------------------------------------------
def _world_coordinates(affine, shape):
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return [affine[axis, 0] * i + affine[axis, 1] * j + affine[axis, 2] * k + affine[axis, 3] for axis in range(3)]


class ReceiveCoils:
    """Receive channels of a head-array coil, normalised to a given combined sensitivity.

    Channel ``k`` has the complex sensitivity ``receive * w_k exp(i phi_k)`` with
    ``sum_k w_k**2 = 1`` everywhere, so the root-sum-of-squares of the sensitivities is exactly
    ``receive``. The magnitude profiles ``w_k`` fall off with the distance from loop elements spread
    over a sphere around the head (a Fibonacci lattice on the upper 80 % of the sphere); the phases
    ``phi_k`` vary linearly in space (about one cycle over the head) with a channel-specific offset.

    Parameters
    ----------
    n_coils : int
        Number of channels (>= 1; one channel has ``w = 1`` and ``phi = 0``).
    centre : array_like, shape (3,)
        Head centre (mm, world coordinates).
    radius : float
        Radius (mm) of the sphere that carries the elements.
    """

    cache_bytes = 2 * 1024**3
    """Upper bound of the memory used to cache channel weights (bytes)."""

    def __init__(self, n_coils, *, centre, radius):
        if isinstance(n_coils, bool) or not isinstance(n_coils, (int, np.integer)) or n_coils < 1:
            raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")
        if not radius > 0:
            raise ValueError(f"radius must be > 0 mm, got {radius!r}")
        self.n_coils = int(n_coils)
        self.centre = np.asarray(centre, dtype=float).reshape(3)
        self.radius = float(radius)
        index = np.arange(self.n_coils) + 0.5
        height = 1.0 - 1.6 * index / self.n_coils  # z from 1 down to -0.6: no elements under the chin
        azimuth = np.pi * (1.0 + 5.0**0.5) * index
        ring = np.sqrt(1.0 - height**2)
        self.directions = np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), height], axis=1)
        self.phase_offsets = 2.0 * np.pi * np.arange(self.n_coils) / self.n_coils
        self._norm_cache = {}
        self._weight_cache = {}

    @classmethod
    def around(cls, n_coils, affine, shape):
        """Coils centred on the field of view of the grid ``(affine, shape)``."""
        affine = np.asarray(affine, dtype=float)
        corners = np.array([[0, 0, 0], np.asarray(shape[:3], dtype=float) - 1.0])
        world = corners @ affine[:3, :3].T + affine[:3, 3]
        centre = world.mean(axis=0)
        radius = 0.5 * float(np.min(np.abs(world[1] - world[0])))
        return cls(n_coils, centre=centre, radius=max(radius, 1.0))

    def _profile(self, coil, coordinates):
        element = self.centre + self.radius * self.directions[coil]
        distance_sq = sum((c - e) ** 2 for c, e in zip(coordinates, element))
        # a loop element's sensitivity falls off like (1 + d^2/a^2)^(-3/2) (Biot-Savart on its axis)
        return (1.0 + distance_sq / (0.5 * self.radius) ** 2) ** -1.5

    def _norm(self, affine, shape):
        key = (np.asarray(affine, dtype=float).tobytes(), tuple(shape[:3]))
        if key not in self._norm_cache:
            coordinates = _world_coordinates(affine, shape)
            total = np.zeros(tuple(shape[:3]))
            for coil in range(self.n_coils):
                total += self._profile(coil, coordinates) ** 2
            if len(self._norm_cache) >= 2:
                self._norm_cache.clear()
            self._norm_cache[key] = np.sqrt(total)
        return self._norm_cache[key]

    def weights(self, coil, affine, shape, *, cache=True):
        """Complex unit-RSS weight ``w_k exp(i phi_k)`` of channel ``coil`` on a grid.

        Weights are cached per grid while the cache stays below :attr:`cache_bytes` (and
        ``cache`` is true: the scanner does not cache the weights of its slabs).
        """
        if self.n_coils == 1:
            return np.ones(tuple(shape[:3]), dtype=np.complex128)
        affine = np.asarray(affine, dtype=float)
        key = (affine.tobytes(), tuple(shape[:3]), int(coil))
        if key in self._weight_cache:
            return self._weight_cache[key]
        coordinates = _world_coordinates(affine, shape)
        magnitude = self._profile(coil, coordinates) / self._norm(affine, shape)
        phase = self.phase_offsets[coil] + 2.0 * np.pi / (4.0 * self.radius) * sum(
            d * (c - o) for d, c, o in zip(self.directions[coil], coordinates, self.centre)
        )
        weight = magnitude * np.exp(1j * phase)
        cached = sum(w.nbytes for w in self._weight_cache.values())
        if cache and cached + weight.nbytes <= self.cache_bytes:
            self._weight_cache[key] = weight
        return weight


# --------------------------------------------------------------------------------------------------
# the protocol as a list of volumes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeSpec:
    """One raw image (magnitude, and phase when ``with_phase``) of the protocol.

    Attributes
    ----------
    kind : {"spgr", "bssfp", "afi", "rb1cor", "dam", "tfl"}
    datatype : {"anat", "fmap"}
    suffix : str
        BIDS suffix (``VFA``, ``TB1AFI``, ``RB1COR``, ``TB1DAM``, ``TB1TFL``).
    entities : dict
        File-name entities other than ``sub`` and ``part``.
    metadata : dict
        Sidecar keys specific to this image (times in s, angles in deg).
    with_phase : bool
        Whether a phase image is written (``part-mag`` / ``part-phase``).
    parameters : dict
        Simulation parameters (radians, seconds).
    grid : {"main", "rb1cor"}
        Target grid of the image.
    """

    kind: str
    datatype: str
    suffix: str
    entities: dict
    metadata: dict
    with_phase: bool
    parameters: dict = field(default_factory=dict)
    grid: str = "main"


def list_volumes(protocol):
    """All raw images of ``protocol`` in acquisition order (VFA, bSSFP, AFI, RB1COR).

    Parameters
    ----------
    protocol : qmri_workflows.phantom.protocol.Protocol

    Returns
    -------
    list of VolumeSpec
    """
    volumes = []
    vfa = protocol.vfa
    vfa_spoiling = _spoiling_metadata(protocol.spoiling, vfa)
    mpm = getattr(protocol, "mpm", None)
    for flip_index, flip_angle in enumerate(vfa.flip_angles, start=1):
        for echo_index, echo_time in enumerate(vfa.echo_times, start=1):
            entities = {"echo": echo_index, "flip": flip_index}
            if mpm is not None:  # the hMRI layout: the VFA pair is the PDw and T1w (mt-off) contrasts
                entities = {"acq": ("PDw", "T1w")[flip_index - 1], **entities, "mt": "off"}
            volumes.append(
                _spoiled_gre(
                    "VFA" if mpm is None else "MPM",
                    entities,
                    flip_angle,
                    vfa.repetition_time,
                    echo_time,
                    vfa_spoiling,
                    with_phase=True,
                    metadata={} if mpm is None else {"MTState": False},
                )
            )
    if mpm is not None:
        for echo_index, echo_time in enumerate(vfa.echo_times[: mpm.n_echoes], start=1):
            volumes.append(
                _spoiled_gre(
                    "MPM",
                    {"acq": "MTw", "echo": echo_index, "flip": 1, "mt": "on"},
                    mpm.flip_angle,
                    mpm.repetition_time,
                    echo_time,
                    vfa_spoiling,
                    with_phase=True,
                    metadata={
                        "MTState": True,
                        # the hMRI-style MT pulse the saturation model describes (MPMProtocol)
                        "MTPulseShape": "GAUSSIAN",
                        "MTPulseDuration": 0.004,
                        "MTOffsetFrequency": 2000.0,
                        "MTNominalFlipAngle": 220.0,
                    },
                    parameters={"mt_pulse": mpm},
                )
            )
    if protocol.bssfp is not None:
        bssfp = protocol.bssfp
        for increment in bssfp.phase_increments:
            for flip_index, flip_angle in enumerate(bssfp.flip_angles, start=1):
                volumes.append(
                    VolumeSpec(
                        kind="bssfp",
                        datatype="anat",
                        suffix="VFA",
                        entities={"acq": f"bssfp{int(round(increment)):03d}", "flip": flip_index},
                        metadata={
                            "FlipAngle": float(flip_angle),
                            "EchoTime": float(bssfp.echo_time),
                            "RepetitionTimeExcitation": float(bssfp.repetition_time),
                            "PulseSequenceType": "bSSFP",
                            "PhaseCyclingIncrement": float(increment),
                            "SpoilingState": False,
                            "RFPulseDuration": float(bssfp.pulse_duration),
                        },
                        with_phase=True,
                        parameters={
                            "flip_angle": math.radians(flip_angle),
                            "tr": float(bssfp.repetition_time),
                            "phase_increment": math.radians(increment),
                            "pulse_duration": float(bssfp.pulse_duration),
                        },
                    )
                )
    if protocol.afi is not None:
        afi = protocol.afi
        afi_spoiling = _spoiling_metadata(protocol.spoiling, afi)
        for label, repetition_time in (("tr1", afi.repetition_time_1), ("tr2", afi.repetition_time_2)):
            volumes.append(
                VolumeSpec(
                    kind="afi",
                    datatype="fmap",
                    suffix="TB1AFI",
                    entities={"acq": label},
                    metadata={
                        "FlipAngle": float(afi.flip_angle),
                        "EchoTime": float(afi.echo_time),
                        "RepetitionTimeExcitation": float(repetition_time),
                        "PulseSequenceType": "AFI",
                        **afi_spoiling,
                    },
                    with_phase=False,
                    parameters={
                        "flip_angle": math.radians(afi.flip_angle),
                        "tr1": float(afi.repetition_time_1),
                        "tr2": float(afi.repetition_time_2),
                        "te": float(afi.echo_time),
                        "interval": 1 if label == "tr1" else 2,
                        "spoiling": _spoiling_parameters(afi_spoiling),
                    },
                )
            )
    if protocol.rb1cor is not None:
        rb1cor = protocol.rb1cor
        for label, coil in (("headPDw", "head"), ("bodyPDw", "body")):
            volumes.append(
                _spoiled_gre(
                    "RB1COR",
                    {"acq": label},
                    rb1cor.flip_angle,
                    rb1cor.repetition_time,
                    rb1cor.echo_time,
                    vfa_spoiling,
                    kind="rb1cor",
                    metadata={"ReceiveCoilName": f"{coil} coil"},
                    parameters={"coil": coil},
                    grid="rb1cor",
                )
            )
    if protocol.dam is not None:  # last, so that the other volumes keep their noise seeds
        dam = protocol.dam
        for index, flip_angle in enumerate(dam.flip_angles, start=1):
            volumes.append(
                _spoiled_gre(
                    "TB1DAM",
                    {"flip": index},
                    flip_angle,
                    dam.repetition_time,
                    dam.echo_time,
                    vfa_spoiling,
                    kind="dam",
                    parameters={"coil": "head"},
                )
            )
    if getattr(protocol, "tfl", None) is not None:  # last, so that the other volumes keep their noise seeds
        volumes.extend(_tfl_volumes(protocol.tfl))
    return volumes


def _tfl_volumes(tfl):
    """The two acquisitions of a Siemens tfl_b1map: the reference (written as ``acq-anat``) and the
    saturation-prepared image, from which with the reference the scanner makes ``acq-famp``
    (:func:`tfl_flip_angle_map`)."""
    return [
        VolumeSpec(
            kind="tfl",
            datatype="fmap",
            suffix="TB1TFL",
            entities={"acq": label},
            metadata={
                "FlipAngle": float(tfl.sidecar_flip_angle),
                "EchoTime": float(tfl.echo_time),
                "RepetitionTime": float(tfl.repetition_time),
                "PulseSequenceType": "tfl_b1map (saturation-prepared TurboFLASH)",
            },
            with_phase=False,
            parameters={
                "image": image,
                "prep_angle": math.radians(tfl.prep_angle),
                "readout_flip_angle": math.radians(tfl.readout_flip_angle),
                "prep_delay": float(tfl.prep_delay),
                "te": float(tfl.echo_time),
            },
        )
        for label, image in (("anat", "reference"), ("famp", "saturated"))
    ]


def tfl_flip_angle_map(saturated, reference):
    """The flip-angle map of a Siemens tfl_b1map as the scanner makes it: 10 x the angle (deg)
    whose cosine is the real part of ``saturated / reference``, rounded to integers (uint16).

    Parameters
    ----------
    saturated, reference : numpy.ndarray of complex
        The coil-combined images with and without the preparation pulse.

    Returns
    -------
    numpy.ndarray of uint16
        0 where the reference is 0.
    """
    saturated, reference = np.asarray(saturated), np.asarray(reference)
    power = np.abs(reference) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.real(saturated * np.conj(reference)) / power
    angle = np.degrees(np.arccos(np.clip(np.nan_to_num(cosine, nan=1.0), -1.0, 1.0)))
    return np.where(power > 0, np.round(10.0 * angle), 0).astype(np.uint16)


def _spoiled_gre(
    suffix,
    entities,
    flip_angle,
    repetition_time,
    echo_time,
    spoiling,
    *,
    kind="spgr",
    with_phase=False,
    metadata=None,
    parameters=None,
    grid="main",
):
    """A spoiled gradient-echo volume (VFA, MPM, RB1COR, TB1DAM): its sidecar keys and simulation
    parameters from the flip angle (deg), TR and TE (s) and the sequence's spoiling sidecar keys,
    plus the volume's own ``metadata`` and ``parameters``."""
    return VolumeSpec(
        kind=kind,
        datatype="anat" if kind == "spgr" else "fmap",
        suffix=suffix,
        entities=entities,
        metadata={
            "FlipAngle": float(flip_angle),
            "EchoTime": float(echo_time),
            "RepetitionTimeExcitation": float(repetition_time),
            "PulseSequenceType": "SPGR",
            **spoiling,
            **(metadata or {}),
        },
        with_phase=with_phase,
        parameters={
            "flip_angle": math.radians(flip_angle),
            "tr": float(repetition_time),
            "te": float(echo_time),
            "spoiling": _spoiling_parameters(spoiling),
            **(parameters or {}),
        },
        grid=grid,
    )


def _spoiling_metadata(model, sequence):
    """Sidecar keys of a spoiled sequence; ideal spoiling has no increment or spoiler to report."""
    if model == "ideal":
        return {"SpoilingState": True}
    return {
        "SpoilingState": True,
        "SpoilingType": "COMBINED",
        "SpoilingRFPhaseIncrement": float(sequence.spoiling_rf_phase_increment),
        "SpoilingGradientMoment": float(sequence.spoiling_gradient_moment),
        "SpoilingGradientDuration": float(sequence.spoiling_gradient_duration),
    }


def _spoiling_parameters(metadata):
    """Simulation parameters of the EPG (hashable), or ``None`` for ideal spoiling."""
    if "SpoilingRFPhaseIncrement" not in metadata:
        return None
    return (
        ("phase_increment_deg", metadata["SpoilingRFPhaseIncrement"]),
        ("gradient_moment", dephasing_from_gradient_moment(metadata["SpoilingGradientMoment"])),
    )


def _blend_diffusion(tissue, free_water):
    """One table from the tissue and free-water ones, weighted along T2 (see DIFFUSION_T2_RANGE)."""
    low, high = np.log(DIFFUSION_T2_RANGE)
    weight = np.clip((tissue.axes[1] - low) / (high - low), 0.0, 1.0)[None, :, None, None]
    return RatioTable(*tissue.axes, (1.0 - weight) * tissue.values + weight * free_water.values)


@functools.lru_cache(maxsize=16)
def _ratio_table(kind, flip_deg, repetition_times, spoiling):
    """The EPG / ideal ratio table of one protocol (both diffusion coefficients), cached."""
    options = dict(spoiling)
    if kind == "afi":
        tr1, tr2 = repetition_times
        tables = [afi_ratio_table(flip_deg, tr1, tr2, diffusion=d, **options) for d in _DIFFUSIONS]
    else:
        tables = [spgr_ratio_table(flip_deg, repetition_times[0], diffusion=d, **options) for d in _DIFFUSIONS]
    return _blend_diffusion(*tables)


_DIFFUSIONS = (TISSUE_DIFFUSION, FREE_WATER_DIFFUSION)


def _spoiling_key(volume):
    """What the spoiling ratio of ``volume`` depends on (hashable), or ``None`` (ideal spoiling)."""
    p = volume.parameters
    if volume.kind not in ("spgr", "afi", "rb1cor", "dam") or p.get("spoiling") is None:
        return None
    flip_deg = round(math.degrees(p["flip_angle"]), 9)
    if volume.kind == "afi":
        return ("afi", flip_deg, (p["tr1"], p["tr2"]), p["spoiling"], p["interval"] - 1)
    return ("spgr", flip_deg, (p["tr"],), p["spoiling"], 0)


def _amplitude_key(volume, scale):
    """What the TE = 0 amplitude of an SPGR volume depends on (hashable): all but the echo time."""
    return (
        volume.kind,
        scale,
        tuple(sorted((name, value) for name, value in volume.parameters.items() if name != "te")),
    )


def spoiling_ratio_map(truth, volume):
    """Ratio of the EPG steady state of ``volume``'s protocol to its ideal-spoiling signal, per voxel.

    Parameters
    ----------
    truth : PhantomTruth
        Ground truth (``r1``, ``r2``, ``b1``, ``pd`` maps).
    volume : VolumeSpec
        A spoiled volume (``spgr``, ``afi``, ``rb1cor``, ``dam``).

    Returns
    -------
    numpy.ndarray of float32 or None
        The ratio (1 where there is no tissue), the shape of the truth maps; ``None`` when the volume
        is simulated with ideal spoiling or is not spoiled.
    """
    key = _spoiling_key(volume)
    if key is None:
        return None
    kind, flip_deg, repetition_times, spoiling, signal_index = key
    table = _ratio_table(kind, flip_deg, repetition_times, spoiling)
    r1, r2 = np.asarray(truth.r1, dtype=float), np.asarray(truth.r2, dtype=float)
    tissue = (np.asarray(truth.pd) > 0) & (r1 > 0) & (r2 > 0)
    ratio = np.ones(r1.shape, dtype=np.float32)
    ratio[tissue] = table(1.0 / r1[tissue], 1.0 / r2[tissue], np.asarray(truth.b1, dtype=float)[tissue])[
        :, signal_index
    ]
    return ratio


def _field_hz(truth):
    """Frequency offset (Hz, float64): a new array, which the caller may change in place."""
    field_hz = np.multiply(truth.b0_ppm, 1e-6, dtype=np.float64)
    field_hz *= GYROMAGNETIC_RATIO
    field_hz *= float(truth.field_strength)
    return field_hz


def _m0(truth, *, receive=True, scale=SIGNAL_SCALE):
    m0 = np.asarray(truth.pd, dtype=float) * (scale / 100.0)
    if receive:
        m0 = m0 * np.asarray(truth.receive, dtype=float)
    return m0


def spgr_amplitude(truth, volume, *, scale=SIGNAL_SCALE, spoiling_ratio=None):
    """TE = 0 magnitude of an SPGR volume: what all its echoes share.

    The steady state at the actual flip angle (Ernst), times the spoiling ratio and, for an
    MT-weighted volume, :func:`mt_signal_factor`; it does not depend on the echo time, so the
    scanner computes it once per flip angle and decays it to each echo (:func:`noiseless_signal`).

    Parameters
    ----------
    truth : PhantomTruth
    volume : VolumeSpec
        An ``spgr`` volume (its echo time is ignored).
    scale : float, optional
        See :data:`SIGNAL_SCALE`.
    spoiling_ratio : numpy.ndarray, optional
        :func:`spoiling_ratio_map` of ``truth`` and ``volume`` if already computed.

    Returns
    -------
    numpy.ndarray of float64, the shape of the truth maps (not finite in air, where ``pd = 0``)
    """
    if volume.kind != "spgr":
        raise ValueError(f"spgr_amplitude needs an spgr volume, got {volume.kind!r}")
    p = volume.parameters
    if spoiling_ratio is None:
        spoiling_ratio = spoiling_ratio_map(truth, volume)
    b1 = np.asarray(truth.b1, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        # R2* = 0 at TE = 0: the decay is exactly 1
        amplitude = spgr_signal(_m0(truth, scale=scale), truth.r1, 0.0, p["flip_angle"], p["tr"], 0.0, b1=b1)
        # imperfect spoiling changes the TE = 0 amplitude only (the receiver follows the RF phase)
        if spoiling_ratio is not None:
            amplitude *= spoiling_ratio
        if p.get("mt_pulse") is not None:
            amplitude *= mt_signal_factor(truth, p["mt_pulse"], p["flip_angle"], p["tr"])
    return amplitude


def noiseless_signal(truth, volume, *, scale=SIGNAL_SCALE, spoiling_ratio=None, amplitude=None):
    """Noiseless complex image of one volume on the grid of ``truth``.

    The magnitude includes the receive field (for the body coil of the RB1COR pair that of the body
    coil, ``truth.body_receive``, uniform when absent or ``None``); the phase is the transceive phase
    plus the off-resonance phase at the echo time.

    Parameters
    ----------
    truth : PhantomTruth
        Ground truth (any object with the maps as attributes).
    volume : VolumeSpec
    scale : float, optional
        Signal of pure water at unit receive, see :data:`SIGNAL_SCALE`.
    spoiling_ratio : numpy.ndarray, optional
        :func:`spoiling_ratio_map` of ``truth`` and ``volume`` if already computed (it is computed
        here otherwise).
    amplitude : numpy.ndarray, optional
        For an ``spgr`` volume: its :func:`spgr_amplitude` if already computed (e.g. for another
        echo of the same flip angle); ``spoiling_ratio`` and ``scale`` are then not used.

    Returns
    -------
    numpy.ndarray of complex128, the shape of the truth maps
    """
    p = volume.parameters
    if volume.kind == "spgr" and amplitude is None:
        amplitude = spgr_amplitude(truth, volume, scale=scale, spoiling_ratio=spoiling_ratio)
    elif volume.kind != "spgr" and spoiling_ratio is None:
        spoiling_ratio = spoiling_ratio_map(truth, volume)
    # imperfect spoiling changes the TE = 0 amplitude only (the receiver follows the RF phase)
    spoiling = 1.0 if spoiling_ratio is None else spoiling_ratio
    field_hz = _field_hz(truth)
    # the spgr amplitude already has the transmit field
    b1 = None if volume.kind == "spgr" else np.asarray(truth.b1, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if volume.kind == "spgr":
            # every echo of every flip angle comes here: in place, in one real and one complex array
            phase = field_hz  # truth.phase_offset + 2 pi f TE
            phase *= 2.0 * np.pi
            phase *= p["te"]
            phase += truth.phase_offset
            signal = np.empty(phase.shape, dtype=np.complex128)
            np.cos(phase, out=signal.real)
            np.sin(phase, out=signal.imag)
            magnitude = np.multiply(truth.r2star, -p["te"], out=phase, dtype=np.float64)
            np.exp(magnitude, out=magnitude)
            magnitude *= amplitude
            signal.real *= magnitude
            signal.imag *= magnitude
        elif volume.kind == "bssfp":
            signal = bssfp_steady_state(
                _m0(truth, scale=scale),
                truth.r1,
                truth.r2,
                p["flip_angle"],
                p["tr"],
                off_resonance=field_hz,
                phase_increment=p["phase_increment"],
                b1=b1,
                pulse_duration=p.get("pulse_duration", 0.0),
            )
            signal = signal * np.exp(1j * np.asarray(truth.phase_offset, dtype=float))
        elif volume.kind == "afi":
            pair = afi_signals(
                _m0(truth, scale=scale), truth.r1, truth.r2star, p["flip_angle"], p["tr1"], p["tr2"], p["te"], b1=b1
            )
            phase = truth.phase_offset + 2.0 * np.pi * field_hz * p["te"]
            signal = spoiling * pair[p["interval"] - 1] * np.exp(1j * phase)
        elif volume.kind == "tfl":
            # single shot from full relaxation, read at the centre of k-space: the saturation pulse
            # (its transverse magnetisation spoiled) leaves Mz = M0 cos(B1 a_prep), which recovers
            # towards M0 for prep_delay before the readout pulse
            longitudinal = 1.0
            if p["image"] == "saturated":
                recovery = np.exp(-p["prep_delay"] * np.asarray(truth.r1, dtype=float))
                longitudinal = np.cos(b1 * p["prep_angle"]) * recovery + (1.0 - recovery)
            magnitude = (
                _m0(truth, scale=scale)
                * longitudinal
                * np.sin(b1 * p["readout_flip_angle"])
                * np.exp(-p["te"] * np.asarray(truth.r2star, dtype=float))
            )
            phase = truth.phase_offset + 2.0 * np.pi * field_hz * p["te"]
            signal = magnitude * np.exp(1j * phase)
        elif volume.kind in ("rb1cor", "dam"):  # a spoiled gradient echo, head coil unless the RB1COR body image
            if p["coil"] == "head":
                m0 = _m0(truth, scale=scale)
            else:
                m0 = _m0(truth, receive=False, scale=scale)
                body_receive = getattr(truth, "body_receive", None)
                if body_receive is not None:
                    m0 = m0 * np.asarray(body_receive, dtype=float)
            magnitude = spoiling * spgr_signal(m0, truth.r1, truth.r2star, p["flip_angle"], p["tr"], p["te"], b1=b1)
            phase = truth.phase_offset + 2.0 * np.pi * field_hz * p["te"]
            signal = magnitude * np.exp(1j * phase)
        else:
            raise ValueError(f"unknown volume kind {volume.kind!r}")
    # air (pd = 0, r1 = 0) gives 0/0 in the steady-state formulas: no magnetisation, no signal
    signal = np.asarray(signal, dtype=np.complex128)
    valid = np.isfinite(signal)
    valid &= np.asarray(truth.pd) > 0
    signal[~valid] = 0.0
    return signal


def mt_signal_factor(truth, mt_pulse, flip_angle, repetition_time):
    """Ratio of the MT-weighted steady state to the Ernst signal, per voxel.

    The MT pulse before each excitation removes the fraction ``delta`` (``mt_pulse.saturation`` of
    the voxel's MTsat and actual transmit field) of the longitudinal magnetisation; the exact
    steady state (see :class:`~qmri_workflows.phantom.protocol.MPMProtocol`) divided by the Ernst
    signal at the same flip angle and TR is

    ``(1 - delta) (1 - E1 cos a) / (1 - (1 - delta) E1 cos a)``.

    Parameters
    ----------
    truth : PhantomTruth
        Needs ``mtsat`` (p.u.), ``r1`` and ``b1``.
    mt_pulse : qmri_workflows.phantom.protocol.MPMProtocol
    flip_angle : float
        Nominal flip angle (rad).
    repetition_time : float
        TR (s).

    Returns
    -------
    numpy.ndarray
    """
    if getattr(truth, "mtsat", None) is None:
        raise ValueError("the phantom truth has no MTsat map: build it with make_phantom to simulate an MT contrast")
    b1 = np.asarray(truth.b1, dtype=float)
    delta = mt_pulse.saturation(truth.mtsat, b1)
    e1_cos = np.exp(-np.asarray(truth.r1, dtype=float) * repetition_time) * np.cos(b1 * flip_angle)
    return (1.0 - delta) * (1.0 - e1_cos) / (1.0 - (1.0 - delta) * e1_cos)


def white_matter_labels(labels):
    """Label values of (normal-appearing) white matter in a ``{value: name}`` table."""
    chosen = []
    for value, name in labels.items():
        lowered = str(name).lower().replace("_", " ").replace("-", " ")
        if lowered in ("wm", "nawm") or ("white matter" in lowered and "lesion" not in lowered):
            chosen.append(int(value))
    return chosen


# --------------------------------------------------------------------------------------------------
# the scanner
# --------------------------------------------------------------------------------------------------
class _TruthSlab:
    """The maps of a truth restricted to the slices ``z0:z1`` of the third axis (views, no copies)."""

    def __init__(self, truth, z0, z1):
        self._truth = truth
        self._slices = slice(z0, z1)

    def __getattr__(self, name):
        value = getattr(self._truth, name)
        if isinstance(value, np.ndarray) and value.ndim == 3:
            return value[:, :, self._slices]
        return value


#: Fine voxels per slab of the simulation (complex128: about 64 MB per slab image).
SLAB_VOXELS = 4_000_000
#: A fine voxel is free of partial volume when at least this fraction of it belongs to its label.
PURE_FRACTION = 0.95
#: The interior masks are eroded by one voxel only when at least this many voxels remain.
MIN_ERODED_VOXELS = 20


class PhantomScanner:
    """Acquire the volumes of a protocol from one subject's (possibly oversampled) truth.

    The fine images are simulated in slabs along the third axis: each slab's signal is reduced along
    the first two axes by k-space cropping, the reduced slabs are stacked and the third axis is
    reduced at the end. The crop is separable, so the result equals the crop of the whole fine image
    (no overlap needed), and memory stays at one slab of the fine grid plus the partly reduced image
    per channel (about 280 MB per channel for a 1 mm image simulated at 0.5 mm).

    Parameters
    ----------
    truth : PhantomTruth
        Ground truth, on the fine grid when ``oversample > 1``.
    oversample : int, optional
        Ratio of the truth grid to the target grid.
    n_coils : int, optional
        Receive channels (1: Rician magnitude; more: root-sum-of-squares).
    sigma : float, optional
        Noise standard deviation per channel and per real/imaginary part (0: noiseless).
    rb1cor_factor : int, optional
        Coarsening of the RB1COR grid relative to the target grid.
    scale : float, optional
        See :data:`SIGNAL_SCALE`.
    slab_voxels : int, optional
        Fine voxels per slab (at least one slice).
    kspace_filter : {"box", "tukey", "none"}, optional
        How a voxel forms from the finer ones (:func:`kspace_downsample`).
    """

    def __init__(
        self,
        truth,
        *,
        oversample=1,
        n_coils=1,
        sigma=0.0,
        rb1cor_factor=1,
        scale=SIGNAL_SCALE,
        slab_voxels=SLAB_VOXELS,
        kspace_filter="box",
    ):
        self.truth = truth
        self.kspace_filter = _check_filter(kspace_filter)
        self.oversample = _check_factor(oversample)
        self.rb1cor_factor = _check_factor(rb1cor_factor)
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.scale = float(scale)
        self.fine_affine = np.asarray(truth.affine, dtype=float)
        self.fine_shape = tuple(np.shape(truth.pd))
        self.affine = coarsen_affine(self.fine_affine, self.oversample)
        self.shape = coarse_shape(self.fine_shape, self.oversample)
        self.rb1cor_affine = coarsen_affine(self.affine, self.rb1cor_factor)
        self.rb1cor_shape = coarse_shape(self.shape, self.rb1cor_factor)
        self.coils = ReceiveCoils.around(n_coils, self.affine, self.shape)
        self.slab_thickness = max(1, int(slab_voxels) // (self.fine_shape[0] * self.fine_shape[1]))
        #: Optional noise amplification map on the main grid (see :func:`gfactor_map`); None: uniform.
        self.noise_gfactor = None

        # the spoiling ratio of the last protocol, and the TE = 0 amplitude of the last SPGR flip
        # angle: the echoes of a flip angle follow each other (and the RB1COR pair shares a ratio)
        self._spoiling_cache = (None, None)
        self._amplitude_cache = (None, None)

    def _spoiling_ratio(self, volume):
        """:func:`spoiling_ratio_map` on the fine grid (float32), kept for the next volume."""
        key = _spoiling_key(volume)
        if key is None:
            return None
        if self._spoiling_cache[0] != key:
            self._spoiling_cache = (None, None)
            nz = self.fine_shape[2]
            ratio = np.empty(self.fine_shape, dtype=np.float32)
            for z0 in range(0, nz, self.slab_thickness):
                z1 = min(nz, z0 + self.slab_thickness)
                ratio[:, :, z0:z1] = spoiling_ratio_map(_TruthSlab(self.truth, z0, z1), volume)
            self._spoiling_cache = (key, ratio)
        return self._spoiling_cache[1]

    def _spgr_amplitude(self, volume):
        """:func:`spgr_amplitude` on the fine grid (float64), kept for the next echo; None unless SPGR.

        Built slab by slab with its own spoiling ratio, which is not kept (every echo of the flip
        angle takes the amplitude instead).
        """
        if volume.kind != "spgr":
            return None
        key = _amplitude_key(volume, self.scale)
        if self._amplitude_cache[0] != key:
            self._amplitude_cache = self._spoiling_cache = (None, None)
            nz = self.fine_shape[2]
            amplitude = np.empty(self.fine_shape, dtype=np.float64)
            for z0 in range(0, nz, self.slab_thickness):
                z1 = min(nz, z0 + self.slab_thickness)
                amplitude[:, :, z0:z1] = spgr_amplitude(_TruthSlab(self.truth, z0, z1), volume, scale=self.scale)
            self._amplitude_cache = (key, amplitude)
        return self._amplitude_cache[1]

    @property
    def n_coils(self):
        """Number of receive channels."""
        return self.coils.n_coils

    def grid(self, volume):
        """``(affine, shape)`` of the target grid of ``volume``."""
        if volume.grid == "rb1cor":
            return self.rb1cor_affine, self.rb1cor_shape
        return self.affine, self.shape

    def _reduced_channels(self, volume, factor, n_channels):
        """Noiseless channel images of ``volume``, k-space reduced by ``factor``, built slab by slab."""
        nx, ny, nz = self.fine_shape
        in_plane = coarse_shape((nx, ny, 1), factor)[:2]
        channels = [np.empty(in_plane + (nz,), dtype=np.complex128) for _ in range(n_channels)]
        amplitude = self._spgr_amplitude(volume)
        ratio = None if amplitude is not None else self._spoiling_ratio(volume)
        for z0 in range(0, nz, self.slab_thickness):
            z1 = min(nz, z0 + self.slab_thickness)
            signal = noiseless_signal(
                _TruthSlab(self.truth, z0, z1),
                volume,
                scale=self.scale,
                spoiling_ratio=None if ratio is None else ratio[:, :, z0:z1],
                amplitude=None if amplitude is None else amplitude[:, :, z0:z1],
            )
            slab_affine = self.fine_affine.copy()
            slab_affine[:3, 3] += self.fine_affine[:3, 2] * z0
            # a single slab is the whole grid: cache its weights (also the target grid's when
            # oversample = 1), so that repeated acquisitions use bit-identical sensitivities
            whole_grid = z0 == 0 and z1 == nz
            for coil, channel in enumerate(channels):
                image = signal
                if n_channels > 1:
                    image = signal * self.coils.weights(coil, slab_affine, signal.shape, cache=whole_grid)
                if factor > 1:
                    image = _crop_kspace(_pad_axes(image, factor, (0, 1)), factor, (0, 1), -1, self.kspace_filter)
                channel[:, :, z0:z1] = image
            del signal, image
        if factor > 1:
            channels = [
                _crop_kspace(_pad_axes(channel, factor, (2,)), factor, (2,), -1, self.kspace_filter)
                for channel in channels
            ]
        return channels

    def acquire(self, volume, *, rng=None, sigma=None):
        """Simulate one volume: magnitude and (if ``volume.with_phase``) phase on its target grid.

        See :meth:`acquire_complex` for the arguments.

        Returns
        -------
        magnitude : numpy.ndarray (float64)
        phase : numpy.ndarray (float64, radians in (-pi, pi]) or None
        """
        magnitude, combined = self.acquire_complex(volume, rng=rng, sigma=sigma)
        phase = None
        if volume.with_phase:
            phase = np.angle(combined)
            phase[phase <= -np.pi] = np.pi  # (-pi, pi]
        return magnitude, phase

    def acquire_complex(self, volume, *, rng=None, sigma=None):
        """Simulate one volume: its magnitude and its coil-combined complex image on its target grid.

        Parameters
        ----------
        volume : VolumeSpec
        rng : numpy.random.Generator, optional
            Noise source; required when the noise ``sigma`` is > 0.
        sigma : float, optional
            Override of the scanner's noise level (0 gives the noiseless combined image).

        Returns
        -------
        magnitude : numpy.ndarray (float64)
            Root-sum-of-squares of the channels (the channel's modulus for one).
        combined : numpy.ndarray (complex128)
            The sensitivity-weighted (Roemer) sum of the channels, or the channel itself.
        """
        sigma = self.sigma if sigma is None else float(sigma)
        if sigma > 0 and rng is None:
            raise ValueError("acquire needs an rng (numpy.random.Generator) when sigma > 0")
        factor = self.oversample * (self.rb1cor_factor if volume.grid == "rb1cor" else 1)
        affine, shape = self.grid(volume)
        # the body coil of the RB1COR pair is a single channel
        single_channel = self.n_coils == 1 or (volume.kind == "rb1cor" and volume.parameters["coil"] == "body")
        channels = self._reduced_channels(volume, factor, 1 if single_channel else self.n_coils)

        local_sigma = sigma
        if sigma > 0 and self.noise_gfactor is not None and volume.grid != "rb1cor":
            local_sigma = sigma * self.noise_gfactor

        def noisy(image):
            if sigma > 0:
                noise = rng.standard_normal(image.shape + (2,))
                image = image + local_sigma * (noise[..., 0] + 1j * noise[..., 1])
            return image

        if single_channel:
            combined = noisy(channels.pop())
            magnitude = np.abs(combined)
        else:
            sum_of_squares = np.zeros(shape)
            combined = np.zeros(shape, dtype=np.complex128)
            for coil in range(self.n_coils):
                channel = noisy(channels[coil])
                channels[coil] = None
                sum_of_squares += channel.real**2 + channel.imag**2
                combined += np.conj(self.coils.weights(coil, affine, shape)) * channel
                del channel
            magnitude = np.sqrt(sum_of_squares)
        return magnitude, combined

    def truth_maps(self, protocol):
        """Ground-truth maps on the target grid, one at a time.

        Yields
        ------
        name : str
            ``R1map``, ``R2map``, ``R2starmap``, ``PDmap``, ``Chimap``, ``M0map``, ``S0map-<flip index>``
            (mt-off images), ``MTsat`` (p.u., only with an MPM protocol),
            ``TB1map`` (percent), ``RB1map``, ``RB1map-body`` (body coil, only when the truth has one),
            ``dseg``, ``brainmask``, ``headmask``, ``totalfield``, ``backgroundfield``, ``localfield``
            (ppm). The smooth fields (TB1map, RB1map and the field offsets) are set to 0 outside the
            head mask, where no image carries information on them.
        data : numpy.ndarray
        """
        truth, factor = self.truth, self.oversample
        for name, attribute in (
            ("R1map", "r1"),
            ("R2map", "r2"),
            ("R2starmap", "r2star"),
            ("PDmap", "pd"),
            ("Chimap", "chi"),
        ):
            yield name, block_average(getattr(truth, attribute), factor)
        yield "M0map", block_average(_m0(truth, scale=self.scale), factor)
        first_echoes = [
            v
            for v in list_volumes(protocol)
            if v.kind == "spgr" and v.entities["echo"] == 1 and v.parameters.get("mt_pulse") is None
        ]
        for flip_index, first_echo in enumerate(first_echoes, start=1):
            # same protocol (flip, TR, spoiling) as the VFA images
            intercept = replace(first_echo, entities={}, metadata={}, parameters={**first_echo.parameters, "te": 0.0})
            # the TE = 0 intercept of the (k-space reduced) complex signal is what R2* fits estimate
            yield f"S0map-{flip_index}", np.abs(self._reduced_channels(intercept, factor, 1)[0])
        if getattr(protocol, "mpm", None) is not None and getattr(truth, "mtsat", None) is not None:
            yield "MTsat", block_average(truth.mtsat, factor)
        head = block_average(truth.head_mask, factor) >= 0.5
        # smooth fields are only observable where there is signal: 0 outside the head mask
        yield "TB1map", np.where(head, 100.0 * block_average(truth.b1, factor), 0.0)
        yield "RB1map", np.where(head, block_average(truth.receive, factor), 0.0)
        if getattr(truth, "body_receive", None) is not None:
            yield "RB1map-body", np.where(head, block_average(truth.body_receive, factor), 0.0)
        yield "dseg", block_majority(truth.dseg, factor)
        yield "brainmask", block_average(truth.brain_mask, factor) >= 0.5
        yield "headmask", head
        yield "totalfield", np.where(head, block_average(truth.b0_ppm, factor), 0.0)
        yield "backgroundfield", np.where(head, block_average(truth.background_field_ppm, factor), 0.0)
        yield "localfield", np.where(head, block_average(truth.local_field_ppm, factor), 0.0)

    def interior_masks(self, labels):
        """Target-grid voxels of each label that have no partial volume, eroded where possible.

        A target voxel is *interior* to label ``L`` when every fine voxel of its ``oversample**3``
        footprint has the label ``L`` and at least :data:`PURE_FRACTION` of each fine voxel's volume
        belongs to ``L`` (``truth.label_fraction``; the label alone when the truth has none). The
        mask is then eroded by one voxel (3 x 3 x 3 neighbourhood), away from the ringing of the
        k-space crop at the region's edge, when at least :data:`MIN_ERODED_VOXELS` voxels remain.

        Parameters
        ----------
        labels : iterable of int
            Label values of ``truth.dseg``.

        Returns
        -------
        dict of int -> (numpy.ndarray of bool, bool)
            Mask on the target grid and whether it was eroded, per label.
        """
        from scipy import ndimage

        truth, factor = self.truth, self.oversample
        dseg_blocks = _blocks(truth.dseg, factor)
        lowest = dseg_blocks.min(axis=(1, 3, 5))
        uniform = lowest == dseg_blocks.max(axis=(1, 3, 5))
        del dseg_blocks
        if getattr(truth, "label_fraction", None) is not None:
            pure = np.asarray(truth.label_fraction) >= PURE_FRACTION
            uniform &= _blocks(pure, factor).all(axis=(1, 3, 5))
            del pure
        masks = {}
        for label in labels:
            mask = uniform & (lowest == label)
            eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 3), dtype=bool))
            use_eroded = int(eroded.sum()) >= MIN_ERODED_VOXELS
            masks[int(label)] = (eroded if use_eroded else mask, use_eroded)
        return masks


def gfactor_map(shape, peak):
    """A smooth noise-amplification (g-factor) map: 1 at the edges of the field of view, ``1 + peak`` near its centre.

    Parallel imaging amplifies the noise most where the aliased coil sensitivities overlap, towards
    the centre of the head; a Gaussian bump of width a quarter of the field of view, centred off the
    grid's centre (so the map is not symmetric), stands for it.

    Parameters
    ----------
    shape : tuple of 3 int
        Main grid.
    peak : float
        Excess noise at the bump's centre (0.5: 50 % more noise), >= 0.

    Returns
    -------
    ndarray of float64, >= 1
    """
    if not (peak >= 0 and math.isfinite(peak)):
        raise ValueError(f"peak must be finite and >= 0, got {peak!r}")
    axes = [(np.arange(n) - 0.5 * (n - 1) - 0.1 * n) / (0.25 * n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    return 1.0 + peak * np.exp(-0.5 * (x**2 + y**2 + z**2))


def reference_sigma(scanner, protocol, snr):
    """Noise standard deviation per channel that gives ``snr`` in white matter.

    ``sigma = median(|S| over white matter) / snr`` where ``S`` is the noiseless combined magnitude of
    the first echo of the lowest-flip-angle VFA image on the target grid, and white matter is taken
    from the (target-grid) segmentation (:func:`white_matter_labels`; the brain mask if the table
    has no white-matter label).

    Parameters
    ----------
    scanner : PhantomScanner
    protocol : Protocol
    snr : float
        > 0; ``inf`` gives 0 (noiseless).

    Returns
    -------
    float
    """
    snr = float(snr)
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for noiseless data), got {snr!r}")
    if math.isinf(snr):
        return 0.0
    flip_index = int(np.argmin(protocol.vfa.flip_angles))
    reference = next(
        v
        for v in list_volumes(protocol)
        if v.kind == "spgr"
        and v.entities.get("echo") == 1
        and v.entities.get("flip") == flip_index + 1
        and v.parameters.get("mt_pulse") is None
    )
    magnitude, _ = scanner.acquire(reference, sigma=0.0)
    dseg = block_majority(scanner.truth.dseg, scanner.oversample)
    wm_values = white_matter_labels(scanner.truth.labels)
    region = np.isin(dseg, wm_values) if wm_values else np.zeros(dseg.shape, dtype=bool)
    if not region.any():
        region = block_average(scanner.truth.brain_mask, scanner.oversample) >= 0.5
    if not region.any():
        raise ValueError("cannot define the noise level: the phantom has neither white matter nor a brain mask")
    return float(np.median(magnitude[region])) / snr
