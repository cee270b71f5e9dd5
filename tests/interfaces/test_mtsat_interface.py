"""ComputeMTsat: MTsat from MPM signals on disk, against closed-form steady states."""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.interfaces.mtsat import ComputeMTsat, mt_intercept

TR, ALPHA_PD, ALPHA_T1, ALPHA_MT = 0.025, 6.0, 21.0, 6.0
ECHO_TIMES = [0.0023, 0.0046, 0.0069]


def _steady_state(m0, r1, alpha_deg, delta=0.0, b1=1.0):
    """Exact spoiled steady state with a fraction delta of Mz removed before each excitation."""
    alpha = np.deg2rad(alpha_deg) * b1
    e1 = np.exp(-r1 * TR)
    return m0 * np.sin(alpha) * (1 - e1) * (1 - delta) / (1 - (1 - delta) * e1 * np.cos(alpha))


def _write(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), str(path))
    return str(path)


def test_mt_intercept_removes_r2star_decay():
    r2star = np.array([20.0, 35.0])
    s0 = np.array([500.0, 80.0])
    echoes = s0[:, None] * np.exp(-r2star[:, None] * np.asarray(ECHO_TIMES))
    np.testing.assert_allclose(mt_intercept(echoes, ECHO_TIMES, r2star), s0, rtol=1e-12)


def test_compute_mtsat_recovers_small_saturation_and_writes_sidecar(tmp_path):
    shape = (4, 3, 2)
    r1 = np.full(shape, 1.0)
    r1[0] = 0.65
    delta = np.full(shape, 0.017)
    delta[1] = 0.008
    r2star = np.full(shape, 20.0)
    m0 = 1000.0
    pd = _write(tmp_path / "pd.nii", _steady_state(m0, r1, ALPHA_PD))
    t1 = _write(tmp_path / "t1.nii", _steady_state(m0, r1, ALPHA_T1))
    mt_s0 = _steady_state(m0, r1, ALPHA_MT, delta)
    mt_files = [_write(tmp_path / f"mt{i}.nii", mt_s0 * np.exp(-r2star * te)) for i, te in enumerate(ECHO_TIMES)]
    b1 = _write(tmp_path / "b1.nii", np.ones(shape))
    result = ComputeMTsat(
        mt_off_files=[t1, pd],  # any order: the lower flip angle is the PDw
        mt_off_flip_angles=[ALPHA_T1, ALPHA_PD],
        mt_off_repetition_time=TR,
        mt_files=mt_files,
        mt_echo_times=ECHO_TIMES,
        mt_flip_angle=ALPHA_MT,
        mt_repetition_time=TR,
        r2star_file=_write(tmp_path / "r2s.nii", r2star),
        b1_file=b1,
        b1_description="a test map",
    ).run(cwd=str(tmp_path))
    mtsat = np.asarray(nib.load(result.outputs.mtsat_file).dataobj)
    # Helms' rational approximation at 6/21 degrees: within a few percent of the exact delta
    np.testing.assert_allclose(mtsat, 100 * delta, rtol=0.05)
    assert result.outputs.metadata["Units"] == "p.u."
    assert "a test map" in result.outputs.metadata["B1Correction"]
    assert result.outputs.metadata["FlipAngles"] == {"MTw": ALPHA_MT, "PDw": ALPHA_PD, "T1w": ALPHA_T1}


def test_b1_correction_follows_helms_and_can_be_off(tmp_path):
    shape = (2, 2, 2)
    r1, delta = np.full(shape, 1.0), np.full(shape, 0.015)
    pd = _write(tmp_path / "pd.nii", _steady_state(1000.0, r1, ALPHA_PD))
    t1 = _write(tmp_path / "t1.nii", _steady_state(1000.0, r1, ALPHA_T1))
    mt = _write(tmp_path / "mt.nii", _steady_state(1000.0, r1, ALPHA_MT, delta))
    b1 = _write(tmp_path / "b1.nii", np.full(shape, 1.2))
    common = dict(
        mt_off_files=[pd, t1],
        mt_off_flip_angles=[ALPHA_PD, ALPHA_T1],
        mt_off_repetition_time=TR,
        mt_files=[mt],
        mt_echo_times=[0.0023],
        mt_flip_angle=ALPHA_MT,
        mt_repetition_time=TR,
        b1_file=b1,
    )
    on = ComputeMTsat(**common).run(cwd=str(tmp_path))
    corrected = np.asarray(nib.load(on.outputs.mtsat_file).dataobj)
    off = ComputeMTsat(**common, b1_correction=False, b1_note="turned off").run(cwd=str(tmp_path))
    plain = np.asarray(nib.load(off.outputs.mtsat_file).dataobj)
    np.testing.assert_allclose(corrected / plain, 0.6 / (1 - 0.4 * 1.2), rtol=1e-5)
    assert off.outputs.metadata["B1Correction"].startswith("none (turned off)")
    assert "first echo" in off.outputs.metadata["MTwSignal"]


def test_one_flip_angle_is_refused(tmp_path):
    path = _write(tmp_path / "pd.nii", np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="two flip angles"):
        ComputeMTsat(
            mt_off_files=[path],
            mt_off_flip_angles=[6.0],
            mt_off_repetition_time=TR,
            mt_files=[path],
            mt_echo_times=[0.002],
            mt_flip_angle=6.0,
            mt_repetition_time=TR,
        ).run(cwd=str(tmp_path))
