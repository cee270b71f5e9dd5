"""Relaxometry: R1 (DESPOT1), B1+ from AFI and the imperfect-spoiling correction (numpy/scipy only).

* :mod:`.despot1` -- R1, M0 and their standard errors from variable-flip-angle SPGR, B1-corrected.
* :mod:`.b1` -- flip-angle ratio maps (actual / nominal) from an AFI pair.
* :mod:`.spoiling` -- the protocol's own EPG steady state and the correction it gives.
"""

from .b1 import AFIMap, afi_b1_standard_error, afi_flip_angle_ratio, afi_raw_ratio, afi_t1_bias
from .despot1 import R1Fit, despot1_crlb, despot1_linear, despot1_nonlinear, despot1_two_angle, fit_r1
from .spoiling import (
    DEFAULT_TISSUE_T2,
    VENDOR_PHASE_INCREMENT_DEG,
    SpoilingProtocol,
    epg_spoiled_signal,
    spoiling_protocol,
    spoiling_ratio,
)

__all__ = [
    "AFIMap",
    "DEFAULT_TISSUE_T2",
    "R1Fit",
    "SpoilingProtocol",
    "VENDOR_PHASE_INCREMENT_DEG",
    "afi_b1_standard_error",
    "afi_flip_angle_ratio",
    "afi_raw_ratio",
    "afi_t1_bias",
    "despot1_crlb",
    "despot1_linear",
    "despot1_nonlinear",
    "despot1_two_angle",
    "epg_spoiled_signal",
    "fit_r1",
    "spoiling_protocol",
    "spoiling_ratio",
]
