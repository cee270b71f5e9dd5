"""Phase unwrapping: echo-referenced (temporal), Laplacian, and quality-guided region growing.

The phase is coil-combined and in radians (``[-pi, pi)`` when wrapped); echo times in seconds.

* :func:`unwrap_echoes` unwraps each echo against the phase predicted from the echoes before it, so
  phase steps larger than pi between neighbouring voxels at late echoes (near strong sources along B0)
  are no problem: only the short-baseline difference of the first two echoes and the phase offset,
  both smooth, are unwrapped in space.
* :func:`unwrap_laplacian` is fast and robust but returns a Laplacian-filtered phase (true up to a
  harmonic function), good before SHARP-type background removal, not as exact phase.
* :func:`unwrap_region_growing` keeps the true values (ROMEO-like): it integrates wrapped differences
  along the maximum spanning tree of the voxel graph weighted by phase coherence and magnitude, which
  is exactly the order in which a priority-queue region growing from a seed would visit the voxels
  (Prim's algorithm), computed by :func:`scipy.sparse.csgraph.minimum_spanning_tree`.

References
----------
Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. Opt Lett
2003;28:1194-1196.

Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid opensource minimum
spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.

Robinson SD, Bredies K, Khabipova D, et al. An illustrated comparison of processing methods for MR
phase imaging and QSM: combining array coil signals and phase unwrapping. NMR Biomed 2017;30:e3601.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from .._chunks import apply_in_chunks
from ._grid import check_mask_volume, check_volume

__all__ = ["wrap_phase", "combine_series", "unwrap_laplacian", "unwrap_region_growing", "unwrap_echoes"]

TWO_PI = 2.0 * np.pi


def wrap_phase(phase):
    """Wrap a phase (radians) into ``[-pi, pi)``."""
    phase = np.asarray(phase)
    return (phase + np.pi) % TWO_PI - np.pi


def combine_series(magnitudes, phases, *, n_jobs=1):
    """Combine multi-echo series acquired with the same echo times (several flip angles) into one.

    Each series keeps its own phase offset (RF phase, receive phase differ between acquisitions), so
    its offset relative to the first series, ``angle(sum_n S_k,n conj(S_1,n))`` over echoes, is removed
    first; then the echoes are averaged with weights ``|S|``, normalised so that the noise SD stays
    that of one acquisition::

        S_n = sum_k |S_k,n| S_k,n exp(-i offset_k) / sqrt(sum_k |S_k,n|^2)

    The phase SNR of a voxel is proportional to its magnitude, so this weighting maximises the phase
    SNR of the combination; the returned magnitude is proportional to it.

    Parameters
    ----------
    magnitudes, phases : sequence of ndarray, each shape (X, Y, Z, N)
        Magnitude and phase (radians) of each series, echoes last; all of one shape.
    n_jobs : int, optional
        Threads combining chunks of voxels at once.

    Returns
    -------
    magnitude, phase : ndarray, shape (X, Y, Z, N), float32
        The combined series (phase wrapped into ``[-pi, pi]``); 0 where every series is 0.
    """
    if len(magnitudes) != len(phases) or not magnitudes:
        raise ValueError("combine_series needs one phase per magnitude and at least one series")
    shape = np.shape(magnitudes[0])
    if len(shape) != 4 or any(np.shape(array) != shape for array in (*magnitudes, *phases)):
        raise ValueError(f"every magnitude and phase must have the 4-D shape {shape} (echoes last)")
    n_series = len(magnitudes)

    def combine(*arrays):
        return _combine_chunk(arrays[:n_series], arrays[n_series:])

    # Chunks keep the temporaries small enough for the allocator to reuse (no page faults per pass).
    return apply_in_chunks(
        combine,
        [*magnitudes, *phases],
        leading_shape=shape[:3],
        output_shapes=[shape[3:], shape[3:]],
        chunk_size=100_000,
        dtype=np.float32,
        n_jobs=n_jobs,
    )


def _combine_chunk(magnitudes, phases):
    # Real arithmetic in float32 on (magnitude, phase): complex64 exp/abs cost several times more.
    reference_magnitude = magnitudes[0].astype(np.float32, copy=False)
    reference_phase = phases[0].astype(np.float32, copy=False)
    power = np.square(reference_magnitude)
    total_real = power * np.cos(reference_phase)
    total_imag = power * np.sin(reference_phase)
    for magnitude, phase in zip(magnitudes[1:], phases[1:]):
        magnitude = magnitude.astype(np.float32, copy=False)
        phase = phase.astype(np.float32, copy=False)
        weight = magnitude * reference_magnitude
        difference = phase - reference_phase
        offset = np.arctan2(
            (weight * np.sin(difference)).sum(-1, keepdims=True, dtype=np.float64),
            (weight * np.cos(difference)).sum(-1, keepdims=True, dtype=np.float64),
        ).astype(np.float32)
        squared = np.square(magnitude)
        shifted = phase - offset
        total_real += squared * np.cos(shifted)
        total_imag += squared * np.sin(shifted)
        power += squared
    with np.errstate(invalid="ignore", divide="ignore"):
        magnitude = np.where(power > 0, np.hypot(total_real, total_imag) / np.sqrt(power), 0)
    return magnitude, np.arctan2(total_imag, total_real)


def _laplacian_reflect(array, voxel_size):
    """Discrete 7-point Laplacian with half-sample symmetric borders (the DCT-II boundary)."""
    total = np.zeros_like(array)
    for axis, h in enumerate(voxel_size):
        total += ndimage.correlate1d(array, [1.0, -2.0, 1.0], axis=axis, mode="reflect") / (h * h)
    return total


def unwrap_laplacian(phase, voxel_size=(1.0, 1.0, 1.0), *, mask=None, congruent=False, workers=-1):
    """Laplacian phase unwrapping (Schofield & Zhu 2003), solved with discrete cosine transforms.

    Uses ``lap(phi) = cos(phi) lap(sin(phi)) - sin(phi) lap(cos(phi))``, which needs no unwrapping,
    and inverts the Laplacian with Neumann boundaries.

    Parameters
    ----------
    phase : ndarray, shape (X, Y, Z)
        Wrapped phase in radians.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm (only the ratios matter).
    mask : ndarray of bool, optional
        Voxels to return; others are set to 0. The whole array enters the Laplacian.
    congruent : bool, optional
        Return ``phase + 2 pi round((unwrapped - phase) / 2 pi)`` instead: values congruent with the
        input (true values wherever the harmonic error of the Laplacian solution stays below pi).
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    unwrapped : ndarray, shape (X, Y, Z), float64
        Unwrapped phase in radians, mean 0 over the array unless ``congruent``.
    """
    phase = check_volume(phase, "phase").astype(np.float64)
    voxel_size = np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))
    sine, cosine = np.sin(phase), np.cos(phase)
    laplacian = cosine * _laplacian_reflect(sine, voxel_size) - sine * _laplacian_reflect(cosine, voxel_size)
    spectrum = scipy.fft.dctn(laplacian, type=2, workers=workers)
    eigenvalues = np.zeros((1, 1, 1))
    for axis, (n, h) in enumerate(zip(phase.shape, voxel_size)):
        shape = [1, 1, 1]
        shape[axis] = n
        eigenvalues = eigenvalues + ((2 * np.cos(np.pi * np.arange(n) / n) - 2) / (h * h)).reshape(shape)
    eigenvalues[0, 0, 0] = 1.0
    spectrum /= eigenvalues
    spectrum[0, 0, 0] = 0.0
    unwrapped = scipy.fft.idctn(spectrum, type=2, workers=workers)
    if congruent:
        unwrapped = phase + TWO_PI * np.rint((unwrapped - phase) / TWO_PI)
    if mask is not None:
        unwrapped *= check_mask_volume(mask, phase.shape)
    return unwrapped


def _edge_quality(phase, magnitude, first, second):
    """Quality in [0, 1] of the edges between voxels ``first`` and ``second`` (flat indices)."""
    difference = wrap_phase(phase[second] - phase[first])
    quality = 1.0 - np.abs(difference) / np.pi
    if magnitude is not None:
        low = np.minimum(magnitude[first], magnitude[second])
        high = np.maximum(magnitude[first], magnitude[second])
        quality *= low / np.maximum(high, np.finfo(float).tiny)
        reference = np.percentile(magnitude, 90) if magnitude.size else 1.0
        quality *= np.clip(low / max(reference, np.finfo(float).tiny), 0.0, 1.0)
    return quality


def unwrap_region_growing(phase, *, magnitude=None, mask=None):
    """Quality-guided region-growing unwrapping that keeps the true phase values (ROMEO-like).

    Each pair of face-neighbouring voxels in the mask is an edge of quality
    ``(1 - |wrap(dphi)| / pi) * min(m) / max(m) * min(1, min(m) / m_90)`` (phase coherence, magnitude
    coherence, magnitude level; ``m_90`` the 90th percentile of the magnitude in the mask). The
    maximum spanning tree of that graph is the visiting order of a priority-queue region growing
    that always adds the best edge at the border of the grown region; the phase is integrated along
    it from one seed per connected region (the voxel of largest magnitude), with integer multiples
    of 2 pi accumulated by pointer jumping (about log2(depth) vectorised passes).

    Parameters
    ----------
    phase : ndarray, shape (X, Y, Z)
        Wrapped phase in radians.
    magnitude : ndarray, shape (X, Y, Z), optional
        Magnitude image (any units) for the edge weights; without it only phase coherence is used.
    mask : ndarray of bool, optional
        Voxels to unwrap (all by default); others are returned unchanged.

    Returns
    -------
    unwrapped : ndarray, shape (X, Y, Z), float64
        ``phase + 2 pi k`` with integer ``k``; equal to the true phase up to one multiple of 2 pi per
        connected region of the mask wherever the tree never crosses a true step larger than pi.

    References
    ----------
    Dymerska B et al. Magn Reson Med 2021;85:2294-2308.
    """
    phase = check_volume(phase, "phase").astype(np.float64)
    shape = phase.shape
    mask = np.ones(shape, bool) if mask is None else check_mask_volume(mask, shape)
    if magnitude is not None:
        magnitude = check_volume(magnitude, "magnitude", shape)
    parent = _spanning_forest(phase, magnitude, mask)
    unwrapped = phase.copy()
    unwrapped[mask] = _integrate_along(parent, phase[mask])
    return unwrapped


def _spanning_forest(phase, magnitude, mask):
    """Parent of each mask voxel (flat mask order) in the maximum-quality spanning forest.

    Seeds (one per connected region, the voxel of largest magnitude) have parent ``n_voxels``.
    """
    n_voxels = int(mask.sum())
    index = np.full(mask.shape, -1, dtype=np.int64)
    index[mask] = np.arange(n_voxels)
    flat_phase = phase[mask].astype(np.float64)
    flat_magnitude = None if magnitude is None else magnitude[mask].astype(np.float64)

    firsts, seconds = [], []
    for axis in range(3):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        a, b = index[tuple(low)].ravel(), index[tuple(high)].ravel()
        keep = (a >= 0) & (b >= 0)
        firsts.append(a[keep])
        seconds.append(b[keep])
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    quality = _edge_quality(flat_phase, flat_magnitude, first, second)
    # Explicit zeros would be read as missing edges: keep every cost strictly positive.
    cost = (1.0 - quality) + 1e-6
    graph = coo_matrix((cost, (first, second)), shape=(n_voxels, n_voxels)).tocsr()
    tree = minimum_spanning_tree(graph)
    del graph

    # One seed per connected region, joined to a virtual root so a single traversal orders all.
    _, labels = connected_components(tree, directed=False)
    order = np.lexsort((-(flat_magnitude if flat_magnitude is not None else np.zeros(n_voxels)), labels))
    seeds = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    tree = tree.tocoo()
    root = n_voxels
    rows = np.concatenate([tree.row, np.full(len(seeds), root)])
    cols = np.concatenate([tree.col, seeds])
    forest = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_voxels + 1,) * 2).tocsr()
    _, predecessors = breadth_first_order(forest, root, directed=False, return_predecessors=True)
    parent = predecessors[:n_voxels].astype(np.int64)
    parent[seeds] = root
    return parent


def _integrate_along(parent, flat_phase):
    """Unwrap ``flat_phase`` by integrating wrapped differences from each seed along ``parent``."""
    n_voxels = len(parent)
    root = n_voxels
    extended_phase = np.append(flat_phase, 0.0)
    steps = np.zeros(n_voxels + 1, dtype=np.int64)
    child = np.flatnonzero(parent != root)
    steps[child] = -np.rint((flat_phase[child] - extended_phase[parent[child]]) / TWO_PI)
    # Pointer jumping: after pass j each voxel holds the sum of steps over 2^j tree edges.
    pointer = np.append(parent, root)
    while np.any(pointer[:n_voxels] != root):
        steps = steps + steps[pointer]
        pointer = pointer[pointer]
    return flat_phase + TWO_PI * steps[:n_voxels]


def _spatial_unwrapper(method):
    if callable(method):
        return method
    if method == "region_growing":
        return lambda phase, magnitude, mask, voxel_size: unwrap_region_growing(phase, magnitude=magnitude, mask=mask)
    if method == "laplacian":
        return lambda phase, magnitude, mask, voxel_size: unwrap_laplacian(phase, voxel_size, mask=mask, congruent=True)
    raise ValueError(f"spatial_method must be 'region_growing', 'laplacian' or a callable, got {method!r}")


def unwrap_echoes(
    phase, echo_times, *, magnitude=None, mask=None, voxel_size=(1.0, 1.0, 1.0), spatial_method="region_growing"
):
    """Echo-referenced (temporal) unwrapping of multi-echo phase.

    1. The phase difference of the first two echoes, ``wrap(phi_2 - phi_1)``, spans the shortest
       echo spacing and has no phase offset: it is unwrapped in space (``spatial_method``), giving a
       first angular frequency ``omega = dphi / dTE`` (rad/s).
    2. The offset ``phi_0 = wrap(phi_1 - omega TE_1)`` is smooth and unwrapped in space too.
    3. Echo by echo, the phase predicted from the echoes already unwrapped,
       ``phi_0 + omega TE_n``, is the reference: ``unwrapped_n = pred + wrap(phi_n - pred)``; then
       ``phi_0`` and ``omega`` are re-fitted (weights magnitude^2) over echoes 1..n, so the
       prediction improves with the baseline.

    Each voxel's late echoes are unwrapped independently of its neighbours, so phase steps larger
    than pi between voxels at late echoes do not matter as long as the prediction error stays below
    pi.

    Parameters
    ----------
    phase : ndarray, shape (X, Y, Z, N)
        Wrapped phase in radians, echoes last.
    echo_times : sequence of N float
        Echo times in seconds, strictly increasing.
    magnitude : ndarray, shape (X, Y, Z, N), optional
        Magnitude per echo: weights of the re-fits and of the spatial unwrapping.
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels to unwrap; others are returned as given.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm (for the Laplacian method).
    spatial_method : {'region_growing', 'laplacian'} or callable, optional
        Spatial unwrapper of the echo difference and the offset; a callable is called as
        ``f(phase, magnitude, mask, voxel_size)`` and must return values congruent to its input.

    Returns
    -------
    unwrapped : ndarray, shape (X, Y, Z, N)
        Unwrapped phase in radians (float32 for float32 input, float64 otherwise); equal to the
        true phase up to one multiple of 2 pi per connected region (the same for all echoes).
    """
    phase = np.asarray(phase)
    if not np.issubdtype(phase.dtype, np.floating):
        phase = phase.astype(np.float64)
    if phase.ndim != 4:
        raise ValueError(f"phase must be 4-D with echoes last, got shape {phase.shape}")
    echo_times = np.asarray(echo_times, dtype=np.float64)
    n_echoes = phase.shape[-1]
    if echo_times.shape != (n_echoes,):
        raise ValueError(f"echo_times must have {n_echoes} values (one per echo), got {echo_times.shape}")
    if n_echoes > 1 and np.any(np.diff(echo_times) <= 0):
        raise ValueError(f"echo_times must increase strictly, got {echo_times.tolist()}")
    shape = phase.shape[:3]
    mask = np.ones(shape, bool) if mask is None else check_mask_volume(mask, shape)
    if magnitude is not None:
        magnitude = np.asarray(magnitude)
        if magnitude.shape != phase.shape:
            raise ValueError(f"magnitude must have the shape of phase {phase.shape}, got {magnitude.shape}")
    spatial = _spatial_unwrapper(spatial_method)
    first_magnitude = None if magnitude is None else magnitude[..., 0]
    if n_echoes == 1:
        return spatial(phase[..., 0], first_magnitude, mask, voxel_size)[..., np.newaxis]

    spacing = echo_times[1] - echo_times[0]
    difference = wrap_phase(phase[..., 1] - phase[..., 0])
    pair_magnitude = None if magnitude is None else np.sqrt(magnitude[..., 0].astype(np.float64) * magnitude[..., 1])
    if spatial_method == "region_growing":
        # The offset is smooth: the difference's spanning forest serves it too (one tree, not two).
        parent = _spanning_forest(difference, pair_magnitude, mask)
        omega = _integrate_along(parent, difference[mask].astype(np.float64)) / spacing
        offset = _integrate_along(parent, wrap_phase(phase[mask, 0] - omega * echo_times[0]))
    else:
        omega = spatial(difference, pair_magnitude, mask, voxel_size)[mask] / spacing
        offset_wrapped = np.zeros(shape)
        offset_wrapped[mask] = wrap_phase(phase[mask, 0] - omega * echo_times[0])
        offset = spatial(offset_wrapped, first_magnitude, mask, voxel_size)[mask]

    measured = phase[mask].astype(np.float64)
    weights = np.ones_like(measured) if magnitude is None else magnitude[mask].astype(np.float64) ** 2
    unwrapped_voxels = np.empty_like(measured)
    sums = np.zeros((5, measured.shape[0]))  # S0, S1, S2, Sy, Sty of the weighted line fit
    for echo, echo_time in enumerate(echo_times):
        predicted = offset + omega * echo_time
        unwrapped_voxels[:, echo] = predicted + wrap_phase(measured[:, echo] - predicted)
        w = weights[:, echo]
        y = unwrapped_voxels[:, echo]
        sums += np.stack([w, w * echo_time, w * echo_time**2, w * y, w * echo_time * y])
        if echo >= 1:
            s0, s1, s2, sy, sty = sums
            determinant = s0 * s2 - s1 * s1
            valid = determinant > 1e-12 * np.maximum(s0 * s2, np.finfo(float).tiny)
            omega = np.where(valid, (s0 * sty - s1 * sy) / np.where(valid, determinant, 1), omega)
            offset = np.where(valid, (s2 * sy - s1 * sty) / np.where(valid, determinant, 1), offset)
    unwrapped = phase.copy()
    unwrapped[mask] = unwrapped_voxels
    return unwrapped
