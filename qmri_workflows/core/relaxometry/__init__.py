"""Relaxometry: R1 (DESPOT1), B1+ from AFI and the imperfect-spoiling correction (numpy/scipy only).

* :mod:`.despot1` -- R1, M0 and their standard errors from variable-flip-angle SPGR, B1-corrected.
* :mod:`.b1` -- flip-angle ratio maps (actual / nominal) from an AFI pair.
* :mod:`.spoiling` -- the protocol's own EPG steady state and the correction it gives.
* :mod:`.b1_free` -- a smooth B1+ estimate from the VFA data alone (UNICORT-like), without a B1 map.
* :mod:`.pd` -- receive sensitivity (RB1COR pair, or the 1/PD-R1 relation) and PD in percent water.
* :mod:`.mtsat` -- MT saturation (Helms 2008) with its empirical B1 correction.
"""

from .b1 import AFIMap, afi_b1_standard_error, afi_flip_angle_ratio, afi_raw_ratio, afi_t1_bias
from .b1_free import B1Estimate, estimate_b1_from_vfa
from .despot1 import R1Fit, despot1_crlb, despot1_linear, despot1_nonlinear, despot1_two_angle, fit_r1
from .mtsat import HELMS_B1_COEFFICIENT, MTsatMap, mtsat
from .pd import (
    PD_REFERENCES,
    PDCalibration,
    ReceiveBias,
    calibrate_pd,
    classify_by_r1,
    pd_reference_region,
    receive_bias_from_r1,
    receive_sensitivity,
)
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
    "B1Estimate",
    "HELMS_B1_COEFFICIENT",
    "MTsatMap",
    "PDCalibration",
    "PD_REFERENCES",
    "ReceiveBias",
    "calibrate_pd",
    "classify_by_r1",
    "estimate_b1_from_vfa",
    "mtsat",
    "pd_reference_region",
    "receive_bias_from_r1",
    "receive_sensitivity",
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
