"""B1+ and R1 interfaces against known fields and relaxation rates."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.core.relaxometry import afi_flip_angle_ratio, afi_raw_ratio
from qmri_workflows.interfaces.relaxometry import (
    AFIFlipAngleMap,
    DAMFlipAngleMap,
    FitR1,
    ReadTB1map,
    ReadTFLMap,
    spoiling_choice,
)
from qmri_workflows.io.derivatives import write_nifti
from qmri_workflows.io.errors import BIDSInputError
from qmri_workflows.io.query.derivatives import tb1map_scale
from qmri_workflows.io.resample import PartialCoverageWarning

SHAPE = (20, 22, 18)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _ellipsoid(shape=SHAPE):
    grid = np.indices(shape, dtype=float)
    radius = np.sqrt(sum(((grid[a] - (shape[a] - 1) / 2) / (0.42 * shape[a])) ** 2 for a in range(3)))
    return radius < 1


def _smooth_b1(shape=SHAPE):
    """A smooth transmit field, 0.8 at one side to 1.2 at the other."""
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    y = np.linspace(-1, 1, shape[1])[None, :, None]
    return np.broadcast_to(1.0 + 0.15 * x + 0.05 * y**2, shape).copy()


def _afi_signals(b1, t1, *, tr1=0.02, tr2=0.1, flip_deg=60.0):
    """Exact ideal-spoiling AFI steady state (Yarnykh 2007, eq. 2-3 without T2 terms)."""
    alpha = np.deg2rad(flip_deg) * b1
    e1, e2 = np.exp(-tr1 / t1), np.exp(-tr2 / t1)
    denominator = 1 - e1 * e2 * np.cos(alpha) ** 2
    s1 = np.sin(alpha) * (1 - e2 + (1 - e1) * e2 * np.cos(alpha)) / denominator
    s2 = np.sin(alpha) * (1 - e1 + (1 - e2) * e1 * np.cos(alpha)) / denominator
    return 1000 * s1, 1000 * s2


def _write(path, data, affine=AFFINE):
    return str(write_nifti(path, np.asarray(data, dtype=np.float32), affine))


# --- TB1map units -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("units", "values", "scale"),
    [("percent", 95.0, 0.01), ("p.u.", 95.0, 0.01), ("ratio", 0.95, 1.0), (None, 0.95, 1.0), (None, 95.0, 0.01)],
)
def test_tb1map_units_read_from_sidecar_or_values(units, values, scale):
    assert tb1map_scale(np.full(10, values), units, "b1.nii.gz")[0] == scale


@pytest.mark.parametrize(
    ("units", "value", "message"), [(None, 9.0, "neither a ratio"), ("Hz", 95.0, "neither percent")]
)
def test_tb1map_without_clear_units_is_one_clear_error(units, value, message):
    with pytest.raises(BIDSInputError, match=message) as error:
        tb1map_scale(np.full(10, value), units, "sub-01_TB1map.nii.gz")
    assert "sub-01_TB1map.nii.gz" in str(error.value) and '"Units"' in str(error.value)


def test_read_tb1map_writes_percent(tmp_path):
    ratio = _smooth_b1()
    in_file = _write(tmp_path / "b1.nii", ratio)
    result = ReadTB1map(in_file=in_file, units="ratio").run(cwd=str(tmp_path))
    percent = nib.load(result.outputs.tb1map_file).get_fdata()
    assert np.allclose(percent, 100 * ratio, rtol=1e-6)
    assert result.outputs.metadata["Units"] == "percent"


def test_tfl_map_on_a_coarse_grid_ignores_the_masked_background(tmp_path):
    # a scanner-masked famp (0 outside the head) on a 6 mm grid: the zeros are no flip angle, and
    # interpolating them into the head's edge read B1+ low there (-12 % at the edge on the phantom)
    coarse = np.diag([6.0, 6.0, 6.0, 1.0])
    famp = np.where(_ellipsoid((10, 10, 10)), 800, 0).astype(np.float32)  # B1+ 1 at 80 deg
    famp_file = _write(tmp_path / "famp.nii", famp, coarse)
    fine = np.diag([3.0, 3.0, 3.0, 1.0])
    fine[:3, 3] = -1.5  # voxel centres between the coarse ones
    reference = _write(tmp_path / "ref.nii", np.ones((20, 20, 20)), fine)
    result = ReadTFLMap(
        in_file=famp_file, reference_file=reference, prep_angle=80.0, angle_source="--tb1tfl-prep-angle"
    ).run(cwd=str(tmp_path))
    percent = nib.load(result.outputs.tb1map_file).get_fdata()
    assert percent.shape == (20, 20, 20)
    finite = np.isfinite(percent)
    assert finite.sum() > 0.9 * 8 * _ellipsoid((10, 10, 10)).sum()  # the head's edge stays covered
    assert np.allclose(percent[finite], 100.0, atol=1e-3)


def test_tfl_map_warns_when_the_preparation_may_pass_180_degrees(tmp_path, caplog):
    """famp is 10 x arccos of the saturated / reference signal, at most 1800: past 180 deg the
    angle reads as 360 - angle, and near it noise moves it most. With an 80 deg preparation that
    is B1+ 2.25, within reach at 7 T (the 3 mm phantom with B1+ up to 2.3: the voxels above 2.25
    read 2.6 % low, up to 6 %, and nothing said so); a 3 T field (peak 1.22, 98 deg) is far below."""
    head = _ellipsoid()
    reference = _write(tmp_path / "ref.nii", np.where(head, 100.0, 1.0))
    results = {}
    for name, peak in (("3 T", 1.22), ("7 T", 2.5)):
        b1 = 0.9 + (peak - 0.9) * _smooth_b1_peak()
        angle = np.degrees(np.arccos(np.cos(np.radians(80.0 * b1))))  # folded past 180 deg
        famp = _write(tmp_path / f"famp{name[0]}.nii", np.where(head, np.round(10 * angle), 900.0))
        work = tmp_path / name[0]
        work.mkdir()
        caplog.clear()
        result = ReadTFLMap(
            in_file=famp, reference_file=reference, prep_angle=80.0, angle_source="--tb1tfl-prep-angle"
        ).run(cwd=str(work))
        results[name] = (result.outputs.metadata["FoldCheck"], "folds back" in caplog.text)
    assert (
        results["3 T"][0].startswith("0 % of the head reads a preparation angle above 162 deg")
        and not results["3 T"][1]
    )
    assert "folds back (180 + x deg reads as 180 - x deg)" in results["7 T"][0] and results["7 T"][1]


def test_tfl_slab_warns_once_about_its_coverage(tmp_path):
    # a famp slab covering a third of the maps: one warning naming famp, none about acq-anat,
    # which is read only as the fold check's head (it named "the in-memory image")
    slab = np.diag([2.0, 2.0, 2.0, 1.0])
    slab[2, 3] = 12.0
    famp = _write(tmp_path / "famp.nii", np.full((20, 22, 6), 800.0), slab)
    anat = _write(tmp_path / "anat.nii", np.full((20, 22, 6), 100.0), slab)
    reference = _write(tmp_path / "ref.nii", np.ones(SHAPE))
    with pytest.warns(PartialCoverageWarning) as caught:
        ReadTFLMap(
            in_file=famp, anat_file=anat, reference_file=reference, prep_angle=80.0, angle_source="sidecar FlipAngle"
        ).run(cwd=str(tmp_path))
    messages = [str(w.message) for w in caught if issubclass(w.category, PartialCoverageWarning)]
    assert len(messages) == 1 and "famp.nii" in messages[0]


def test_tfl_map_fills_holes_and_one_voxel_beyond_a_mask_from_the_neighbours(tmp_path):
    # NaN or 0 inside the head (a converted famp, a scanner's mask) read no B1+ there, so no R1, on
    # the famp's own grid, though the same hole on another grid is filled by the resampling (2 % of
    # the phantom's brain NaN in R1 from 2 % NaN in famp); the mask's edge left the brain's edge NaN
    # (1.8 % of the brain with a brain-masked 5 mm famp)
    head = _ellipsoid()
    famp = np.where(head, 800.0, 0.0)
    famp[10, 11, 9] = np.nan
    famp[8, 11, 9] = 0.0
    famp_file = _write(tmp_path / "famp.nii", famp)
    result = ReadTFLMap(in_file=famp_file, prep_angle=80.0, angle_source="sidecar FlipAngle").run(cwd=str(tmp_path))
    percent = nib.load(result.outputs.tb1map_file).get_fdata()
    assert np.allclose(percent[head], 100.0)
    grown = ndimage.binary_dilation(head, np.ones((3, 3, 3), bool))
    assert np.allclose(percent[grown], 100.0) and np.isnan(percent[~grown]).all()


# --- AFI --------------------------------------------------------------------------------------------
def test_afi_map_recovers_a_smooth_field_on_another_grid(tmp_path):
    head = _ellipsoid()
    b1 = _smooth_b1()
    s1, s2 = _afi_signals(b1, t1=np.where(head, 1.2, 4.0))
    s1, s2 = np.where(head, s1, 0.5), np.where(head, s2, 0.4)  # air: a ratio the map must not trust
    s1[3, 3, 3] = np.nan  # a non-finite sample is discarded and filled
    tr1_file, tr2_file = _write(tmp_path / "tr1.nii", s1), _write(tmp_path / "tr2.nii", s2)
    # the map grid: half the voxel size, shifted by half an AFI voxel
    fine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = 1.0
    reference = _write(tmp_path / "grid.nii", np.zeros((36, 40, 32)), affine=fine)
    result = AFIFlipAngleMap(
        tr1_file=tr1_file,
        tr2_file=tr2_file,
        repetition_time_1=0.02,
        repetition_time_2=0.1,
        flip_angle=60.0,
        reference_file=reference,
        smoothing_fwhm=4.0,
    ).run(cwd=str(tmp_path))
    image = nib.load(result.outputs.tb1map_file)
    assert image.shape == (36, 40, 32) and np.allclose(image.affine, fine)
    # truth on the fine grid: world = voxel + 1 mm, AFI voxel = world / 2
    grid = (np.indices((36, 40, 32), dtype=float) + 1.0) / 2.0
    inside = np.all([(grid[a] > 4) & (grid[a] < SHAPE[a] - 5) for a in range(3)], axis=0)
    from scipy import ndimage

    truth = ndimage.map_coordinates(b1, grid.reshape(3, -1), order=1).reshape(grid.shape[1:])
    in_head = inside & (
        ndimage.map_coordinates(head.astype(float), grid.reshape(3, -1), order=0).reshape(truth.shape) > 0
    )
    error = image.get_fdata()[in_head] / (100 * truth[in_head]) - 1
    # the first-order AFI formula is biased by ~0.2 % at T1 1.2 s; smoothing a linear field is exact
    assert np.median(np.abs(error)) < 0.006, np.median(np.abs(error))
    metadata = result.outputs.metadata
    assert metadata["Units"] == "percent" and metadata["NonFiniteInputVoxels"] == 1
    assert "Yarnykh" in metadata["EstimationReference"]


def test_afi_map_removes_the_noise_floor_measured_in_the_air(tmp_path):
    """8-channel root-sum-of-squares magnitudes: the floor, measured in the air of the TR1 image, is
    removed from both images (the map read 2-3 % low with it). The air gives the floor's power
    2 N sigma^2 itself, so a wrong number of channels (1 here) leaves the correction unchanged."""
    shape = (32, 34, 28)
    head = _ellipsoid(shape)
    b1 = _smooth_b1(shape)
    s1, s2 = _afi_signals(b1, t1=1.2)
    sigma, n_channels = float(np.median(s1[head])) / 20.0, 8
    rng = np.random.default_rng(7)
    sensitivity = np.exp(1j * rng.uniform(0, 2 * np.pi, n_channels)) / np.sqrt(n_channels)
    magnitudes = []
    for signal in (s1, s2):
        noise = rng.normal(0.0, sigma, shape + (n_channels, 2)) @ np.array([1.0, 1.0j])
        channels = np.where(head, signal, 0.0)[..., None] * sensitivity + noise
        magnitudes.append(np.sqrt(np.sum(np.abs(channels) ** 2, axis=-1)))
    files = [_write(tmp_path / f"{name}.nii", data) for name, data in zip(("tr1", "tr2"), magnitudes)]
    interior = ndimage.binary_erosion(head, iterations=3)
    median_error = {}
    for n_coils in (1, n_channels):
        (tmp_path / str(n_coils)).mkdir()
        result = AFIFlipAngleMap(
            tr1_file=files[0],
            tr2_file=files[1],
            repetition_time_1=0.02,
            repetition_time_2=0.1,
            flip_angle=60.0,
            n_coils=n_coils,
        ).run(cwd=str(tmp_path / str(n_coils)))
        b1_map = nib.load(result.outputs.tb1map_file).get_fdata() / 100
        median_error[n_coils] = float(np.median(b1_map[interior] / b1[interior] - 1))
        assert result.outputs.metadata["NoiseFloorCorrection"].startswith(f"sqrt(M^2 - 2 N sigma^2) with N = {n_coils}")
    with_floor = afi_flip_angle_ratio(*magnitudes, 0.02, 0.1, math.radians(60.0), voxel_size=(2.0,) * 3).b1
    floor_error = float(np.median(with_floor[interior] / b1[interior] - 1))
    print(f"\nAFI map, median error: {floor_error:+.2%} with the floor, {median_error[n_channels]:+.2%} without")
    assert floor_error < -0.015
    assert abs(median_error[n_channels]) < 0.005
    assert median_error[1] == pytest.approx(median_error[n_channels], abs=1e-4)


def test_afi_map_without_air_noise_says_the_floor_stays(tmp_path):
    head = _ellipsoid()
    s1, s2 = _afi_signals(_smooth_b1(), t1=1.2)
    tr1_file = _write(tmp_path / "tr1.nii", np.where(head, s1, 0.0))
    tr2_file = _write(tmp_path / "tr2.nii", np.where(head, s2, 0.0))
    result = AFIFlipAngleMap(
        tr1_file=tr1_file, tr2_file=tr2_file, repetition_time_1=0.02, repetition_time_2=0.1, flip_angle=60.0
    ).run(cwd=str(tmp_path))
    assert result.outputs.metadata["NoiseFloorCorrection"].startswith("none: ")


def test_afi_pair_without_usable_ratio_names_the_files(tmp_path):
    ones = np.ones(SHAPE) + np.random.default_rng(0).uniform(0, 0.01, SHAPE)
    tr1_file, tr2_file = _write(tmp_path / "tr1.nii", ones), _write(tmp_path / "tr2.nii", 2 * ones)
    with pytest.raises(Exception, match="swapped") as error:
        AFIFlipAngleMap(
            tr1_file=tr1_file, tr2_file=tr2_file, repetition_time_1=0.02, repetition_time_2=0.1, flip_angle=60.0
        ).run(cwd=str(tmp_path))
    assert "tr1.nii" in str(error.value)


# --- R1 ---------------------------------------------------------------------------------------------
def _vfa(tmp_path, r1, b1, flips=(6.0, 21.0), tr=0.025, m0=1000.0):
    files = []
    for index, flip in enumerate(flips):
        actual, e1 = math.radians(flip) * b1, np.exp(-tr * r1)
        signal = m0 * np.sin(actual) * (1 - e1) / (1 - e1 * np.cos(actual))  # Ernst
        files.append(_write(tmp_path / f"s0_{index}.nii", signal))
    return files


def _fit(tmp_path, files, flips, **inputs):
    return FitR1(signal_files=files, flip_angles=list(flips), repetition_time=0.025, **inputs).run(cwd=str(tmp_path))


@pytest.mark.parametrize("method", ["exact", "linear", "nonlinear"])
def test_fit_r1_is_exact_on_ernst_signals_with_b1(tmp_path, method):
    head = _ellipsoid()
    r1 = np.where(head, np.linspace(0.3, 1.6, head.size).reshape(SHAPE), 0.5)
    b1 = _smooth_b1()
    files = _vfa(tmp_path, r1, b1)
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    b1_file = _write(tmp_path / "b1.nii", 100 * b1)
    result = _fit(
        tmp_path, files, (6.0, 21.0), mask_file=mask, b1_file=b1_file, method=method, spoiling_correction=False
    )
    estimate = nib.load(result.outputs.r1_file).get_fdata()
    assert np.allclose(estimate[head], r1[head], rtol=1e-4)
    assert np.all(estimate[~head] == 0)
    t1 = nib.load(result.outputs.t1_file).get_fdata()
    assert np.allclose(t1[head] * estimate[head], 1, rtol=1e-5)
    assert np.allclose(nib.load(result.outputs.m0_file).get_fdata()[head], 1000, rtol=1e-4)
    assert np.allclose(nib.load(result.outputs.b1_file).get_fdata(), b1, rtol=1e-6)
    metadata = result.outputs.metadata
    assert metadata["B1Correction"].startswith("TB1map") and metadata["SpoilingCorrection"] == "none"
    assert metadata["FittedVoxels"] == head.sum() and metadata["UndeterminedR1Voxels"] == 0


def test_fit_r1_without_b1_is_biased_and_says_so(tmp_path):
    head = _ellipsoid()
    r1 = np.full(SHAPE, 1.0)
    b1 = _smooth_b1()
    files = _vfa(tmp_path, r1, b1)
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    result = _fit(tmp_path, files, (6.0, 21.0), mask_file=mask, spoiling_correction=False, b1_note="no B1+ data")
    estimate = nib.load(result.outputs.r1_file).get_fdata()[head]
    # R1 scales about as B1^2 at these angles: 0.8-1.2 -> errors of tens of percent
    assert np.max(np.abs(estimate - 1)) > 0.2
    assert "no B1+ data" in result.outputs.metadata["B1Correction"]


def test_fit_r1_counts_non_finite_voxels(tmp_path):
    head = _ellipsoid()
    files = _vfa(tmp_path, np.full(SHAPE, 1.0), np.ones(SHAPE))
    data = nib.load(files[1]).get_fdata()
    data[10, 11, 9] = np.nan
    files[1] = _write(tmp_path / "s0_nan.nii", data)
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    result = _fit(tmp_path, files, (6.0, 21.0), mask_file=mask, spoiling_correction=False)
    r1 = nib.load(result.outputs.r1_file).get_fdata()
    assert np.isnan(r1[10, 11, 9]) and np.isfinite(r1[head]).sum() == head.sum() - 1
    assert result.outputs.metadata["NonFiniteInputVoxels"] == 1


def test_exact_method_refuses_three_flip_angles(tmp_path):
    files = _vfa(tmp_path, np.full(SHAPE, 1.0), np.ones(SHAPE), flips=(4.0, 10.0, 21.0))
    with pytest.raises(Exception, match="exact solves two flip angles"):
        _fit(tmp_path, files, (4.0, 10.0, 21.0), method="exact", spoiling_correction=False)


def test_three_flip_angles_give_a_standard_error(tmp_path):
    rng = np.random.default_rng(3)
    head = _ellipsoid()
    files = _vfa(tmp_path, np.full(SHAPE, 1.0), np.ones(SHAPE), flips=(4.0, 10.0, 21.0))
    noisy = [
        _write(tmp_path / f"n{i}.nii", nib.load(f).get_fdata() + rng.normal(0, 1.0, SHAPE)) for i, f in enumerate(files)
    ]
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    result = _fit(tmp_path, noisy, (4.0, 10.0, 21.0), mask_file=mask, spoiling_correction=False, noise_sigma=1.0)
    r1 = nib.load(result.outputs.r1_file).get_fdata()[head]
    stderr = nib.load(result.outputs.r1_stderr_file).get_fdata()[head]
    # the published standard error matches the scatter of the estimates
    assert 0.8 < np.sqrt(np.mean(stderr**2)) / np.std(r1) < 1.25


@pytest.mark.parametrize(
    ("increment", "manufacturer", "used", "source"),
    [
        (117.0, "Siemens", 117.0, "SpoilingRFPhaseIncrement 117 deg (sidecar)"),
        (None, "SIEMENS Healthineers", 50.0, "default of Manufacturer"),
        (None, "Philips Medical Systems", 150.0, "default of Manufacturer"),
        (None, None, None, 'add "SpoilingRFPhaseIncrement"'),
    ],
)
def test_spoiling_increment_and_its_provenance(increment, manufacturer, used, source):
    value, text = spoiling_choice(True, increment, manufacturer)
    assert value == used and source in text


def test_fit_r1_records_the_spoiling_correction(tmp_path):
    head = _ellipsoid()
    files = _vfa(tmp_path, np.full(SHAPE, 1.0), np.ones(SHAPE))
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    corrected = _fit(tmp_path, files, (6.0, 21.0), mask_file=mask, manufacturer="GE MEDICAL SYSTEMS")
    metadata = corrected.outputs.metadata
    assert metadata["SpoilingRFPhaseIncrementUsed"] == 117.0
    assert "default of Manufacturer" in metadata["SpoilingRFPhaseIncrementSource"]
    assert any("Baudrexel" in reference for reference in metadata["EstimationReference"])
    json.dumps(metadata)  # sidecar-ready
    # on ideally spoiled signals the correction moves R1 (what it would remove from real data)
    r1 = nib.load(corrected.outputs.r1_file).get_fdata()[head]
    assert 0.005 < abs(np.median(r1) - 1) < 0.1


def test_fit_r1_removes_the_afi_formula_bias_at_the_fitted_t1(tmp_path):
    head = _ellipsoid()
    r1 = np.where(head, np.linspace(0.3, 1.6, head.size).reshape(SHAPE), 0.5)
    b1 = _smooth_b1()
    files = _vfa(tmp_path, r1, b1)
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    # what the first-order AFI formula reads from an exact AFI pair at each voxel's T1
    s1, s2 = _afi_signals(b1, 1.0 / r1)
    read = afi_raw_ratio(s1, s2, 0.02, 0.1, np.deg2rad(60.0))
    b1_file = _write(tmp_path / "b1.nii", 100 * read)
    plain = _fit(tmp_path, files, (6.0, 21.0), mask_file=mask, b1_file=b1_file, spoiling_correction=False)
    # read before the next run writes its maps in the same folder
    error_plain = nib.load(plain.outputs.r1_file).get_fdata()[head] / r1[head] - 1
    unbiased = _fit(
        tmp_path,
        files,
        (6.0, 21.0),
        mask_file=mask,
        b1_file=b1_file,
        spoiling_correction=False,
        afi_repetition_times=[0.02, 0.1],
        afi_flip_angle=60.0,
    )
    error = nib.load(unbiased.outputs.r1_file).get_fdata()[head] / r1[head] - 1
    assert np.median(np.abs(error_plain)) > 2e-3
    assert np.max(np.abs(error)) < 2e-4
    assert "finite-TR/T1 bias removed" in unbiased.outputs.metadata["B1Correction"]


def test_two_flip_angle_standard_error_from_the_r2star_fit_matches_the_scatter(tmp_path):
    """Multi-echo VFA with noise (SNR 50), FitR2star then FitR1 as the App chains them: with two flip
    angles the R1 standard error comes from the intercepts' covariance and matches the scatter; the
    spoiling correction takes each voxel's T2 from its R2* and says so."""
    from qmri_workflows.core.signal import spgr_signal
    from qmri_workflows.interfaces.r2star import FitR2star

    rng = np.random.default_rng(8)
    head = _ellipsoid()
    flips, tr, echo_times = (6.0, 21.0), 0.025, [0.0023 * (k + 1) for k in range(6)]
    r1, r2star, m0 = 1.0, 20.0, 1000.0
    sigma = float(spgr_signal(m0, r1, 0.0, np.deg2rad(21.0), tr, 0.0)) / 50.0
    files, echoes, flip_of = [], [], []
    for index, flip in enumerate(flips):
        for echo, te in enumerate(echo_times):
            clean = spgr_signal(m0, r1, r2star, np.deg2rad(flip), tr, te)
            files.append(_write(tmp_path / f"f{index}e{echo}.nii", clean + rng.normal(0, sigma, SHAPE)))
            echoes.append(te)
            flip_of.append(flip)
    mask = _write(tmp_path / "mask.nii", head.astype(np.uint8))
    r2star_fit = FitR2star(magnitude_files=files, echo_times=echoes, flip_angles=flip_of, mask_file=mask).run(
        cwd=str(tmp_path)
    )
    result = _fit(
        tmp_path,
        list(r2star_fit.outputs.s0_files),
        flips,
        mask_file=mask,
        phase_increment=50.0,
        r2star_file=r2star_fit.outputs.r2star_file,
        r2star_stderr_file=r2star_fit.outputs.r2star_stderr_file,
        echo_times=[echo_times, echo_times],
    )
    metadata = result.outputs.metadata
    assert metadata["SpoilingCorrectionT2"] == "r2star" and "intercepts" in metadata["R1StandardErrorSource"]
    estimates = nib.load(result.outputs.r1_file).get_fdata()[head]
    stderr = nib.load(result.outputs.r1_stderr_file).get_fdata()[head]
    assert np.all(np.isfinite(stderr))
    ratio = np.sqrt(np.mean(stderr**2)) / np.std(estimates)
    print(f"\nR1 SE / scatter {ratio:.3f} over {head.sum()} voxels")
    assert 0.85 < ratio < 1.15


# --- double-angle method ----------------------------------------------------------------------------
def _ernst(m0, t1, alpha, tr):
    e1 = np.exp(-tr / t1)
    return m0 * np.sin(alpha) * (1 - e1) / (1 - e1 * np.cos(alpha))


@pytest.mark.parametrize("vfa_grid", ["same", "finer"])
def test_dam_map_reads_each_voxel_at_its_own_t1(tmp_path, vfa_grid):
    """A head of white matter (T1 0.85 s) around a CSF core (T1 4 s), DAM at 60/120 deg and TR 2 s:
    the long-TR reading is +5 % and +24 % high there, and smoothing mixes the two. With the VFA
    images' T1 the map is within 0.5 % in both (the VFA on the pair's grid or a finer one)."""
    head = _ellipsoid()
    core = _ellipsoid() & (np.indices(SHAPE)[0] > 7) & (np.indices(SHAPE)[0] < 12)
    b1 = _smooth_b1()
    t1 = np.where(core, 4.0, 0.85)
    m0 = np.where(head, 1000.0, 0.0)
    pair = [_write(tmp_path / f"dam{i}.nii", _ernst(m0, t1, b1 * math.radians(a), 2.0)) for i, a in ((1, 60), (2, 120))]
    if vfa_grid == "same":
        vfa_affine, grid = AFFINE, (head, t1, b1)
    else:  # half the voxel size: the T1 goes to the pair's grid and the B1+ map to the VFA's
        vfa_affine = np.diag([1.0, 1.0, 1.0, 1.0])
        zoom = [ndimage.zoom(a.astype(float), 2, order=0) for a in (head, t1, b1)]
        grid = (zoom[0] > 0, zoom[1], zoom[2])
    vfa_m0 = np.where(grid[0], 700.0, 0.0)
    vfa = [
        _write(tmp_path / f"vfa{flip}.nii", _ernst(vfa_m0, grid[1], grid[2] * math.radians(flip), 0.015), vfa_affine)
        for flip in (4.0, 20.0)
    ]
    errors = {}
    for name, extra in (
        ("long TR", {}),
        ("T1", {"vfa_files": vfa, "vfa_flip_angles": [4.0, 20.0], "vfa_repetition_time": 0.015}),
    ):
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        result = DAMFlipAngleMap(
            flip1_file=pair[0], flip2_file=pair[1], flip_angles=(60.0, 120.0), repetition_time=2.0,
            smoothing_fwhm=4.0, **extra,
        ).run(cwd=str(work))  # fmt: skip
        estimate = nib.load(result.outputs.tb1map_file).get_fdata() / 100
        inner = ndimage.binary_erosion(head, iterations=2)
        errors[name] = {
            region: float(np.median(np.abs(estimate / b1 - 1)[mask]))
            for region, mask in (("WM", inner & ~ndimage.binary_dilation(core, iterations=2)), ("CSF", inner & core))
        }
        errors[name + " note"] = result.outputs.metadata["T1Correction"]
    print(f"\nDAM median |error|: {errors}")
    assert errors["long TR"]["CSF"] > 0.1 and errors["long TR"]["WM"] > 0.03
    assert errors["T1"]["WM"] < 0.005 and errors["T1"]["CSF"] < 0.005
    assert errors["long TR note"].startswith("none: no VFA images")
    assert "round(s)" in errors["T1 note"] and "DESPOT1 of the 2 VFA images" in errors["T1 note"]


def test_dam_map_warns_when_the_field_may_pass_the_fold(tmp_path, caplog):
    """60/120 deg folds at B1+ = 1.5 (sin(B1 a2) changes sign): a field peaking at 1.65, as at 7 T,
    reads as 1.35 in the centre with no sign in the ratio. Found on the 3 mm phantom with its B1+
    scaled by 1.35: the voxels above 1.55 read 10.7 % low and nothing said so; a 3 T field (peak
    1.22) puts no voxel above 0.9 x the limit."""
    head = _ellipsoid()
    t1 = np.full(SHAPE, 1.0)
    results = {}
    for name, peak in (("3 T", 1.22), ("7 T", 1.65)):
        b1 = 0.9 + (peak - 0.9) * _smooth_b1_peak()
        m0 = np.where(head, 1000.0, 0.0)
        pair = [
            _write(tmp_path / f"{name[0]}dam{i}.nii", np.abs(_ernst(m0, t1, b1 * math.radians(a), 100.0)))
            for i, a in ((1, 60), (2, 120))
        ]
        work = tmp_path / name[0]
        work.mkdir()
        caplog.clear()
        result = DAMFlipAngleMap(
            flip1_file=pair[0], flip2_file=pair[1], flip_angles=(60.0, 120.0), repetition_time=100.0,
            smoothing_fwhm=4.0,
        ).run(cwd=str(work))  # fmt: skip
        results[name] = (result.outputs.metadata["FoldCheck"], "folds back" in caplog.text)
    assert results["3 T"][0].startswith("0 % of the trusted voxels") and not results["3 T"][1]
    assert "folds back (150 + x % reads as 150 - x %)" in results["7 T"][0] and results["7 T"][1]


def _smooth_b1_peak():
    """0 at the edge of the field of view to 1 in its centre."""
    grid = np.indices(SHAPE, dtype=float)
    centre = (np.array(SHAPE, dtype=float)[:, None, None, None] - 1) / 2
    radius = np.sqrt((((grid - centre) / centre) ** 2).sum(axis=0))
    return np.clip(1 - radius, 0, 1)
