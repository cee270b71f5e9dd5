"""Find a subject's qMRI inputs in a raw BIDS dataset (pybids) and check them.

The layout read here is described in ``docs/architecture.rst`` ("Raw BIDS layout"):

* spoiled multi-echo GRE at several flip angles: ``anat/*_echo-<e>_flip-<f>_part-<mag|phase>_VFA``;
* plain multi-echo GRE: ``anat/*_echo-<e>_part-<mag|phase>_MEGRE``;
* multi-parameter mapping (hMRI style, BIDS ``MPM``):
  ``anat/*_acq-<PDw|T1w|MTw>_flip-<f>_mt-<on|off>_echo-<e>_part-<mag|phase>_MPM``; the ``mt-off``
  images are the spoiled GRE at several flip angles (as a VFA collection), the ``mt-on`` image is
  the MT-weighted contrast (:data:`MT`);
* phase-cycled bSSFP: ``anat/*_acq-bssfp<inc>_flip-<f>_part-<mag|phase>_VFA`` with
  ``PulseSequenceType`` "bSSFP" (project convention);
* AFI: ``fmap/*_acq-tr1_TB1AFI`` / ``fmap/*_acq-tr2_TB1AFI``;
* double-angle pair: ``fmap/*_flip-<1|2>_TB1DAM`` (told apart by ``FlipAngle``);
* Siemens ``tfl_b1map``: ``fmap/*_acq-famp_TB1TFL`` (10 x the actual preparation angle, deg) and
  its optional reference ``fmap/*_acq-anat_TB1TFL``;
* a pre-computed ``fmap/*_TB1map``;
* receive-field pair: ``fmap/*_acq-head<contrast>_RB1COR`` / ``fmap/*_acq-body<contrast>_RB1COR``;
* from derivatives datasets (``--derivatives``): a ``TB1map``, a ``dseg`` with its table, a lesion
  mask and a brain mask (``derivatives`` module).

Each collection is checked on its own: a broken one is left out of :class:`SubjectInputs` and
recorded as a :class:`CollectionProblem` whose message names the file(s) and the fix, so a broken
AFI pair does not stop the R2* map. Only an absent subject or session raises
:class:`BIDSInputError`. Entities are read from the path inside the dataset, never from the folders
above it. Every image is checked whole first (:func:`~qmri_workflows.io.integrity.check_image_file`),
so a damaged file is a problem of its collection. Only image headers are read, except for the first
phase echo of a series whose sidecar does not state the phase units (its value range tells them, see
:func:`phase_scale_from_values`), derivative masks and segmentations (their labels are checked) and
a TB1map (its unit, :func:`tb1map_scale`) and a ``tfl_b1map`` (the scale check of its famp). Raw
transmit-field images of other kinds than AFI, DAM, TFL and TB1map (``TB1EPI``, ``TB1RFM`` ...)
are listed in ``SubjectInputs.unsupported_transmit``.

Sidecars written by dcm2niix are accepted: ``RepetitionTime`` stands in for
``RepetitionTimeExcitation``, a missing ``PulseSequenceType`` means spoiled GRE, and metadata
inherited from dataset-level sidecars is merged by pybids.

Modules: ``layout`` (dataset, participants, entity grouping), ``metadata`` (sidecar numbers,
tolerances, phase units, grid checks), ``gre``, ``bssfp``, ``fieldmaps`` (AFI, DAM, TFL, receive pair),
``derivatives``, ``problems`` (collection names), ``inputs`` (:func:`collect_inputs`).
"""

from ..errors import BIDSInputError
from .bssfp import BSSFPSeries
from .derivatives import DerivativeFile, open_derivatives, tb1map_scale
from .fieldmaps import AFIPair, DAMPair, ReceivePair, TFLMap
from .gre import EchoSeries, MPMSeries
from .inputs import UNSUPPORTED_TRANSMIT_SUFFIXES, SubjectInputs, collect_inputs
from .layout import open_layout, select_participants
from .metadata import phase_scale_from_values
from .problems import (
    AFI,
    BRAIN_MASK,
    BSSFP,
    COLLECTIONS,
    DAM,
    DSEG,
    ENHANCING_MASK,
    GRE,
    LESION_MASK,
    MT,
    RECEIVE,
    TB1MAP,
    TFL,
    CollectionProblem,
)

__all__ = [
    "AFI",
    "BRAIN_MASK",
    "BSSFP",
    "COLLECTIONS",
    "DAM",
    "DSEG",
    "ENHANCING_MASK",
    "GRE",
    "LESION_MASK",
    "MPMSeries",
    "MT",
    "RECEIVE",
    "TB1MAP",
    "TFL",
    "UNSUPPORTED_TRANSMIT_SUFFIXES",
    "AFIPair",
    "DAMPair",
    "BIDSInputError",
    "BSSFPSeries",
    "CollectionProblem",
    "DerivativeFile",
    "EchoSeries",
    "ReceivePair",
    "SubjectInputs",
    "TFLMap",
    "collect_inputs",
    "open_derivatives",
    "open_layout",
    "phase_scale_from_values",
    "select_participants",
    "tb1map_scale",
]
