"""The bSSFP protocol and tissues the finite-pulse tests share, and the phantom's phase cycles of them."""

import numpy as np

from qmri_workflows.phantom.bssfp_steady_state import bssfp_steady_state

TR = 0.005
FOUR_CYCLES = np.deg2rad([0.0, 90.0, 180.0, 270.0])
FLIPS = np.deg2rad([15.0, 50.0])
# (T1, T2) in s: white matter, grey matter, a lesion, a short-T2 nucleus
TISSUES = {"wm": (0.85, 0.07), "gm": (1.4, 0.08), "lesion": (1.5, 0.2), "nucleus": (1.2, 0.05)}


def phantom_cycles(t1, t2, flip, frequencies, *, b1=1.0, pulse_duration=0.0, increments=FOUR_CYCLES):
    """The phantom simulator's exact steady state (..., n_cycle) at TR :data:`TR`, one per increment."""
    return np.stack(
        [
            bssfp_steady_state(
                1.0,
                1 / t1,
                1 / t2,
                flip,
                TR,
                off_resonance=frequencies,
                phase_increment=increment,
                b1=b1,
                pulse_duration=pulse_duration,
            )  # fmt: skip
            for increment in increments
        ],
        axis=-1,
    )
