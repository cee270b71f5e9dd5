"""Names of the input collections and the record of one that cannot be used."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AFI",
    "DAM",
    "TFL",
    "BRAIN_MASK",
    "BSSFP",
    "COLLECTIONS",
    "DERIVATIVE_COLLECTIONS",
    "DSEG",
    "ENHANCING_MASK",
    "GRE",
    "LESION_MASK",
    "MT",
    "RAW_COLLECTIONS",
    "RECEIVE",
    "TB1MAP",
    "CollectionProblem",
]

GRE = "gre"
"""Multi-echo spoiled GRE (``VFA`` or ``MEGRE``)."""
BSSFP = "bssfp"
"""Phase-cycled bSSFP."""
AFI = "afi"
"""Actual flip-angle imaging pair (``TB1AFI``)."""
DAM = "dam"
"""Double-angle pair (``TB1DAM``)."""
TFL = "tfl"
"""Siemens ``tfl_b1map`` flip-angle map (``TB1TFL``: ``acq-famp``, with its ``acq-anat`` reference)."""
RECEIVE = "receive"
"""Head/body coil receive-field pair (``RB1COR``)."""
MT = "mt"
"""MT-weighted spoiled GRE (the ``mt-on`` image of an ``MPM`` collection)."""
TB1MAP = "TB1map"
"""Precomputed transmit-field map from a derivatives dataset."""
DSEG = "dseg"
"""Segmentation (``*_dseg.nii[.gz]`` + ``*_dseg.tsv``) from a derivatives dataset."""
LESION_MASK = "lesion_mask"
"""Lesion mask (``*_label-lesion_mask``) from a derivatives dataset."""
BRAIN_MASK = "brain_mask"
"""User brain mask (``*_desc-brain_mask``) from a derivatives dataset."""
ENHANCING_MASK = "enhancing_mask"
"""Gadolinium-enhancement mask (``*_label-enhancing_mask``) from a derivatives dataset."""

RAW_COLLECTIONS = (GRE, MT, BSSFP, AFI, DAM, TFL, RECEIVE)
DERIVATIVE_COLLECTIONS = (TB1MAP, DSEG, LESION_MASK, BRAIN_MASK, ENHANCING_MASK)
COLLECTIONS = RAW_COLLECTIONS + DERIVATIVE_COLLECTIONS


@dataclass(frozen=True)
class CollectionProblem:
    """Why one input collection of a subject cannot be used (the others still can).

    Attributes
    ----------
    collection : str
        One of :data:`COLLECTIONS` (e.g. :data:`AFI`).
    message : str
        Names the offending file(s) and says how to fix them.
    missing : bool
        True when nothing is wrong with what is there: the data are simply absent (a subject
        without any qMRI images); False for a broken collection.
    """

    collection: str
    message: str
    missing: bool = False

    def __str__(self):
        return f"{self.collection}: {self.message}"
