"""FFT grids shared by the QSM steps: cropping to the mask, padding to fast sizes, finite differences.

Every k-space step works on a box around the mask, padded with zeros and rounded up to lengths that
:func:`scipy.fft.next_fast_len` accepts, in float32 (the field's relative precision of 1e-7 is far
below the noise of any MRI field map).
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy.sparse.linalg import LinearOperator, lsqr

from ..dipole import _check_grid, _rfft_kernel, _unit_vector


def check_volume(array, name, shape=None):
    """Return ``array`` as a 3-D float array, checking its shape against ``shape``."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array, got shape {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{name} must have the shape of the field {tuple(shape)}, got {array.shape}")
    return array


def check_mask_volume(mask, shape, name="mask"):
    """Return ``mask`` as a boolean array of ``shape``; it must select at least one voxel."""
    mask = check_volume(mask, name, shape).astype(bool, copy=False)
    if not mask.any():
        raise ValueError(f"{name} selects no voxel; pass the brain mask of the field")
    return mask


class PaddedGrid:
    """A box around a mask, padded with zeros to fast FFT lengths.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Region whose bounding box is kept.
    pad : int or sequence of 3 int
        Zero voxels added on each side of the bounding box (before rounding up to fast lengths).
    voxel_size : sequence of 3 float
        Voxel size in mm.
    workers : int
        Threads for :mod:`scipy.fft`.
    """

    def __init__(self, mask, pad, voxel_size, workers=-1):
        self.full_shape = mask.shape
        _, self.voxel_size = _check_grid(mask.shape, voxel_size)
        pad = np.broadcast_to(np.asarray(pad, dtype=int), (3,))
        if np.any(pad < 0):
            raise ValueError(f"pad must be non-negative, got {tuple(pad)}")
        where = np.nonzero(mask)
        low = np.array([w.min() for w in where])
        high = np.array([w.max() + 1 for w in where])
        self.box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        box_shape = high - low
        self.shape = tuple(scipy.fft.next_fast_len(int(n + 2 * p), real=True) for n, p in zip(box_shape, pad))
        self.inner = tuple(slice(int(p), int(p) + int(n)) for p, n in zip(pad, box_shape))
        self.workers = workers

    def embed(self, array, dtype=np.float32):
        """Copy the box of a full-size array into a zero-filled padded array."""
        padded = np.zeros(self.shape, dtype=dtype)
        padded[self.inner] = array[self.box]
        return padded

    def extract(self, padded, fill=0.0):
        """Put the box of a padded array back into a full-size array."""
        full = np.full(self.full_shape, fill, dtype=padded.dtype)
        full[self.box] = padded[self.inner]
        return full

    def rfft(self, array):
        return scipy.fft.rfftn(array, workers=self.workers)

    def irfft(self, spectrum):
        return scipy.fft.irfftn(spectrum, s=self.shape, workers=self.workers)

    def dipole(self, b0_direction):
        """Unit dipole kernel on this grid's rfft frequencies (``D(0) = 0``), float32."""
        return _rfft_kernel(self.shape, self.voxel_size, _unit_vector(b0_direction), np.float32)

    def frequency_axes(self):
        """Per-axis frequencies (cycles per voxel) broadcastable over the rfft grid."""
        axes = [np.fft.fftfreq(self.shape[0]), np.fft.fftfreq(self.shape[1]), np.fft.rfftfreq(self.shape[2])]
        return np.meshgrid(*[a.astype(np.float32) for a in axes], indexing="ij", sparse=True)

    def gradient_power(self):
        """``sum_i |E_i(k)|^2`` of the forward differences (1/mm^2) on the rfft grid."""
        power = np.zeros((1, 1, 1), dtype=np.float32)
        for frequency, h in zip(self.frequency_axes(), self.voxel_size):
            power = power + (2.0 - 2.0 * np.cos(2 * np.pi * frequency)) / np.float32(h * h)
        return power

    def ball(self, radius_mm):
        """Spectrum of the normalised ball of ``radius_mm`` centred at voxel 0 (real, float32)."""
        reach = np.floor(radius_mm / self.voxel_size).astype(int)
        offsets = [np.arange(-r, r + 1) for r in reach]
        dx, dy, dz = np.meshgrid(*[o * h for o, h in zip(offsets, self.voxel_size)], indexing="ij", sparse=True)
        inside = dx * dx + dy * dy + dz * dz <= radius_mm * radius_mm * (1 + 1e-9)
        kernel = np.zeros(self.shape, dtype=np.float32)
        index = np.nonzero(inside)
        coordinates = tuple((o[i] % n) for o, i, n in zip(offsets, index, self.shape))
        kernel[coordinates] = 1.0 / len(index[0])
        return self.rfft(kernel).real.astype(np.float32)


def forward_difference(array, voxel_size, out=None):
    """Periodic forward differences along the three axes, stacked first (units of array / mm)."""
    if out is None:
        out = np.empty((3,) + array.shape, dtype=array.dtype)
    for axis, h in enumerate(voxel_size):
        ahead = [slice(None)] * 3
        here = [slice(None)] * 3
        ahead[axis], here[axis] = slice(1, None), slice(None, -1)
        target = out[axis]
        np.subtract(array[tuple(ahead)], array[tuple(here)], out=target[tuple(here)])
        last = [slice(None)] * 3
        first = [slice(None)] * 3
        last[axis], first[axis] = slice(-1, None), slice(0, 1)
        np.subtract(array[tuple(first)], array[tuple(last)], out=target[tuple(last)])
        if h != 1:
            target *= np.asarray(1.0 / h, dtype=array.dtype)
    return out


def edges_touching(mask):
    """Whether each forward-difference edge has a voxel in ``mask``: shape ``(3,) + mask.shape``.

    Edge ``(axis, x)`` joins voxels ``x`` and ``x + e_axis`` (periodic, as
    :func:`forward_difference`). Judging an edge by both its voxels, not by the one it is stored
    at, keeps what depends on it the same whichever way an axis is stored.
    """
    return np.stack([mask | np.roll(mask, -1, axis) for axis in range(3)])


def forward_difference_adjoint(components, voxel_size):
    """Adjoint of :func:`forward_difference` (minus the backward-difference divergence)."""
    total = np.zeros(components.shape[1:], dtype=components.dtype)
    for axis, h in enumerate(voxel_size):
        component = components[axis]
        if h != 1:
            component = component * np.asarray(1.0 / h, dtype=components.dtype)
        behind = [slice(None)] * 3
        here = [slice(None)] * 3
        behind[axis], here[axis] = slice(None, -1), slice(1, None)
        total[tuple(here)] += component[tuple(behind)]
        first = [slice(None)] * 3
        last = [slice(None)] * 3
        first[axis], last[axis] = slice(0, 1), slice(-1, None)
        total[tuple(first)] += component[tuple(last)]
        total -= component
    return total


def solve_lsqr(matvec, rmatvec, n_unknowns, data, tol, max_iter):
    """LSQR on a matrix-free operator (float64 vectors), stopped at ``tol`` or ``max_iter``."""
    operator = LinearOperator((data.size, n_unknowns), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    return lsqr(operator, data, atol=tol, btol=tol, iter_lim=max_iter)[0]
