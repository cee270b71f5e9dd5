"""Anatomy of the phantom: tissue volume fractions on a cropped, isotropic grid.

The brain comes from the MNI ICBM152 2009a nonlinear symmetric template maps that nilearn ships inside
its package (no download): grey- and white-matter probability maps and the skull-stripped T1 template.
No CSF map is shipped, so CSF = intracranial support - GM - WM, where the support is the T1 template's
non-zero region (largest connected component, holes filled). Deep grey-matter nuclei are smooth
ellipsoids, lesions are spheres placed from a seed, and skull and scalp are shells grown outwards from
the brain by a distance in mm. The patient's atrophy (``tissues.PATIENT_ATROPHY``) shrinks the nuclei'
ellipsoids, turns part of each voxel's cortex into CSF and grows the ventricles by a shell of the
thickness that gives their volume change (:func:`_grow_ventricles`).

Partial volume
--------------
Template fractions are resampled with linear interpolation, after a Gaussian anti-alias filter when the
grid is coarser than 1 mm (FWHM sqrt(h^2 - 1) mm for voxel size h mm, so that the effective resolution
is h). Analytic shapes (nuclei, lesions, shells) get the partial-volume fraction of a voxel cut by a
plane at the signed distance d from its centre, ``clip(0.5 - d / h, 0, 1)``.

References
----------
Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate
brain templates from birth to adulthood. NeuroImage 2009;47:S102.

Fonov V, Evans AC, Botteron K, et al. Unbiased average age-appropriate atlases for pediatric studies.
NeuroImage 2011;54:313-327.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qmri_workflows.core.smoothing import FWHM_TO_SIGMA

from .tissues import (
    AIR_CAVITIES,
    CENTRAL_VEIN_LESION_MIN_DIAMETER_MM,
    CENTRAL_VEIN_RADIUS_MM,
    CHRONIC_ACTIVE_RIM_MM,
    CORTICAL_LESIONS,
    DEEP_GREY_NUCLEI,
    EAR_CANALS,
    NECK,
    PATIENT_ATROPHY,
    SAGITTAL_SINUS,
    WM_LESIONS,
)

__all__ = [
    "TEMPLATE_FILES",
    "template_directory",
    "load_template",
    "Lesion",
    "place_lesions",
    "LocalFraction",
    "dense",
    "Anatomy",
    "build_anatomy",
    "SKULL_THICKNESS_MM",
    "SCALP_THICKNESS_MM",
    "AIR_MARGIN_MM",
]

TEMPLATE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}

#: Shell thicknesses outside the intracranial support, and the air kept around the head (mm).
SKULL_THICKNESS_MM = 7.0
SCALP_THICKNESS_MM = 6.0
AIR_MARGIN_MM = 10.0

# Lesion placement: minimal gap (mm) between lesions, and between a WM lesion's edge and non-WM.
_LESION_GAP_MM = 3.0
_WM_CLEARANCE_MM = 2.0
# White matter at least this pure counts as deep white matter for placement.
_DEEP_WM_FRACTION = 0.9
_CORTEX_FRACTION = 0.85
# Lesions stay above this MNI z (mm): supratentorial brain.
_MIN_LESION_Z_MM = -10.0
# Width (mm) of the smooth edge of the deep grey-matter ellipsoids (at least one voxel).
_NUCLEUS_EDGE_MM = 2.0
# Ventricles: CSF (fraction >= 0.5) at least this deep inside the intracranial support (sulcal CSF
# lies within about a centimetre of the surface).
_VENTRICLE_DEPTH_MM = 15.0


def _nuclei(subject):
    """:data:`~.tissues.DEEP_GREY_NUCLEI`, with the patient's ellipsoids scaled to their atrophy."""
    if subject != "patient":
        return DEEP_GREY_NUCLEI
    return tuple(
        (name, centre, tuple(a * (1 + PATIENT_ATROPHY[name]) ** (1 / 3) for a in semi_axes))
        for name, centre, semi_axes in DEEP_GREY_NUCLEI
    )


def _grow_ventricles(csf, gm, wm, support, resolution, change):
    """Turn the parenchyma of a shell around the ventricles into CSF (in place).

    The ventricles are the CSF (fraction >= 0.5) deeper than ``_VENTRICLE_DEPTH_MM`` in the support;
    the shell's thickness is found by bisection so that the CSF added equals ``change`` times their
    CSF volume. Returns the ventricle volume before and the volume added (mm^3).
    """
    depth = ndimage.distance_transform_edt(support >= 0.5, sampling=resolution)
    ventricles = (csf >= 0.5) & (depth >= _VENTRICLE_DEPTH_MM)
    voxel_volume = resolution**3
    before = float(csf[ventricles].sum()) * voxel_volume
    if not ventricles.any() or change <= 0:
        return before, 0.0
    # work in the ventricles' box plus the largest shell considered (20 mm)
    margin = int(np.ceil(20.0 / resolution)) + 1
    index = np.argwhere(ventricles)
    box = tuple(slice(max(lo - margin, 0), hi + margin + 1) for lo, hi in zip(index.min(0), index.max(0)))
    csf, gm, wm, ventricles = csf[box], gm[box], wm[box], ventricles[box]
    # distance from the ventricle surface (half a voxel beyond the outermost ventricle centres)
    outside = (ndimage.distance_transform_edt(~ventricles, sampling=resolution) - resolution / 2).astype(np.float32)
    parenchyma = gm + wm

    def added(thickness):
        return _plane_fraction(outside - thickness, resolution) * (~ventricles)

    low, high = 0.0, 20.0
    for _ in range(40):
        middle = (low + high) / 2
        if float((added(middle) * parenchyma).sum()) * voxel_volume < change * before:
            low = middle
        else:
            high = middle
    shell = added((low + high) / 2)
    csf += shell * parenchyma
    gm *= 1 - shell
    wm *= 1 - shell
    return before, float((shell * parenchyma).sum()) * voxel_volume


def template_directory():
    """Folder of nilearn's packaged MNI152 2009a maps (found without importing nilearn).

    Raises
    ------
    ImportError
        If nilearn (the ``phantom`` extra) is not installed or lacks the maps.
    """
    import importlib.util
    from pathlib import Path

    # find_spec locates the package without executing it (importing nilearn.datasets would pull
    # in scikit-learn and cost seconds).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The digital phantom needs nilearn for its MNI152 template maps; install it with "
            "`pip install qmri-workflows[phantom]`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise ImportError(
            f"nilearn at {folder.parent.parent} lacks the template maps {missing}; "
            "reinstall it with `pip install qmri-workflows[phantom]`."
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_template():
    """Load the template as fractions at 1 mm.

    Returns
    -------
    gm, wm, support : ndarray of float32, shape (197, 233, 189)
        Grey-matter and white-matter fractions (0..1, zero outside the support) and the binary
        intracranial support (brain plus CSF) as 0/1.
    affine : ndarray, shape (4, 4)
        Voxel -> MNI mm of the template grid (axis-aligned, 1 mm).
    """
    import nibabel as nib

    folder = template_directory()
    images = {}
    for key, name in TEMPLATE_FILES.items():
        images[key] = nib.load(folder / name)
    affine = images["t1"].affine.copy()
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"expected a 1 mm RAS template grid, got affine\n{affine}")
    t1 = np.asarray(images["t1"].dataobj)
    support = _clean_support(t1 > 0)
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / np.float32(255)
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / np.float32(255)
    gm *= support
    wm *= support
    # The maps are probabilities summing to at most 1; rounding to uint8 can exceed it by 1/255.
    excess = np.maximum(gm + wm - 1, 0)
    gm -= excess
    for array in (gm, wm, support):
        array.setflags(write=False)
    return gm, wm, support.astype(np.float32), affine


def _clean_support(mask):
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == np.argmax(sizes)
    return ndimage.binary_fill_holes(mask)


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion: compartment name, centre (MNI mm) and radius (mm)."""

    compartment: str
    centre: tuple
    radius: float


def _inside_nuclei_margin(points, margin_mm):
    inside = np.zeros(len(points), dtype=bool)
    for _, centre, semi_axes in DEEP_GREY_NUCLEI:
        scaled = (points - np.asarray(centre)) / (np.asarray(semi_axes) + margin_mm)
        inside |= np.einsum("ij,ij->i", scaled, scaled) <= 1
    return inside


def _choose(rng, candidates, radius, placed, *, gap=_LESION_GAP_MM):
    ok = np.ones(len(candidates), dtype=bool)
    for other in placed:
        distance = np.linalg.norm(candidates - np.asarray(other.centre), axis=1)
        ok &= distance >= radius + other.radius + gap
    if not ok.any():
        raise RuntimeError(f"no room left for a lesion of radius {radius} mm")
    pool = candidates[ok]
    return tuple(float(v) for v in pool[rng.integers(len(pool))])


def _block_mean(volume, size):
    shape = [n // size for n in volume.shape]
    trimmed = volume[: shape[0] * size, : shape[1] * size, : shape[2] * size]
    return trimmed.reshape(shape[0], size, shape[1], size, shape[2], size).mean(axis=(1, 3, 5))


@functools.lru_cache(maxsize=8)
def place_lesions(seed=0):
    """Deterministic, non-overlapping lesion positions for a seed.

    White-matter lesions go where the template's white matter is pure (fraction >= 0.9, on 2 mm
    blocks) for at least the lesion radius + 2 mm around the centre, away from the deep grey nuclei;
    cortical lesions are centred in cortex (GM fraction >= 0.85). All lesions are supratentorial and at
    least 3 mm apart.
    Positions do not depend on the output resolution.

    Parameters
    ----------
    seed : int

    Returns
    -------
    tuple of Lesion
        In the order of :data:`~.tissues.WM_LESIONS` then :data:`~.tissues.CORTICAL_LESIONS`.
    """
    gm, wm, _, affine = load_template()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1E5107]))
    # Clearance from non-WM on 2 mm blocks (8x fewer voxels; the extra margin absorbs the
    # coarseness).
    blocks = _block_mean(wm, 2)
    clearance = ndimage.distance_transform_edt(blocks >= _DEEP_WM_FRACTION, sampling=2.0)
    max_radius = max(d for _, d in WM_LESIONS) / 2
    index = np.argwhere(clearance >= _WM_CLEARANCE_MM + 1)
    depth = clearance[tuple(index.T)]
    # Block (i, j, k) covers template voxels 2i, 2i+1: its centre is at voxel 2i + 0.5.
    points = (2 * index + 0.5) @ affine[:3, :3].T + affine[:3, 3]
    keep = (points[:, 2] >= _MIN_LESION_Z_MM) & ~_inside_nuclei_margin(points, max_radius + 2)
    points, depth = points[keep], depth[keep]

    cortex_index = np.argwhere(gm >= _CORTEX_FRACTION)
    cortex_points = cortex_index @ affine[:3, :3].T + affine[:3, 3]
    cortex_points = cortex_points[cortex_points[:, 2] >= _MIN_LESION_Z_MM]

    placed = []
    # Largest first so that the big lesions always find room; results keep the table order.
    order = sorted(range(len(WM_LESIONS)), key=lambda i: -WM_LESIONS[i][1])
    by_index = {}
    for i in order:
        compartment, diameter = WM_LESIONS[i]
        radius = diameter / 2
        candidates = points[depth >= radius + _WM_CLEARANCE_MM]
        lesion = Lesion(compartment, _choose(rng, candidates, radius, placed), radius)
        placed.append(lesion)
        by_index[i] = lesion
    wm_lesions = [by_index[i] for i in range(len(WM_LESIONS))]
    cortical = []
    for compartment, diameter in CORTICAL_LESIONS:
        lesion = Lesion(compartment, _choose(rng, cortex_points, diameter / 2, placed), diameter / 2)
        placed.append(lesion)
        cortical.append(lesion)
    return tuple(wm_lesions + cortical)


class LocalFraction:
    """Volume fraction of a compartment that is non-zero only inside a few boxes of the grid.

    Nuclei and lesions occupy a small part of the grid; storing only their boxes keeps the memory of
    a fine (oversampled) phantom close to that of its few space-filling compartments.

    Parameters
    ----------
    shape : tuple of 3 int
        Shape of the whole grid.
    """

    def __init__(self, shape):
        self.shape = tuple(int(n) for n in shape)
        self.pieces = []

    def add(self, box, values):
        """Add ``values`` (float32, the shape of the box) to the fraction inside ``box`` (slices)."""
        self.pieces.append((tuple(box), np.asarray(values, dtype=np.float32)))

    def toarray(self):
        """The fraction on the whole grid (float32)."""
        full = np.zeros(self.shape, dtype=np.float32)
        for box, values in self.pieces:
            full[box] += values
        return full


def dense(fraction):
    """Whole-grid array of a fraction given as an array or a :class:`LocalFraction`."""
    return fraction.toarray() if isinstance(fraction, LocalFraction) else fraction


@dataclass
class Anatomy:
    """Volume fractions of every compartment on the output grid.

    Attributes
    ----------
    affine : ndarray (4, 4)
        Voxel -> RAS (MNI) mm.
    fractions : dict of str -> ndarray of float32 or LocalFraction
        Compartment fractions (keys of :data:`~.tissues.COMPARTMENT_LABELS`), summing to at most 1
        (the remainder is air); nuclei and lesions are :class:`LocalFraction` (see :func:`dense`).
    brain_mask, head_mask : ndarray of bool
    lesions : tuple of Lesion
    """

    affine: np.ndarray
    fractions: dict
    brain_mask: np.ndarray
    head_mask: np.ndarray
    lesions: tuple


def _output_grid(support, template_affine, resolution):
    index = np.argwhere(support > 0)
    low = index.min(0) + template_affine[:3, 3]
    high = index.max(0) + template_affine[:3, 3]
    extent = SKULL_THICKNESS_MM + SCALP_THICKNESS_MM + AIR_MARGIN_MM
    low, high = low - extent, high + extent
    shape = tuple(int(np.ceil((hi - lo) / resolution - 1e-6)) + 1 for lo, hi in zip(low, high))
    # Centre the grid on the head so the margins are symmetric.
    origin = (low + high) / 2 - (np.asarray(shape) - 1) * resolution / 2
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = origin
    return shape, affine


def _resample(volume, template_affine, shape, affine, resolution):
    """Template (1 mm) -> output grid; both axis-aligned."""
    if resolution > 1:
        # a 1 mm template voxel blurred to a ``resolution`` mm one: FWHM sqrt(resolution^2 - 1) mm
        sigma = np.sqrt(resolution**2 - 1) * FWHM_TO_SIGMA
        volume = ndimage.gaussian_filter(volume, sigma, mode="constant")
    scale = np.full(3, resolution)
    offset = affine[:3, 3] - template_affine[:3, 3]
    if resolution == 1 and np.allclose(offset, np.round(offset)):
        # Integer shift: a plain copy, exact and fast.
        start = np.round(offset).astype(int)
        out = np.zeros(shape, dtype=np.float32)
        source = tuple(slice(max(s, 0), min(s + n, m)) for s, n, m in zip(start, shape, volume.shape))
        target = tuple(slice(src.start - s, src.stop - s) for src, s in zip(source, start))
        out[target] = volume[source]
        return out
    out = ndimage.affine_transform(
        volume, scale, offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0, output=np.float32
    )
    return np.clip(out, 0, 1, out=out)


def _axes_mm(shape, affine):
    return [affine[i, i] * np.arange(shape[i]) + affine[i, 3] for i in range(3)]


def _plane_fraction(signed_distance, width):
    """Partial-volume fraction of a voxel whose centre is ``signed_distance`` outside a surface."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0).astype(np.float32)


def _box(axes, centre, half_extent):
    """Slices of the output grid covering ``centre +- half_extent`` (mm), and the local axes."""
    slices, local = [], []
    for axis, c in zip(axes, centre):
        step = axis[1] - axis[0] if len(axis) > 1 else 1.0
        lo = int(np.clip(np.floor((c - half_extent - axis[0]) / step), 0, len(axis)))
        hi = int(np.clip(np.ceil((c + half_extent - axis[0]) / step) + 1, 0, len(axis)))
        slices.append(slice(lo, hi))
        local.append(axis[lo:hi] - c)
    return tuple(slices), np.meshgrid(*local, indexing="ij", sparse=True)


def _ellipsoid_fraction(axes, centre, semi_axes, width):
    """Box (slices) around an ellipsoid and the partial-volume fraction inside it."""
    region, (x, y, z) = _box(axes, centre, max(semi_axes) + width)
    a, b, c = semi_axes
    radius = np.sqrt(x * x + y * y + z * z)
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    # Distance to the surface along the ray from the centre: exact for spheres, close for the
    # mildly eccentric nuclei; enough for a smooth partial-volume edge.
    with np.errstate(invalid="ignore", divide="ignore"):
        distance = np.where(rho > 0, radius * (1 - 1 / rho), -min(semi_axes))
    return region, _plane_fraction(distance, width)


def build_anatomy(*, resolution=1.0, subject="patient", seed=0):
    """Compartment fractions, masks and lesions of the phantom on a cropped grid.

    Parameters
    ----------
    resolution : float
        Isotropic voxel size in mm.
    subject : {"patient", "control"}
    seed : int
        Lesion placement.

    Returns
    -------
    Anatomy
    """
    if not (np.isfinite(resolution) and 0.25 <= resolution <= 10):
        raise ValueError(f"resolution must be in 0.25..10 mm, got {resolution!r}")
    if subject not in ("patient", "control"):
        raise ValueError(f"subject must be 'patient' or 'control', got {subject!r}")
    resolution = float(resolution)
    gm_1mm, wm_1mm, support_1mm, template_affine = load_template()
    shape, affine = _output_grid(support_1mm, template_affine, resolution)
    gm = _resample(gm_1mm, template_affine, shape, affine, resolution)
    wm = _resample(wm_1mm, template_affine, shape, affine, resolution)
    support = _resample(support_1mm, template_affine, shape, affine, resolution)
    csf = np.clip(support - gm - wm, 0, 1)
    brain_mask = support >= 0.5
    axes = _axes_mm(shape, affine)

    # Skull and scalp: shells at a given distance outside the brain surface (the surface lies half
    # a voxel beyond the centres of the outermost brain voxels).
    outside_distance = ndimage.distance_transform_edt(~brain_mask, sampling=resolution)
    surface_distance = (outside_distance - resolution / 2).astype(np.float32)
    within_skull = np.where(
        brain_mask, np.float32(1), _plane_fraction(surface_distance - SKULL_THICKNESS_MM, resolution)
    )
    within_scalp = np.where(
        brain_mask,
        np.float32(1),
        _plane_fraction(surface_distance - SKULL_THICKNESS_MM - SCALP_THICKNESS_MM, resolution),
    )
    del outside_distance, surface_distance
    skull = np.clip(within_skull - support, 0, 1)
    scalp = within_scalp - within_skull
    head_mask = within_scalp >= 0.5
    del within_skull

    fractions = {"csf": csf}
    # Deep grey nuclei replace the parenchyma (GM + WM) inside their ellipsoids; CSF is kept so the
    # ventricles stay. Earlier entries take precedence where ellipsoids overlap.
    width = max(_NUCLEUS_EDGE_MM, resolution)
    free = np.ones(shape, dtype=np.float32)
    parenchyma = gm + wm
    for name, centre, semi_axes in _nuclei(subject):
        region, ellipsoid = _ellipsoid_fraction(axes, centre, semi_axes, width)
        weight = ellipsoid * free[region]
        free[region] -= weight
        fractions.setdefault(name, LocalFraction(shape)).add(region, weight * parenchyma[region])
    gm *= free
    wm *= free
    del free, parenchyma
    if subject == "patient":
        # nuclei keep their (atrophied) size: the ventricles grow into the remaining GM and WM only
        _grow_ventricles(csf, gm, wm, support, resolution, PATIENT_ATROPHY["ventricles"])

    lesions = place_lesions(seed) if subject == "patient" else ()
    for lesion in lesions:
        # Work in the lesion's bounding box only: lesions are small.
        region, (x, y, z) = _box(axes, lesion.centre, lesion.radius + resolution)
        distance = np.sqrt(x * x + y * y + z * z)
        sphere = _plane_fraction(distance - lesion.radius, resolution)
        host = (gm if lesion.compartment.startswith("cortical") else wm)[region]
        if lesion.compartment == "chronic_active":
            core = _plane_fraction(distance - (lesion.radius - CHRONIC_ACTIVE_RIM_MM), resolution)
            parts = {"chronic_active_core": core, "chronic_active_rim": sphere - core}
        else:
            parts = {lesion.compartment: sphere}
        for name, weight in parts.items():
            fractions.setdefault(name, LocalFraction(shape)).add(region, weight * host)
        host *= 1 - sphere

    if subject == "patient":
        # thinner cortex, below the voxel size: each voxel's normal-appearing cortex loses a share to CSF
        lost = gm * np.float32(-PATIENT_ATROPHY["cortex"])
        gm -= lost
        csf += lost
        del lost
    fractions.update(cortical_gm=gm, wm=wm, skull=skull, scalp=scalp)
    head_mask = _add_air_neck_and_veins(fractions, axes, brain_mask, head_mask, resolution, lesions)
    fractions = {
        name: value if isinstance(value, LocalFraction) else np.asarray(value, dtype=np.float32)
        for name, value in fractions.items()
    }
    return Anatomy(affine=affine, fractions=fractions, brain_mask=brain_mask, head_mask=head_mask, lesions=lesions)


# --------------------------------------------------------------------------------------------------
# air cavities, neck and veins (the sources of a realistic B0 field)
# --------------------------------------------------------------------------------------------------
#: Bone left between an air cavity and the brain (mm): cavities never reach the intracranial space.
_CAVITY_WALL_MM = 1.5
#: The brain's centre (MNI mm) from which the medullary veins of lesions run outwards.
_VENOUS_CENTRE_MM = (0.0, -18.0, 12.0)


def _scale_in_box(fractions, box, keep):
    """Multiply every compartment by ``keep`` inside ``box``; return the occupied fraction there before."""
    occupied = np.zeros(keep.shape, dtype=np.float32)
    for fraction in fractions.values():
        if isinstance(fraction, LocalFraction):
            for piece_box, values in fraction.pieces:
                overlap = tuple(slice(max(p.start, b.start), min(p.stop, b.stop)) for p, b in zip(piece_box, box))
                if any(o.stop <= o.start for o in overlap):
                    continue
                local = tuple(slice(o.start - p.start, o.stop - p.start) for o, p in zip(overlap, piece_box))
                target = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, box))
                occupied[target] += values[local]
                values[local] *= keep[target]
        else:
            occupied += fraction[box]
            fraction[box] *= keep
    return occupied


def _replace_with_vein(fractions, box, vein):
    """Vein of partial volume ``vein`` (box-shaped) replaces whatever fills its voxels."""
    occupied = _scale_in_box(fractions, box, 1 - vein)
    fractions.setdefault("vein", LocalFraction(fractions["csf"].shape)).add(box, vein * occupied)


def _tube_fraction(x, y, z, start, direction, radius, length, width):
    """Partial volume of a tube of ``radius`` from ``start`` along ``direction`` over ``length`` (mm)."""
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    px, py, pz = x - start[0], y - start[1], z - start[2]
    along = px * d[0] + py * d[1] + pz * d[2]
    rho = np.sqrt(np.maximum(px * px + py * py + pz * pz - along * along, 0))
    ends = np.minimum(_plane_fraction(-along, width), _plane_fraction(along - length, width))
    # The ramp of the partial-volume profile widens a tube thinner than a voxel: scale it so the
    # cross-section keeps its area pi r^2 (the profile's area is pi (r^2 + w^2 / 12) for r >= w / 2,
    # pi R^3 / (3 w) with R = r + w / 2 below).
    if radius >= width / 2:
        area = radius**2 + width**2 / 12
    else:
        area = (radius + width / 2) ** 3 / (3 * width)
    return np.minimum(_plane_fraction(rho - radius, width), ends) * np.float32(min(1.0, radius**2 / area))


def _add_air_neck_and_veins(fractions, axes, brain_mask, head_mask, resolution, lesions):
    """Air cavities, the neck and veins, in place; returns the head mask with the neck, without the air.

    * Air cavities (:data:`~.tissues.AIR_CAVITIES`, :data:`~.tissues.EAR_CANALS`) replace skull,
      scalp and neck, never closer than 1.5 mm to the brain.
    * The neck (:data:`~.tissues.NECK`, soft tissue of the scalp compartment) fills the air below
      the skull down to the grid's bottom; the field model continues it below the grid.
    * The superior sagittal sinus runs along the midline just inside the intracranial surface;
      the larger chronic white-matter lesions get a central (medullary) vein through their centre,
      pointing away from the brain's centre.
    """
    width = resolution
    shape = brain_mask.shape
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)

    # neck: an elliptic column below the skull base, filling only what is air
    (centre_x, centre_y), (semi_x, semi_y), top = NECK
    radius = np.sqrt(((x - centre_x) / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2)
    column = np.minimum(_plane_fraction((radius - 1) * min(semi_x, semi_y), width), _plane_fraction(z - top, width))
    filled = np.zeros(shape, dtype=np.float32)
    for fraction in fractions.values():
        filled += dense(fraction)
    neck = np.clip(column - filled, 0, 1).astype(np.float32)
    fractions["scalp"] += neck
    neck_mask = (neck + filled >= 0.5) & (neck > 0)
    del filled, column, radius

    # air cavities, kept off the brain
    # at least one voxel of bone: a cavity never opens the intracranial space to the outside air
    wall_mm = max(_CAVITY_WALL_MM, resolution) + resolution / 2
    wall = ndimage.distance_transform_edt(~brain_mask, sampling=resolution) > wall_mm
    for _, centre, semi_axes in AIR_CAVITIES:
        box, cavity = _ellipsoid_fraction(axes, centre, semi_axes, width)
        _scale_in_box({k: fractions[k] for k in ("skull", "scalp")}, box, 1 - cavity * wall[box])
    for side in (-1, 1):
        (inner_x, outer_x), y0, z0, radius = EAR_CANALS
        middle = (side * (inner_x + outer_x) / 2, y0, z0)
        box, (bx, by, bz) = _box(axes, middle, (outer_x - inner_x) / 2 + radius)
        start = (side * inner_x, y0, z0)
        canal = _tube_fraction(bx + middle[0], by + y0, bz + z0, start, (side, 0, 0), radius, outer_x - inner_x, width)
        _scale_in_box({k: fractions[k] for k in ("skull", "scalp")}, box, 1 - canal * wall[box])

    extracranial = fractions["skull"] + fractions["scalp"]
    head_mask = brain_mask | ((head_mask | neck_mask) & (extracranial >= 0.5))
    del extracranial

    # superior sagittal sinus: a tube along the midline, its centre a fixed depth inside the surface
    depth_mm, radius, (y_front, y_back), z_low = SAGITTAL_SINUS
    half = radius + depth_mm + width
    columns = np.flatnonzero(np.abs(axes[0]) <= half)
    box = (slice(columns[0], columns[-1] + 1), slice(0, shape[1]), slice(0, shape[2]))
    depth = ndimage.distance_transform_edt(brain_mask[box], sampling=resolution) - resolution / 2
    bx = axes[0][box[0]][:, None, None]
    rho = np.sqrt(bx * bx + (depth - depth_mm) ** 2)
    extent = np.minimum(_plane_fraction(y - y_front, width), _plane_fraction(y_back - y, width))
    sinus = np.minimum(_plane_fraction(rho - radius, width), extent)
    sinus = np.minimum(sinus, _plane_fraction(z_low - z, width)) * brain_mask[box]
    _replace_with_vein(fractions, box, sinus.astype(np.float32))
    del depth, rho, sinus

    # central veins of the larger chronic lesions (the central vein sign)
    for lesion in lesions:
        if not lesion.compartment.startswith("chronic") or 2 * lesion.radius < CENTRAL_VEIN_LESION_MIN_DIAMETER_MM:
            continue
        direction = np.asarray(lesion.centre) - np.asarray(_VENOUS_CENTRE_MM)
        direction /= np.linalg.norm(direction)
        start = np.asarray(lesion.centre) - direction * (lesion.radius + 1)
        box, (bx, by, bz) = _box(axes, lesion.centre, lesion.radius + 1 + resolution)
        c = lesion.centre
        vein = _tube_fraction(
            bx + c[0], by + c[1], bz + c[2], start, direction, CENTRAL_VEIN_RADIUS_MM, 2 * lesion.radius + 2, width
        )
        _replace_with_vein(fractions, box, vein.astype(np.float32))
    return head_mask
