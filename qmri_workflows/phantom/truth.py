"""Ground truth of the digital MS-brain phantom (public entry point :func:`make_phantom`).

Mixing rule
-----------
Each voxel holds volume fractions ``f_t`` of compartments ``t`` (the rest is air) and is treated as
*one* compartment in fast exchange whose parameters follow from its own fractions:

* ``PD = sum_t f_t PD_t`` (percent water per voxel volume: water adds up by volume);
* ``R = sum_t f_t PD_t R_t / sum_t f_t PD_t`` for R1, R2 and R2*: rates average over the *water*
  of the voxel, so each compartment weighs by its water content (fast-exchange limit);
* ``chi = sum_t f_t chi_t`` (susceptibility adds up by volume; ppm relative to CSF).

The protocol simulator computes each voxel's signal from that voxel's parameters only, so these maps
are the exact truth of data simulated on this grid (``oversample=1``). An oversampled dataset builds
this truth on the fine grid; its written truth is the block average, which its images (k-space
reduced, with partial volume and intravoxel dephasing) match only away from edges: see
``label_fraction`` and the interior masks.

Below 1 mm (:data:`~.fields.FIELD_GRID_MM`) the dipole transforms of the B0 field run on a grid of
about 1 mm, one per polyphase component, and give the field at every fine voxel (memory; see
``_b0_fields``). Air has PD = 0 and all parameters 0; the outermost scalp
voxels (tissue fraction < 0.5, outside ``head_mask``) keep their partial-volume values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import LocalFraction, build_anatomy
from .fields import (
    FIELD_GRID_MM,
    b0_fields,
    body_receive_sensitivity,
    phase_offset,
    receive_sensitivity,
    transmit_field,
)
from .tissues import BRAIN_LABELS, COMPARTMENT_LABELS, LABELS, LESION_LABELS, tissue_parameters

__all__ = ["PhantomTruth", "make_phantom", "LABELS", "lesion_instances"]

_EXTRACRANIAL_LABELS = (14, 15)


@dataclass
class PhantomTruth:
    """Ground-truth maps of the phantom on one axis-aligned grid (RAS, MNI152 mm).

    Attributes
    ----------
    affine : ndarray (4, 4)
        Voxel -> RAS mm.
    field_strength : float
        Tesla.
    r1, r2, r2star : ndarray of float32
        Relaxation rates (1/s); ``r2star >= r2``; 0 in air.
    pd : ndarray of float32
        Proton density, percent water (0..100).
    chi : ndarray of float32
        Susceptibility (ppm) relative to CSF; skull and scalp carry their tissue values on the same
        scale; 0 in air (air's own +9.41 ppm vs water enters ``background_field_ppm``).
    dseg : ndarray of int16
        Labels of :data:`~qmri_workflows.phantom.tissues.LABELS` (0 = background).
    labels : dict of int -> str
    brain_mask : ndarray of bool
        Intracranial: brain plus ventricular and sulcal CSF.
    head_mask : ndarray of bool
        Brain, skull and scalp.
    b1 : ndarray of float32
        Transmit field, ratio of actual to nominal flip angle.
    receive : ndarray of float32
        Relative receive sensitivity (mean 1 over the brain).
    b0_ppm, background_field_ppm, local_field_ppm : ndarray of float32
        Field offsets in ppm of B0; ``b0_ppm = local + background + linear shim residual``.
    phase_offset : ndarray of float32
        TE = 0 phase (rad), smooth, not wrapped.
    subject : str
        ``"patient"`` or ``"control"``.
    lesions : tuple of Lesion
        Lesion compartments, centres (mm) and radii (mm); empty for controls.
    b0_direction : tuple of float
        Unit main-field direction in voxel axes.
    body_receive : ndarray of float32 or None
        Receive sensitivity of the body coil (RB1COR reference image): smooth, within a few percent
        of 1 over the brain; ``None`` means exactly uniform.
    label_fraction : ndarray of float32 or None
        Volume fraction of each voxel that belongs to its ``dseg`` label (1 without partial volume);
        defines the interior masks of an oversampled dataset.
    lesion_index : ndarray of int16 or None
        Which lesion each voxel belongs to: ``i + 1`` for ``lesions[i]`` where ``dseg`` is a lesion
        label, 0 elsewhere (see :func:`lesion_instances`).
    mtsat : ndarray of float32 or None
        MT saturation (p.u.) at the nominal transmit field, water-weighted over the compartments
        like the rates (it is a fraction of the water's longitudinal magnetisation); 0 in air.
    """

    affine: np.ndarray
    field_strength: float
    r1: np.ndarray
    r2: np.ndarray
    r2star: np.ndarray
    pd: np.ndarray
    chi: np.ndarray
    dseg: np.ndarray
    labels: dict
    brain_mask: np.ndarray
    head_mask: np.ndarray
    b1: np.ndarray
    receive: np.ndarray
    b0_ppm: np.ndarray
    background_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    phase_offset: np.ndarray
    subject: str = "patient"
    lesions: tuple = ()
    b0_direction: tuple = (0.0, 0.0, 1.0)
    body_receive: np.ndarray | None = None
    label_fraction: np.ndarray | None = None
    lesion_index: np.ndarray | None = None
    mtsat: np.ndarray | None = None

    @property
    def voxel_size(self):
        """Voxel size (mm) along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self):
        """Grid shape."""
        return tuple(self.r1.shape)


def _nonzero_box(array):
    """Slices of the bounding box of the non-zero voxels (most compartments are local)."""
    box = []
    for axis in range(array.ndim):
        other = tuple(a for a in range(array.ndim) if a != axis)
        hits = np.flatnonzero(np.any(array, axis=other))
        if hits.size == 0:
            return None
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _pieces(fraction):
    """``(box, values)`` pieces of a fraction (an array or a :class:`~.anatomy.LocalFraction`)."""
    if isinstance(fraction, LocalFraction):
        return fraction.pieces
    box = _nonzero_box(fraction)
    return [] if box is None else [(box, fraction[box])]


def _union_box(boxes):
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))


def _shape(fractions):
    first = next(iter(fractions.values()))
    return tuple(first.shape)


def _mix(fractions, parameters):
    """Partial-volume mixing (module notes) of compartment parameters."""
    shape = _shape(fractions)
    pd = np.zeros(shape, dtype=np.float32)
    weighted = {key: np.zeros(shape, dtype=np.float32) for key in ("r1", "r2", "r2star")}
    chi = np.zeros(shape, dtype=np.float32)
    for name, fraction in fractions.items():
        values = parameters[name]
        for box, local_fraction in _pieces(fraction):
            water = local_fraction * np.float32(values.pd)
            pd[box] += water
            weighted["r1"][box] += water * np.float32(values.r1)
            weighted["r2"][box] += water * np.float32(values.r2)
            weighted["r2star"][box] += water * np.float32(values.r2star)
            chi[box] += local_fraction * np.float32(values.chi)
    has_water = pd > 0
    rates = {}
    for key in ("r1", "r2", "r2star"):
        total = weighted.pop(key)
        rate = np.zeros(shape, dtype=np.float32)
        np.divide(total, pd, out=rate, where=has_water)
        del total
        rates[key] = rate
    # float32 rounding can put R2* a hair below R2 where they are equal in a compartment.
    np.maximum(rates["r2star"], rates["r2"], out=rates["r2star"])
    return rates["r1"], rates["r2"], rates["r2star"], pd, chi


def _mix_mtsat(fractions, parameters, pd):
    """Water-weighted MTsat (p.u.) of the compartments, as :func:`_mix` mixes the rates."""
    weighted = np.zeros(pd.shape, dtype=np.float32)
    for name, fraction in fractions.items():
        values = parameters[name]
        for box, local_fraction in _pieces(fraction):
            weighted[box] += local_fraction * np.float32(values.pd * values.mtsat)
    mtsat = np.zeros(pd.shape, dtype=np.float32)
    np.divide(weighted, pd, out=mtsat, where=pd > 0)
    return mtsat


def _segment(fractions, brain_mask, head_mask):
    """Label of the largest fraction (brain labels inside the brain mask, skull/scalp outside).

    Returns
    -------
    dseg : ndarray of int16
    label_fraction : ndarray of float32
        Volume fraction of each voxel that belongs to its label (1 in a voxel without partial volume).
    """
    shape = brain_mask.shape
    by_label = {}
    for name, fraction in fractions.items():
        by_label.setdefault(COMPARTMENT_LABELS[name], []).extend(_pieces(fraction))
    dseg = np.zeros(shape, dtype=np.int16)
    label_fraction = np.zeros(shape, dtype=np.float32)
    for group, region in ((BRAIN_LABELS, brain_mask), (_EXTRACRANIAL_LABELS, head_mask & ~brain_mask)):
        best = np.zeros(shape, dtype=np.float32)
        winner = np.zeros(shape, dtype=np.int16)
        for label in group:
            pieces = by_label.get(label)
            if not pieces:
                continue
            # Sum the label's pieces in their common box: one temporary, never a whole-grid copy
            # per compartment.
            box = _union_box([piece_box for piece_box, _ in pieces])
            candidate = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
            for piece_box, values in pieces:
                local = tuple(slice(p.start - b.start, p.stop - b.start) for p, b in zip(piece_box, box))
                candidate[local] += values
            larger = candidate > best[box]
            best[box] = np.where(larger, candidate, best[box])
            winner[box][larger] = label
            del candidate, larger
        dseg[region] = winner[region]
        label_fraction[region] = best[region]
    return dseg, label_fraction


def make_phantom(*, resolution=1.0, field_strength=3.0, subject="patient", seed=0, b0_direction=(0, 0, 1)):
    """Build the ground truth of the MS-brain phantom.

    Parameters
    ----------
    resolution : float, optional
        Isotropic voxel size (mm); 1 mm is the template's native grid.
    field_strength : float, optional
        Main field (tesla); relaxation rates are scaled from 3 T (see :mod:`.tissues`).
    subject : {"patient", "control"}, optional
        Patients have lesions of every stage of Table 1 of the review, cortical lesions, and the
        NAWM / normal-appearing cortex / deep grey-matter changes of Tables 1-2.
    seed : int, optional
        Lesion placement and the small subject-to-subject changes of the field patterns.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel (= RAS) axes.

    Returns
    -------
    PhantomTruth

    Notes
    -----
    The grid is cropped to the head plus about 10 mm of air. Tissue parameters, mixing rule and
    field-strength laws are documented in :mod:`qmri_workflows.phantom.tissues` and in this module.
    """
    if not (np.isfinite(field_strength) and field_strength > 0):
        raise ValueError(f"field_strength must be a positive number of tesla, got {field_strength!r}")
    direction = np.asarray(b0_direction, dtype=float)
    if direction.shape != (3,) or not np.linalg.norm(direction) > 0:
        raise ValueError(f"b0_direction must be a non-zero 3-vector, got {b0_direction!r}")
    direction = tuple(float(v) for v in direction / np.linalg.norm(direction))
    anatomy = build_anatomy(resolution=resolution, subject=subject, seed=seed)
    parameters = tissue_parameters(subject, field_strength)
    fractions = anatomy.fractions
    r1, r2, r2star, pd, chi = _mix(fractions, parameters)
    mtsat = _mix_mtsat(fractions, parameters, pd)
    dseg, label_fraction = _segment(fractions, anatomy.brain_mask, anatomy.head_mask)
    tissue_fraction = np.zeros(r1.shape, dtype=np.float32)
    for fraction in fractions.values():
        for box, values in _pieces(fraction):
            tissue_fraction[box] += values
    np.clip(tissue_fraction, 0, 1, out=tissue_fraction)
    del fractions
    anatomy.fractions = {}

    affine = anatomy.affine
    shape = r1.shape
    voxel_size = float(resolution)
    centre_mm = np.argwhere(anatomy.brain_mask).mean(0) * voxel_size + affine[:3, 3]
    b1 = transmit_field(shape, affine, centre_mm, seed=seed)
    receive = receive_sensitivity(shape, affine, centre_mm, anatomy.brain_mask, seed=seed)
    body_receive = body_receive_sensitivity(shape, affine, centre_mm, anatomy.brain_mask, seed=seed)
    phase = phase_offset(shape, affine, centre_mm, seed=seed)
    total, background, local = _b0_fields(
        chi, tissue_fraction, anatomy.brain_mask, voxel_size, centre_mm, affine, direction=direction, seed=seed
    )
    return PhantomTruth(
        affine=affine,
        field_strength=float(field_strength),
        r1=r1,
        r2=r2,
        r2star=r2star,
        pd=pd,
        chi=chi,
        dseg=dseg,
        labels=dict(LABELS),
        brain_mask=anatomy.brain_mask,
        head_mask=anatomy.head_mask,
        b1=b1,
        receive=receive,
        b0_ppm=total,
        background_field_ppm=background,
        local_field_ppm=local,
        phase_offset=phase,
        subject=subject,
        lesions=anatomy.lesions,
        b0_direction=direction,
        body_receive=body_receive,
        label_fraction=label_fraction,
        lesion_index=lesion_instances(dseg, affine, anatomy.lesions),
        mtsat=mtsat,
    )


def lesion_instances(dseg, affine, lesions):
    """Lesion number of every voxel whose label is a lesion label.

    Parameters
    ----------
    dseg : ndarray of int
        Labels of :data:`~.tissues.LABELS`.
    affine : ndarray (4, 4)
        Axis-aligned voxel -> mm.
    lesions : sequence of Lesion

    Returns
    -------
    ndarray of int16
        ``i + 1`` where ``dseg`` is a lesion label and the voxel centre is closest (relative to the
        radius) to ``lesions[i]``, within its radius plus one voxel; 0 elsewhere. Lesions are at least
        3 mm apart, so the nearest sphere is the one the voxel's label came from.
    """
    index = np.zeros(np.shape(dseg), dtype=np.int16)
    if not lesions:
        return index
    voxels = np.argwhere(np.isin(dseg, LESION_LABELS))
    points = voxels @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    voxel_size = float(np.max(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    scaled = np.stack(
        [
            np.linalg.norm(points - np.asarray(lesion.centre), axis=1) / (lesion.radius + voxel_size)
            for lesion in lesions
        ]
    )
    nearest = np.argmin(scaled, axis=0)
    inside = scaled[nearest, np.arange(len(points))] <= 1
    index[tuple(voxels[inside].T)] = nearest[inside] + 1
    return index


def field_grid_factor(voxel_size):
    """How many times coarser than a ``voxel_size`` grid the B0 field's transforms run.

    ``round(FIELD_GRID_MM / voxel_size)``, at least 1: the polyphase factor of
    :func:`~.fields.fine_grid_field` for the phantom's B0 (see ``_b0_fields``).
    """
    return max(1, int(round(FIELD_GRID_MM / voxel_size)))


def _b0_fields(chi, tissue_fraction, brain_mask, voxel_size, centre_mm, affine, *, direction, seed):
    """B0 fields on the phantom grid, with transforms on a grid no finer than :data:`FIELD_GRID_MM`.

    On a finer grid (an oversampled phantom) the dipole transforms run on the grid
    :func:`field_grid_factor` times coarser, one per polyphase component of
    the fine maps, and the field is assembled at every fine voxel
    (:func:`~.fields.fine_grid_field`): the same field as one transform of the fine grid (the
    continuous kernel at all its frequencies), in half its memory. A k-space crop to the coarse
    grid followed by interpolation, as earlier versions did, rang with a period of two coarse
    voxels next to the air-tissue jumps of the field; a 1 mm voxel does not average that ripple
    away, and its non-harmonic part, larger than the brain's own field variations, reached deep into
    the brain of the 1 mm phantom.
    """
    return b0_fields(
        chi,
        tissue_fraction,
        brain_mask,
        voxel_size,
        centre_mm,
        affine,
        b0_direction=direction,
        seed=seed,
        polyphase=field_grid_factor(voxel_size),
    )
