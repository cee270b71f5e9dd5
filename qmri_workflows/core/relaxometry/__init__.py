"""Relaxometry: R1 (DESPOT1), B1+ from AFI and the imperfect-spoiling correction (numpy/scipy only).

* :mod:`.despot1` -- R1, M0 and their standard errors from variable-flip-angle SPGR, B1-corrected.
* :mod:`.b1` -- flip-angle ratio maps (actual / nominal) from an AFI pair or a double-angle pair.
* :mod:`.spoiling` -- the protocol's own EPG steady state and the correction it gives.
* :mod:`.b1_free` -- a smooth B1+ estimate from the VFA data alone (UNICORT-like), without a B1 map.
* :mod:`.pd` -- receive sensitivity (RB1COR pair, or the 1/PD-R1 relation) and PD in percent water.
* :mod:`.mtsat` -- MT saturation (Helms 2008) with its empirical B1 correction.
"""

import importlib

# Names are imported on first use (PEP 562): the command line reads DEFAULT_TISSUE_T2 for its --help
# text, which must not pay for scipy and the fitting modules.
_SUBMODULE_OF = {
    "AFIMap": "b1",
    "afi_b1_standard_error": "b1",
    "afi_flip_angle_ratio": "b1",
    "afi_raw_ratio": "b1",
    "afi_t1_bias": "b1",
    "dam_flip_angle_ratio": "b1",
    "dam_raw_ratio": "b1",
    "dam_t1_bias": "b1",
    "trusted_voxels": "b1",
    "B1Estimate": "b1_free",
    "estimate_b1_from_vfa": "b1_free",
    "R1Fit": "despot1",
    "despot1_crlb": "despot1",
    "despot1_linear": "despot1",
    "despot1_nonlinear": "despot1",
    "despot1_two_angle": "despot1",
    "fit_r1": "despot1",
    "HELMS_B1_COEFFICIENT": "mtsat",
    "MTsatMap": "mtsat",
    "mtsat": "mtsat",
    "PD_REFERENCES": "pd",
    "PDCalibration": "pd",
    "ReceiveBias": "pd",
    "calibrate_pd": "pd",
    "classify_by_r1": "pd",
    "pd_reference_region": "pd",
    "receive_bias_from_r1": "pd",
    "receive_sensitivity": "pd",
    "DEFAULT_TISSUE_T2": "spoiling",
    "VENDOR_PHASE_INCREMENT_DEG": "spoiling",
    "SpoilingProtocol": "spoiling",
    "epg_spoiled_signal": "spoiling",
    "spoiling_protocol": "spoiling",
    "spoiling_ratio": "spoiling",
    "t2_prior_from_r2star": "spoiling",
}

__all__ = list(_SUBMODULE_OF)


def __getattr__(name):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
