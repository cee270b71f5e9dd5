"""Apply a voxel-wise function over (masked) voxels in chunks to bound memory."""

import numpy as np

__all__ = ["check_mask", "apply_in_chunks"]


def check_mask(mask, leading_shape, *, name="mask"):
    """Return ``mask`` as a boolean array of ``leading_shape`` (all True if ``None``)."""
    leading_shape = tuple(leading_shape)
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != leading_shape:
        raise ValueError(f"{name} must have the leading shape of the data {leading_shape}, got {mask.shape}")
    return mask.astype(bool, copy=False)


def _flatten_voxelwise(array, leading_shape, n_voxels):
    """View ``array`` as (n_voxels, ...) if it is voxel-wise; pass scalars/None through."""
    if array is None:
        return None, False
    array = np.asarray(array)
    if array.ndim == 0:
        return array, False
    n_lead = len(leading_shape)
    if array.shape[:n_lead] != tuple(leading_shape):
        raise ValueError(
            f"voxel-wise input must start with the leading shape {tuple(leading_shape)}, got {array.shape}"
        )
    return array.reshape((n_voxels,) + array.shape[n_lead:]), True


def apply_in_chunks(
    function,
    voxelwise_inputs,
    *,
    leading_shape,
    output_shapes,
    mask=None,
    chunk_size=200_000,
    fill_value=0.0,
    dtype=np.float64,
    n_jobs=1,
):
    """Call ``function`` on chunks of voxels and scatter its outputs into full-size arrays.

    Parameters
    ----------
    function : callable
        ``function(*chunk_inputs) -> tuple of arrays`` with first axis the chunk's voxels; outputs
        have trailing shapes ``output_shapes``.
    voxelwise_inputs : sequence
        Arrays whose shape starts with ``leading_shape`` (sliced per chunk), or scalars / ``None``
        (passed unchanged).
    leading_shape : tuple of int
        Voxel grid shape.
    output_shapes : sequence of tuple
        Trailing shape of each output (``()`` for one value per voxel).
    mask : ndarray of bool, optional
        Voxels to process, of ``leading_shape``; others receive ``fill_value``.
    chunk_size : int, optional
        Voxels per call of ``function``.
    fill_value : float, optional
        Value for voxels outside ``mask``.
    dtype : dtype, optional
        Output dtype.
    n_jobs : int, optional
        Threads processing chunks concurrently (numpy releases the GIL in its array loops). Peak
        temporary memory grows with ``n_jobs``.

    Returns
    -------
    outputs : list of ndarray
        Each of shape ``leading_shape + output_shape``.
    """
    leading_shape = tuple(int(n) for n in leading_shape)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    n_voxels = int(np.prod(leading_shape, dtype=np.int64))
    flat_inputs = [_flatten_voxelwise(a, leading_shape, n_voxels) for a in voxelwise_inputs]
    outputs = [np.full((n_voxels,) + tuple(shape), fill_value, dtype=dtype) for shape in output_shapes]
    if mask is None:
        n_selected = n_voxels
        indices = None
    else:
        indices = np.flatnonzero(check_mask(mask, leading_shape).reshape(-1))
        n_selected = indices.size

    def process(start):
        stop = min(start + chunk_size, n_selected)
        selection = slice(start, stop) if indices is None else indices[start:stop]
        chunk_inputs = [a[selection] if is_voxelwise else a for a, is_voxelwise in flat_inputs]
        results = function(*chunk_inputs)
        # Chunks are disjoint, so concurrent writes never overlap.
        for output, result in zip(outputs, results):
            output[selection] = result

    starts = range(0, n_selected, chunk_size)
    if int(n_jobs) > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=int(n_jobs)) as pool:
            for future in [pool.submit(process, start) for start in starts]:
                future.result()
    else:
        for start in starts:
            process(start)
    return [o.reshape(leading_shape + tuple(shape)) for o, shape in zip(outputs, output_shapes)]
