"""Unit dipole kernel and the forward model from susceptibility to field.

The field shift produced by a susceptibility distribution chi (ppm) in a main field B0 along the unit
vector b is, to first order in chi and after the Lorentz-sphere correction,

    delta_B / B0 = F^-1[ D(k) F[chi] ],   D(k) = 1/3 - (k . b)^2 / |k|^2,

(Salomir 2003; Marques & Bowtell 2005). ``D`` is defined on the discrete Fourier grid of the array.

Convention for k = 0
--------------------
``D(0)`` is undetermined (the limit depends on the direction from which k approaches 0). We set
``D(0) = 0``: the computed field then has zero mean over the (padded) field of view, so a constant
offset, which the scanner removes anyway when it sets the centre frequency, is not part of the field.
With this choice the field inside a uniformly magnetised sphere in a large, cubic field of view is 0
(the Lorentz sphere) and the field outside is the closed-form dipole field.

Pure numpy/scipy; no file I/O.

References
----------
Salomir R, de Senneville BD, Moonen CTW. A fast calculation method for magnetic field inhomogeneity
due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson B 2003;19B:26-34.

Marques JP, Bowtell R. Application of a Fourier-based method for rapid calculation of field
inhomogeneity due to spatial variation of magnetic susceptibility. Concepts Magn Reson B
2005;25B:65-78.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

__all__ = ["dipole_kernel", "forward_field"]


def _unit_vector(b0_direction):
    direction = np.asarray(b0_direction, dtype=float)
    if direction.shape != (3,):
        raise ValueError(f"b0_direction must have 3 components, got shape {direction.shape}")
    norm = np.linalg.norm(direction)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"b0_direction must be a non-zero finite vector, got {tuple(direction)}")
    return direction / norm


def _check_grid(shape, voxel_size):
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive integers, got {shape}")
    voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    if np.any(~np.isfinite(voxel_size)) or np.any(voxel_size <= 0):
        raise ValueError(f"voxel_size must be positive, got {tuple(voxel_size)}")
    return shape, voxel_size


def _nyquist_flags(n, *, half=False):
    """Which samples of ``fftfreq(n)`` (``rfftfreq(n)`` if ``half``) are the Nyquist frequency."""
    flags = np.zeros(n // 2 + 1 if half else n, dtype=bool)
    if n % 2 == 0 and n > 1:
        flags[-1 if half else n // 2] = True
    return flags


def _kernel_from_frequencies(frequencies, nyquist, direction, dtype):
    """``D(k)`` on a sparse grid of per-axis frequencies; ``nyquist`` flags their Nyquist samples.

    At the Nyquist frequency of an even-length axis, +k and -k are the same sample, so ``D`` is
    averaged over both signs of that component: the cross terms of ``(k . b)^2`` that hold it drop.
    ``D`` then stays even in k, as the kernel of a real dipole must. Without this an oblique B0
    makes the Nyquist planes one-sided, and the field (or the susceptibility inverted from it) of
    a volume stored with an axis reversed was not the reversed field (3 % NRMSE for TKD in
    ``tests/core/qsm/test_storage_order.py``, 13-20 % on white noise).
    """
    grids = np.meshgrid(*[np.asarray(f, dtype=dtype) for f in frequencies], indexing="ij", sparse=True)
    flags = np.meshgrid(*[np.asarray(f, dtype=bool) for f in nyquist], indexing="ij", sparse=True)
    k_squared = grids[0] * grids[0] + grids[1] * grids[1] + grids[2] * grids[2]
    k_squared[0, 0, 0] = 1.0
    projection = [np.where(flag, dtype(0.0), k * dtype(b)) for k, flag, b in zip(grids, flags, direction)]
    kernel = projection[0] + projection[1] + projection[2]
    kernel *= kernel
    for k, flag, b in zip(grids, flags, direction):
        if flag.any():
            kernel += np.where(flag, k * k * dtype(b * b), dtype(0.0))
    kernel /= k_squared
    del k_squared
    np.subtract(dtype(1.0 / 3.0), kernel, out=kernel)
    kernel[0, 0, 0] = 0.0
    return kernel.astype(dtype, copy=False)


def dipole_kernel(shape, voxel_size, b0_direction=(0, 0, 1), *, dtype=np.float64):
    """Unit dipole kernel in k-space on the FFT grid of an array.

    Parameters
    ----------
    shape : tuple of 3 int
        Array shape (voxels).
    voxel_size : float or sequence of 3 float
        Voxel size in mm along each array axis.
    b0_direction : sequence of 3 float, optional
        Direction of the main field in array-axis coordinates (any length; it is normalised). For an
        oblique acquisition this is the scanner z axis expressed in the voxel axes.
    dtype : numpy dtype, optional
        Floating type of the returned kernel.

    Returns
    -------
    kernel : ndarray, shape ``shape``
        ``D(k) = 1/3 - (k . b)^2 / |k|^2`` in the unshifted order of :func:`numpy.fft.fftn`
        (zero frequency at index 0), with ``D(0) = 0`` (see the module notes).

    References
    ----------
    Marques JP, Bowtell R. Concepts Magn Reson B 2005;25B:65-78.
    """
    shape, voxel_size = _check_grid(shape, voxel_size)
    direction = _unit_vector(b0_direction)
    frequencies = [np.fft.fftfreq(n, d=h) for n, h in zip(shape, voxel_size)]
    return _kernel_from_frequencies(frequencies, [_nyquist_flags(n) for n in shape], direction, dtype)


def _rfft_kernel(shape, voxel_size, direction, dtype):
    frequencies = [
        np.fft.fftfreq(shape[0], d=voxel_size[0]),
        np.fft.fftfreq(shape[1], d=voxel_size[1]),
        np.fft.rfftfreq(shape[2], d=voxel_size[2]),
    ]
    nyquist = [_nyquist_flags(shape[0]), _nyquist_flags(shape[1]), _nyquist_flags(shape[2], half=True)]
    return _kernel_from_frequencies(frequencies, nyquist, direction, dtype)


def forward_field(chi, voxel_size, *, b0_direction=(0, 0, 1), pad=None, workers=-1):
    """Field shift (ppm of B0) produced by a susceptibility map.

    The map is zero-padded before the FFT so that the periodic images implied by the discrete
    Fourier transform are far away; the padding value 0 stands for the medium that surrounds the
    array, so ``chi`` must be given relative to that medium (e.g. relative to air for a head in air).

    Parameters
    ----------
    chi : ndarray, shape (X, Y, Z) or (X, Y, Z, N)
        Susceptibility in ppm relative to the surrounding medium; with a trailing axis, N maps on
        the same grid share one kernel.
    voxel_size : float or sequence of 3 float
        Voxel size in mm.
    b0_direction : sequence of 3 float, optional
        Main-field direction in array-axis coordinates.
    pad : None, int or sequence of 3 int, optional
        Zero voxels added on *each* side of each axis. ``None`` pads each axis by half its length on
        each side (field of view doubled), which keeps the images' contribution to the field at the
        object below about 2 % of the object's own external field for a compact object. The padded
        lengths are then rounded up to fast FFT sizes.
    workers : int, optional
        Threads for :mod:`scipy.fft` (-1: all cores).

    Returns
    -------
    field : ndarray, shape of ``chi``
        Field shift in ppm (same units as ``chi``), ``float32`` for ``float32`` input and ``float64``
        otherwise. Its mean over the padded field of view is 0 (``D(0) = 0``).

    References
    ----------
    Salomir R et al. Concepts Magn Reson B 2003;19B:26-34.
    """
    chi = np.asarray(chi)
    if chi.ndim not in (3, 4):
        raise ValueError(f"chi must be a 3-D array (or 4-D with maps last), got shape {chi.shape}")
    _, voxel_size = _check_grid(chi.shape[:3], voxel_size)
    direction = _unit_vector(b0_direction)
    dtype = np.float32 if chi.dtype == np.float32 else np.float64
    grid_shape = chi.shape[:3]
    if pad is None:
        pad = [n // 2 for n in grid_shape]
    pad = np.broadcast_to(np.asarray(pad, dtype=int), (3,))
    if np.any(pad < 0):
        raise ValueError(f"pad must be non-negative, got {tuple(pad)}")
    padded_shape = tuple(scipy.fft.next_fast_len(int(n + 2 * p), real=True) for n, p in zip(grid_shape, pad))
    kernel = _rfft_kernel(padded_shape, voxel_size, direction, dtype)
    # The object sits at offset ``pad``; the extra voxels from rounding go to the far side.
    region = tuple(slice(int(p), int(p) + n) for p, n in zip(pad, grid_shape))
    maps = chi[..., np.newaxis] if chi.ndim == 3 else chi
    field = np.empty(maps.shape, dtype=dtype)
    for index in range(maps.shape[-1]):
        padded = np.zeros(padded_shape, dtype=dtype)
        padded[region] = maps[..., index]
        spectrum = scipy.fft.rfftn(padded, workers=workers, overwrite_x=True)
        del padded
        spectrum *= kernel
        field[..., index] = scipy.fft.irfftn(spectrum, s=padded_shape, workers=workers, overwrite_x=True)[region]
        del spectrum
    return field[..., 0] if chi.ndim == 3 else field
