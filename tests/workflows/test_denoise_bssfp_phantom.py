"""Denoising of the bSSFP phase cycles (issue 11) against the phantom, at 2 mm, SNR 20.

The phantom of ``tests/denoising_case.py`` (SNR 20 in white matter at the first GRE echo, a g-factor
map raising the noise by up to 50 % towards the centre) with its phase-cycled bSSFP: 4 cycles at 15
and 50 deg, complex. It is simulated twice with one seed, with and without noise. The R2 of each
method comes from the same chain as the App's: noise map from the cycles (air SD and homomorphic
map, no echo trains), denoising, the geometric solution per flip angle, and DESPOT2 with the true R1
and B1+. It is compared with that chain on the noiseless cycles, so that only what denoising does is
measured, not the 1 ms pulses the simple DESPOT2 here ignores. The App's run checks the plumbing.

Regions with fewer than 100 interior voxels (putamen, caudate, lesions) keep the noise of their
mean: at 2 mm the raw putamen's R2 is already 5 % off (46 voxels, a band-free ratio 1 % off). Those
are judged against the truth or, failing that, must be no further from it than the raw map.
"""

import json
import math

import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.core import denoise, noise
from qmri_workflows.core.bssfp import fit_despot2, geometric_solution
from qmri_workflows.core.masking import air_mask
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol
from tests.denoising_case import CONTRAST_CHANGE, MEAN_BIAS, RMSE_BELOW_NLM, RMSE_BELOW_NONE, load
from tests.phantom_datasets import dataset_without

pytestmark = pytest.mark.slow

RESOLUTION = 2.0
FLIP_ANGLES = (15.0, 50.0)
INCREMENTS = np.deg2rad([0.0, 90.0, 180.0, 270.0])
REPETITION_TIME = 0.005
REGIONS = ("WM", "CGM", "CAU", "PUT", "THA", "LEA", "LLA", "LCI")
LESIONS = ("LEA", "LLA", "LCI")
#: Regions whose mean is judged against the truth alone.
LARGE = 100


def _simulate(folder, snr):
    root = write_phantom_dataset(
        folder, resolution=RESOLUTION, snr=snr, subjects=1, seed=3, oversample=1, noise_gfactor=0.5,
        protocol=Protocol(rb1cor=None),
    )  # fmt: skip
    anat = root / "sub-01" / "anat"
    names = [f"sub-01_acq-bssfp{round(math.degrees(i)):03d}_flip-{f}" for f in (1, 2) for i in INCREMENTS]
    magnitude = np.stack([load(anat / f"{name}_part-mag_VFA.nii.gz") for name in names], -1)
    phase = np.stack([load(anat / f"{name}_part-phase_VFA.nii.gz") for name in names], -1)
    return root, magnitude, phase


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("denoise-bssfp")
    root, magnitude, phase = _simulate(folder / "noisy", 20.0)
    _, clean_magnitude, clean_phase = _simulate(folder / "clean", math.inf)
    truth = root / "derivatives" / "phantom" / "sub-01"
    brain = load(truth / "anat" / "sub-01_desc-brain_mask.nii.gz") > 0
    regions = {}
    for name in REGIONS:
        mask = load(truth / "anat" / f"sub-01_label-{name}_desc-interior_mask.nii.gz") > 0
        if mask.sum() >= 5:
            regions[name] = mask
    voxel_size = (RESOLUTION,) * 3
    air = air_mask(magnitude[..., 0], voxel_size=voxel_size)
    sigma_air = noise.estimate_sigma_air(magnitude[..., 0], air, voxel_size=voxel_size)
    return {
        "root": root,
        "magnitude": magnitude,
        "phase": phase,
        "brain": brain,
        "regions": regions,
        "r1": load(truth / "anat" / "sub-01_R1map.nii.gz"),
        "b1": load(truth / "fmap" / "sub-01_TB1map.nii.gz") / 100.0,
        "true_sigma": load(truth / "anat" / "sub-01_desc-noise_sigmamap.nii.gz"),
        "sigma_map": noise.estimate_sigma_map(magnitude, sigma_global=sigma_air, voxel_size=voxel_size),
        "clean": (clean_magnitude, clean_phase),
    }


def _r2(case, magnitude, phase):
    """DESPOT2 (true R1 and B1+) on the geometric solution of each flip angle's four cycles."""
    signal = magnitude * np.exp(1j * phase)
    band_free = np.stack(
        [np.abs(geometric_solution(signal[..., 4 * f : 4 * f + 4], INCREMENTS)) for f in range(2)], axis=-1
    )
    fitted = case["brain"] & np.isfinite(band_free).all(axis=-1) & (case["r1"] > 0)
    result = fit_despot2(
        np.where(fitted[..., None], band_free, 0.0),
        np.deg2rad(FLIP_ANGLES),
        REPETITION_TIME,
        np.where(fitted, case["r1"], 1.0),
        b1=np.where(fitted, case["b1"], 1.0),
        mask=fitted,
    )
    return np.where(fitted, result.r2, np.nan)


@pytest.fixture(scope="module")
def figures(case):
    """``{method: (rmse, {region: mean bias}, {lesion: contrast change})}`` of R2, and the reference."""
    reference = _r2(case, *case["clean"])
    magnitude, phase, sigma_map, brain = case["magnitude"], case["phase"], case["sigma_map"], case["brain"]
    denoised = {
        "none": (magnitude, phase),
        # dipy's NLM has no complex mode: the magnitudes, with the raw phase
        "nlm": (denoise.nlmeans_volumes(magnitude, sigma_map, mask=brain), phase),
        "multispectral": denoise.multispectral_denoise_complex(magnitude, phase, sigma_map, mask=brain)[:2],
    }
    regions = case["regions"]
    tissue = np.any(list(regions.values()), axis=0)
    wm = regions["WM"]
    out = {}
    for method, (m, p) in denoised.items():
        r2 = _r2(case, m, p)
        rmse = float(np.sqrt(np.nanmean((r2 - reference)[tissue] ** 2)))
        bias = {k: float(np.nanmean(r2[v]) / np.nanmean(reference[v]) - 1) for k, v in regions.items()}
        contrast = {
            k: float(
                (np.nanmean(r2[regions[k]]) / np.nanmean(r2[wm]) - 1)
                / (np.nanmean(reference[regions[k]]) / np.nanmean(reference[wm]) - 1)
                - 1
            )
            for k in LESIONS
            if k in regions
        }
        out[method] = (rmse, bias, contrast)
        print(f"\n{method:13s} R2 RMSE {rmse:.3f} 1/s; region bias "
              + " ".join(f"{k} {v:+.1%}" for k, v in bias.items()) + "; contrast change "
              + " ".join(f"{k} {v:+.1%}" for k, v in contrast.items()))  # fmt: skip
    return out


def _assert_noise_map(estimate, case):
    """Within 8 % everywhere in the brain (issue 11: 10 %).

    Measured (seed 3): median |error| 1.3 %, 99th percentile 4.2 %, max 5.9 % (seeds 4 and 5: max
    4.7 and 5.3 %). It was 10.8 % low in a cluster at the brain's edge, from the air samples whose
    own noise fell low (told by a mean that held them) and from a low-pass that read the map at the
    samples' centroid, in the air (``core.noise.estimate_sigma_map``).
    """
    error = np.abs(estimate[case["brain"]] / case["true_sigma"][case["brain"]] - 1)
    quantiles = np.percentile(error, [50, 99, 100])
    print(
        "\nbSSFP noise map in the brain: |error| median {:.3f}, 99th percentile {:.3f}, max {:.3f}".format(*quantiles)
    )
    assert quantiles[0] < 0.02
    assert quantiles[1] < 0.06
    assert quantiles[2] < 0.08


def test_noise_map_of_the_phase_cycles(case):
    _assert_noise_map(case["sigma_map"], case)


def test_complex_multispectral_denoising_lowers_the_r2_error(figures):
    rmse = {method: figures[method][0] for method in figures}
    print(f"\nR2: multispectral RMSE {1 - rmse['multispectral'] / rmse['none']:.1%} below none, "
          f"{1 - rmse['multispectral'] / rmse['nlm']:.1%} below dipy NLM (magnitudes)")  # fmt: skip
    assert rmse["multispectral"] <= (1 - RMSE_BELOW_NONE) * rmse["none"]
    assert rmse["multispectral"] <= (1 - RMSE_BELOW_NLM) * rmse["nlm"]


def test_r2_region_means_and_lesion_contrasts_are_kept(case, figures):
    _, bias, contrast = figures["multispectral"]
    _, raw_bias, raw_contrast = figures["none"]
    for name, mask in case["regions"].items():
        if mask.sum() >= LARGE:
            assert abs(bias[name]) < MEAN_BIAS, f"{name}: mean R2 biased by {bias[name]:+.1%}"
        else:
            assert abs(bias[name]) < max(MEAN_BIAS, abs(raw_bias[name])), (
                f"{name} ({mask.sum()} voxels): mean R2 {bias[name]:+.1%}, raw {raw_bias[name]:+.1%}"
            )
    for name, change in contrast.items():
        assert abs(change) < max(CONTRAST_CHANGE, abs(raw_contrast[name])), (
            f"{name}: R2 contrast changed by {change:+.1%} (raw {raw_contrast[name]:+.1%})"
        )


def test_app_denoises_the_phase_cycles_as_complex_data(case, tmp_path):
    # without the GRE phase (no QSM to wait for); the bSSFP keeps its phase
    raw = dataset_without(case["root"], tmp_path / "raw", ("phase",))
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "work"),
         "--denoise-search-radius", "1"]
    )  # fmt: skip
    assert code == 0
    anat = out / "sub-01" / "anat"
    sidecar = json.loads((anat / "sub-01_R2map.json").read_text())
    assert sidecar["DenoisingMethod"] == "multispectral"
    assert sidecar["DenoisingComplex"] is True
    assert sidecar["DenoisingSearchRadius"] == 1
    assert "denoised" in sidecar["R2StandardErrorNote"]
    _assert_noise_map(load(anat / "sub-01_desc-bssfpnoise_sigmamap.nii.gz"), case)
    r2 = load(anat / "sub-01_R2map.nii.gz")
    wm = case["regions"]["WM"]
    true_r2 = load(case["root"] / "derivatives" / "phantom" / "sub-01" / "anat" / "sub-01_R2map.nii.gz")
    print(f"\nApp R2 in white matter: median {np.median(r2[wm]):.2f} 1/s, truth {np.median(true_r2[wm]):.2f}")
    assert np.median(r2[wm]) == pytest.approx(np.median(true_r2[wm]), rel=0.03)
    assert "bssfpnoise_sigmamap" in (out / ".bidsignore").read_text()
    assert run.run_validator(out) in (None, [])
