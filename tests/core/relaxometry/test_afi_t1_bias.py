"""The finite-T1 bias of the AFI formula, against a pulse-by-pulse simulation of the AFI steady state."""

import numpy as np
import pytest

from qmri_workflows.core.relaxometry import afi_raw_ratio, afi_t1_bias


def _afi_by_pulses(b1, t1, tr1, tr2, flip, n_pairs=3000):
    """Ideally spoiled AFI: pulse, TR1, pulse, TR2 ...; S1 is read in the TR1 interval."""
    alpha = b1 * flip
    mz = np.ones_like(np.asarray(t1, dtype=float) * alpha)
    for _ in range(n_pairs):
        s1 = mz * np.sin(alpha)
        mz = 1 - (1 - mz * np.cos(alpha)) * np.exp(-tr1 / t1)
        s2 = mz * np.sin(alpha)
        mz = 1 - (1 - mz * np.cos(alpha)) * np.exp(-tr2 / t1)
    return s1, s2


@pytest.mark.parametrize("t1", [0.8, 1.4, 4.0])
def test_bias_factor_removes_the_formula_error(t1):
    b1 = np.linspace(0.7, 1.3, 7)
    flip, tr1, tr2 = np.deg2rad(60.0), 0.02, 0.1
    s1, s2 = _afi_by_pulses(b1, t1, tr1, tr2, flip)
    read = afi_raw_ratio(s1, s2, tr1, tr2, flip)
    # the first-order formula reads a smaller angle at finite T1 (more so at short T1) ...
    assert np.all(read < b1) and np.max(np.abs(read / b1 - 1)) > 5e-4
    # ... by exactly the factor the steady state predicts
    factor = afi_t1_bias(b1, t1, tr1, tr2, flip)
    assert np.allclose(read / factor, b1, rtol=1e-6)


def test_bias_factor_vanishes_for_long_t1_and_is_one_where_undefined():
    assert np.allclose(afi_t1_bias(1.0, 1e6, 0.02, 0.1, np.deg2rad(60.0)), 1.0, atol=1e-6)
    assert afi_t1_bias(1.0, np.nan, 0.02, 0.1, np.deg2rad(60.0)) == 1.0
