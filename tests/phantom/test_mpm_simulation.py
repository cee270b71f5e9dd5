"""The phantom's MT-weighted contrast (MPM layout) and its MTsat truth."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.mtsat import mtsat
from qmri_workflows.core.signal import spgr_signal
from qmri_workflows.phantom.protocol import MPMProtocol, Protocol, VFAProtocol
from qmri_workflows.phantom.simulate import list_volumes, mt_signal_factor
from qmri_workflows.phantom.tissues import LESION_LABELS, PATIENT_TISSUES_3T, tissue_parameters


def _pulse_train(r1, alpha, tr, delta, n_pulses=2000):
    """Mz just before the MT pulse, by running the sequence TR by TR from equilibrium."""
    mz = 1.0
    e1 = math.exp(-r1 * tr)
    for _ in range(n_pulses):
        mz = (1 - delta) * mz * math.cos(alpha) * e1 + (1 - e1)
    return (1 - delta) * mz * math.sin(alpha)  # the signal after the MT pulse removed delta


@pytest.mark.parametrize("b1", [0.8, 1.0, 1.2])
def test_mt_factor_is_the_pulsed_steady_state(b1):
    protocol = MPMProtocol()
    truth = SimpleNamespace(mtsat=np.array([1.7]), r1=np.array([1.0]), b1=np.array([b1]))
    alpha, tr = math.radians(protocol.flip_angle), protocol.repetition_time
    delta = float(protocol.saturation(1.7, b1))
    expected = _pulse_train(1.0, alpha * b1, tr, delta)
    ernst = spgr_signal(1.0, 1.0, 0.0, alpha, tr, 0.0, b1=b1)
    np.testing.assert_allclose(ernst * mt_signal_factor(truth, protocol, alpha, tr), expected, rtol=1e-9)


def test_saturation_is_mtsat_at_nominal_b1_and_grows_slower_than_b1_squared():
    protocol = MPMProtocol()
    b1 = np.array([0.8, 1.0, 1.2])
    delta = protocol.saturation(np.full(3, 1.7), b1)
    assert delta[1] == pytest.approx(0.017)
    relative = delta / delta[1]
    assert np.all(np.diff(relative) > 0)
    # less than b1^2 above nominal, more below: the pool saturates (the residual Helms corrects)
    assert relative[2] < 1.2**2 and relative[0] > 0.8**2


def test_helms_fit_is_not_the_simulation_run_backwards():
    """The rational approximation recovers the exact steady state's MTsat to a few percent, not exactly."""
    protocol = MPMProtocol()
    r1, tr = 1.0, protocol.repetition_time
    alpha_pd, alpha_t1 = math.radians(6.0), math.radians(21.0)
    truth = SimpleNamespace(mtsat=np.array([1.7]), r1=np.array([r1]), b1=np.array([1.0]))
    s_pd = spgr_signal(1.0, r1, 0.0, alpha_pd, tr, 0.0)
    s_t1 = spgr_signal(1.0, r1, 0.0, alpha_t1, tr, 0.0)
    s_mt = s_pd * mt_signal_factor(truth, protocol, math.radians(protocol.flip_angle), tr)
    estimate = mtsat(s_mt, s_pd, s_t1, (alpha_pd, alpha_pd, alpha_t1), (tr, tr, tr)).mtsat
    error = float(estimate[0]) / 1.7 - 1
    assert 1e-4 < abs(error) < 0.03


def test_mpm_protocol_writes_the_hmri_layout():
    protocol = Protocol(bssfp=None, afi=None, rb1cor=None, mpm=MPMProtocol(n_echoes=3))
    volumes = list_volumes(protocol)
    names = {(v.suffix, tuple(sorted(v.entities.items()))) for v in volumes}
    assert ("MPM", (("acq", "PDw"), ("echo", 1), ("flip", 1), ("mt", "off"))) in names
    assert ("MPM", (("acq", "T1w"), ("echo", 8), ("flip", 2), ("mt", "off"))) in names
    mt = [v for v in volumes if v.entities.get("mt") == "on"]
    assert len(mt) == 3 and all(v.entities["acq"] == "MTw" and v.metadata["MTState"] for v in mt)
    assert all(v.suffix == "VFA" for v in list_volumes(Protocol(bssfp=None, afi=None, rb1cor=None)))
    assert "mpm" not in Protocol().to_dict()


def test_mpm_protocol_needs_a_pd_t1_pair():
    with pytest.raises(ValueError, match="two increasing flip angles"):
        Protocol(vfa=VFAProtocol(flip_angles=(4.0, 10.0, 20.0)), mpm=MPMProtocol())
    with pytest.raises(ValueError, match="n_echoes"):
        Protocol(mpm=MPMProtocol(n_echoes=9))


def test_lesions_have_less_mt_than_nawm():
    parameters = tissue_parameters("patient")
    nawm = parameters["wm"].mtsat
    lesions = [name for name, values in PATIENT_TISSUES_3T.items() if name not in tissue_parameters("control")]
    assert lesions and len(LESION_LABELS) > 0
    assert all(0 < parameters[name].mtsat < nawm for name in lesions)
    control = tissue_parameters("control")
    assert control["wm"].mtsat > control["cortical_gm"].mtsat > control["csf"].mtsat == 0
