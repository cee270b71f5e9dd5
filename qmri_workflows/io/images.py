"""Load NIfTI volumes for the interfaces, with checks that turn bad inputs into clear errors."""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import BIDSInputError

__all__ = [
    "GRID_TOLERANCE_MM",
    "check_phase_radians",
    "load_phase",
    "load_phases",
    "load_volume",
    "load_volumes",
    "looks_like_radians",
    "read_image",
    "same_grid",
    "volume_data",
]

GRID_TOLERANCE_MM = 1e-3
"""Largest difference between affine entries (mm) for two images to count as on the same grid."""

# Scaled phase must look like radians: inside [-pi, 2 pi] (small rounding allowed), no wider than
# one turn, and at least a quarter turn wide (noise in air and wraps fill the range; a radian image
# read with an integer encoding's factor spans a few thousandths of a radian).
_RADIAN_TOLERANCE = 1e-2
_MIN_PHASE_SPAN = math.pi / 2


def same_grid(shape_a, affine_a, shape_b, affine_b, *, atol=GRID_TOLERANCE_MM):
    """Whether two images share their 3D voxel grid (shape and affine within ``atol`` mm)."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and np.allclose(
        np.asarray(affine_a), np.asarray(affine_b), atol=atol, rtol=0
    )


def load_volume(path, *, dtype=np.float32, reference=None, require_variation=False):
    """Load one 3D volume as an array of ``dtype`` (scaling applied).

    Parameters
    ----------
    path : str or Path
        NIfTI file. A 4D image with a single volume is accepted and squeezed.
    dtype : numpy dtype, optional
        dtype of the returned array.
    reference : nibabel image, optional
        When given, the file must lie on the same grid (shape and affine within
        :data:`GRID_TOLERANCE_MM`).
    require_variation : bool, optional
        For images that must hold signal (magnitudes): one holding the same value in every
        finite voxel (all zeros, say) is an input error too.

    Returns
    -------
    ndarray, shape (X, Y, Z)

    Raises
    ------
    BIDSInputError
        If the file cannot be read, is not 3D, holds no finite value, is off the reference grid, or
        (``require_variation``) is constant.
    """
    image = read_image(path)
    if reference is not None and not same_grid(image.shape, image.affine, reference.shape, reference.affine):
        raise BIDSInputError(
            f"image {path} (shape {image.shape[:3]}) is not on the grid of "
            f"{getattr(reference, 'get_filename', lambda: 'the reference')()} (shape {reference.shape[:3]}); "
            "resample it onto the same grid or re-export the series together"
        )
    data = volume_data(_in_memory(image, path), path, dtype=dtype)
    if require_variation:
        _check_variation(data, path)
    return data


def _check_variation(data, name):
    low, high = data.min(), data.max()
    if low != high and np.isfinite(low) and np.isfinite(high):
        return  # the usual case, decided without copying the finite values out
    values = data[np.isfinite(data)] if data.dtype.kind == "f" else data.reshape(-1)
    low, high = values.min(), values.max()
    if low == high:
        content = "only zeros" if low == 0 else f"the same value ({low:g}) in every voxel"
        if values.size < data.size:
            content += f" and {data.size - values.size} NaN/Inf"
        raise BIDSInputError(
            f"image {name} holds {content}: there is no signal in it (a failed reconstruction or "
            "export?); export the series again from the scanner data, or remove this file and its "
            "sidecar from the dataset"
        )


def load_volumes(paths, *, dtype=np.float32, reference=None, require_variation=False, max_threads=None):
    """Load several 3D volumes on one grid into one array, files read in parallel threads.

    Decompressing a ``.nii.gz`` is most of the time it takes to load it, and zlib releases the GIL
    while it inflates, so threads read several files at once.

    Parameters
    ----------
    paths : sequence of str or Path
        NIfTI files, each one 3D volume (or a 4D image holding one).
    dtype : numpy dtype, optional
        dtype of the returned array.
    reference : nibabel image, optional
        Grid every file must lie on (shape and affine within :data:`GRID_TOLERANCE_MM`); the first
        file's when None.
    require_variation : bool, optional
        As :func:`load_volume`: a file holding one value in every finite voxel is an input error.
    max_threads : int, optional
        Files read at once; the number of CPUs (at most the number of files) when None.

    Returns
    -------
    ndarray, shape (X, Y, Z, len(paths))
        Volume ``i`` in ``[..., i]``.

    Raises
    ------
    BIDSInputError
        As :func:`load_volume`, for the first file (in the order of ``paths``) that fails.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    if not paths:
        raise ValueError("load_volumes needs at least one file")
    if reference is None:
        reference = read_image(paths[0])
    volumes = np.empty(tuple(reference.shape[:3]) + (len(paths),), dtype=dtype)

    def load(index):
        volumes[..., index] = load_volume(
            paths[index], dtype=dtype, reference=reference, require_variation=require_variation
        )

    threads = min(len(paths), max_threads or os.cpu_count() or 1)
    if threads == 1:
        for index in range(len(paths)):
            load(index)
        return volumes
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(load, index) for index in range(len(paths))]
        for future in futures:
            future.result()  # re-raises the first failure in file order
    return volumes


def read_image(path):
    """Open a NIfTI file (header only; data stay on disk until used).

    Raises
    ------
    BIDSInputError
        If nibabel cannot read the file.
    """
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises several types for corrupt or foreign files
        raise BIDSInputError(f"cannot read image {path}: {error}") from error


def _in_memory(image, path):
    """``image`` with its data decompressed into memory by ISA-L when the file is gzipped.

    Inflating is most of the cost of reading a ``.nii.gz``; ISA-L (the ``isal`` package, wheels with
    the compiled library for every common platform) inflates about twice as fast as zlib, which
    nibabel uses. Without ``isal``, or for uncompressed files, nibabel reads the file itself.
    """
    if not str(path).endswith(".gz") or not hasattr(image, "from_bytes"):
        return image
    try:
        from isal import igzip
    except ImportError:
        return image
    try:
        with open(path, "rb") as handle:
            return type(image).from_bytes(igzip.decompress(handle.read()))
    except Exception as error:  # isal raises several types for damaged streams
        raise BIDSInputError(
            f"cannot read image {path}: its gzip data are damaged ({error}); copy or export the file again"
        ) from error


def gzip_module():
    """ISA-L's gzip (``isal.igzip``, several times faster than zlib at low levels) when installed,
    else the standard library's."""
    try:
        from isal import igzip
    except ImportError:
        import gzip

        return gzip
    return igzip


def save_image(image, path):
    """Write a single-file nibabel image to ``path``; a ``.gz`` path is compressed by
    :func:`gzip_module` at level 1 (nibabel's level; ISA-L deflates it about five times faster
    than the zlib nibabel uses, and writing the maps is a visible share of a run)."""
    path = os.fspath(path)
    if not path.endswith(".gz"):
        image.to_filename(path)
        return
    with gzip_module().open(path, "wb", compresslevel=1) as stream:
        image.to_file_map(image.make_file_map({"image": stream}))


def volume_data(image, name, *, dtype=np.float32):
    """The data of a single-volume image as a 3D array of ``dtype`` (scaling applied).

    Parameters
    ----------
    image : nibabel image
        A 3D image, or a 4D image holding a single volume (squeezed).
    name : str or Path
        How error messages name the image (usually its file).
    dtype : numpy dtype, optional
        dtype of the returned array.

    Raises
    ------
    BIDSInputError
        If the image is not 3D or holds no finite value.
    """
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BIDSInputError(
            f"image {name} has shape {image.shape}; a single 3D volume is expected (split 4D files "
            "into one file per echo/flip angle as BIDS describes)"
        )
    data = np.asarray(image.dataobj, dtype=dtype).reshape(shape)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.any():
            raise BIDSInputError(
                f"image {name} holds no finite value (all NaN/Inf): there is no signal in it; export "
                "it again, or remove this file and its sidecar from the dataset"
            )
    return data


def load_phase(path, phase_scale, *, dtype=np.float32, reference=None):
    """Load a phase volume in radians: the stored values times ``phase_scale``.

    ``phase_scale`` comes from :func:`qmri_workflows.io.query.collect_inputs` (1.0 when the sidecar
    says ``"Units": "rad"``; e.g. pi/4096 for Siemens integer phase). Values are not re-wrapped;
    an integer encoding such as 0..4095 maps onto [0, 2*pi), which is the same phase modulo 2*pi.

    Raises
    ------
    BIDSInputError
        As :func:`load_volume`, or for a non-positive/non-finite ``phase_scale``.
    """
    _check_phase_scale(path, phase_scale)
    data = load_volume(path, dtype=np.float64, reference=reference)
    return (data * float(phase_scale)).astype(dtype, copy=False)


def load_phases(paths, phase_scales, *, reference=None, max_threads=None):
    """Load several phase volumes in radians into one float32 array, files read in parallel threads.

    As :func:`load_phase` for each file (``phase_scales`` one per file), stacked as
    :func:`load_volumes` stacks volumes: shape ``(X, Y, Z, len(paths))``.
    """
    paths = list(paths)
    if len(phase_scales) != len(paths):
        raise ValueError(f"load_phases needs one phase scale per file, got {len(phase_scales)} for {len(paths)}")
    for path, phase_scale in zip(paths, phase_scales):
        _check_phase_scale(path, phase_scale)
    # float32 holds scanner integer phase (12-16 bit) exactly, so scaling after loading loses nothing
    data = load_volumes(paths, reference=reference, max_threads=max_threads)
    data *= np.asarray(phase_scales, dtype=np.float32)
    return data


def _check_phase_scale(path, phase_scale):
    if phase_scale is None or not np.isfinite(phase_scale) or phase_scale <= 0:
        raise BIDSInputError(f"phase image {path}: invalid phase scale {phase_scale!r} (need a positive number)")


def looks_like_radians(low, high):
    """Whether the range ``[low, high]`` of a phase image (in radians) looks like wrapped phase.

    Inside [-pi, 2 pi] (small rounding allowed), no wider than one turn and at least a quarter turn
    wide.
    """
    span = high - low
    return (
        low >= -math.pi - _RADIAN_TOLERANCE
        and high <= 2 * math.pi + _RADIAN_TOLERANCE
        and _MIN_PHASE_SPAN <= span <= 2 * math.pi + _RADIAN_TOLERANCE
    )


def check_phase_radians(phase, path, phase_scale, *, image="echo"):
    """Raise if a phase volume multiplied by ``phase_scale`` does not look like wrapped radians.

    The query layer finds the factor to radians of a series from the sidecar ``"Units"`` of its
    first phase image or, without one, from that image's values; it does not read the others, nor
    the values of a labelled one. This checks every image of the series against that factor, so a
    wrong ``"Units"`` (scanner integers labelled "rad", radians labelled "deg") or one image exported
    differently is caught before its phase is used.

    Parameters
    ----------
    phase : ndarray
        Phase in radians (stored values times ``phase_scale``); non-finite values are ignored.
    path : str
        The file, for the message.
    phase_scale : float
        Factor to radians used.
    image : str, optional
        What one image of the series is ("echo", "phase cycle"), for the message.

    Raises
    ------
    BIDSInputError
        Naming ``path``, its range and the fix.
    """
    low, high = float(np.min(phase)), float(np.max(phase))
    if not (np.isfinite(low) and np.isfinite(high)):  # rare: only then pay for the finite subset
        values = phase[np.isfinite(phase)]
        low, high = float(values.min()), float(values.max())
    if not looks_like_radians(low, high):
        raise BIDSInputError(
            f"phase image {path} is not wrapped phase in the units of the first {image} of its series: "
            f"multiplied by {phase_scale:.6g} (the factor to radians found for {image} 1, from its sidecar "
            f'"Units" or its values) its values span [{low:.4g}, {high:.4g}], not one turn of radians; '
            f"export every {image} of the series as wrapped phase in the same units (all radians, or all "
            'scanner integers) and give every phase sidecar the "Units" of its values ("rad", "deg", or '
            "none for scanner integers)"
        )
