"""Noise estimation and denoising against the digital phantom's ground truth, at 2 mm.

One 2 mm phantom of ``tests/denoising_case.py`` (SNR 20 in white matter, first echo; a g-factor map
raising the noise by up to 50 % towards the centre) serves every test, with the measurement and
criteria described there. Run with ``-s -n 0`` for the figures.

At 2 mm a lesion's interior has a few dozen voxels and the raw noise left in its mean is about the
2 % of the criterion (LCI's raw mean R2* is 6 % off): each lesion is judged against the truth or,
where its raw map's own noise draw is already out of the criterion, by what denoising moved
against the raw map. Multispectral NLM, then the restoration of what it removed where that is
structure (``core.denoise.restore_structure``), keeps every lesion so. The same measurement at
1 mm (``test_denoise_phantom_1mm.py``, slow): there the RMSE of R2*, R1 and PD falls by 84 % (no
denoising) and about 40 % (dipy NLM), R1 and PD keep every region within 2 % and every lesion's
contrast within 5 %, and R2* all but the cortical lesion's (+3 points of mean, -7 % contrast
against the raw map: its signal is statistically the cortex's).
"""

import json

import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.core import noise
from tests.denoising_case import (
    METHODS,
    assert_lesions_kept,
    assert_rmse_and_large_regions,
    denoise_with,
    figures,
    fit_maps,
    load,
    print_figures,
    r1_and_pd,
    simulate,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("denoise") / "raw", resolution=2.0)


def test_global_noise_estimates_within_10_percent(phantom):
    images, true_map = phantom.images, phantom.sigma_map
    air = phantom.air
    sigma = phantom.air_sigma()
    true_air = float(np.median(true_map[air]))
    piesno = noise.estimate_sigma_piesno(images)
    n_effective, sigma_effective = noise.estimate_effective_coils(images[..., 0][air])
    print(f"\nnoise SD in the air: true {true_air:.3f}, median over air blocks {sigma:.3f}, PIESNO {piesno:.3f}, "
          f"moments {sigma_effective:.3f} with {n_effective:.2f} effective coils")  # fmt: skip
    assert sigma == pytest.approx(true_air, rel=0.10)
    assert piesno == pytest.approx(true_air, rel=0.10)
    assert sigma_effective == pytest.approx(true_air, rel=0.10)
    assert n_effective == pytest.approx(1.0, rel=0.10)


def test_noise_map_within_10_percent_of_the_simulated_map(phantom):
    true_map = phantom.sigma_map
    relative = phantom.measured_noise_map() / true_map - 1
    for name, mask in (("brain", phantom.brain), ("head", phantom.head)):
        inside = relative[mask]
        print(f"\nnoise map in the {name}: median {np.median(inside):+.3f}, max |error| {np.abs(inside).max():.3f}")
        assert np.abs(inside).max() < 0.10
    assert true_map.max() > 1.3 * true_map.min()  # the map has something to find


@pytest.fixture(scope="module")
def denoised_maps(phantom):
    """R2*, R1 and PD of each method ("none", "nlm", "multispectral")."""
    sigma_map = phantom.measured_noise_map()
    return {method: fit_maps(denoise_with(method, phantom, sigma_map), phantom.brain) for method in METHODS}


@pytest.fixture(scope="module")
def r2star_maps(denoised_maps):
    return {name: maps["R2*"] for name, maps in denoised_maps.items()}


@pytest.fixture(scope="module")
def noiseless_r1_and_pd(phantom):
    return r1_and_pd(phantom.s0, phantom.brain)


def _assert_issue_criteria(quantity, by_method):
    """Issue 11's RMSE and large-region criteria; lesions no worse than with per-volume NLM."""
    assert_rmse_and_large_regions(quantity, by_method)
    # Lesions (a few dozen voxels at 2 mm) move no more than with per-volume NLM, whose patches of one
    # image tell a lesion from noise worse.
    _, bias, contrast = by_method["multispectral"]
    _, nlm_bias, _ = by_method["nlm"]
    assert {"LEA", "LLA", "LCI"} <= set(contrast)
    for name in contrast:
        assert abs(bias[name]) <= abs(nlm_bias[name]) + 0.01, f"{name}: {bias[name]:+.1%} vs NLM {nlm_bias[name]:+.1%}"


def test_multispectral_denoising_lowers_the_r2star_error(phantom, r2star_maps):
    by_method = {name: figures(r2star, phantom.r2star, phantom.regions) for name, r2star in r2star_maps.items()}
    print_figures("R2* (1/s)", by_method)
    _assert_issue_criteria("R2*", by_method)


def test_lesion_contrast_and_means_are_kept(phantom, r2star_maps):
    """R2* contrast of LEA / LLA / LCI: -1 / +1 / -9 % against the truth; LCI's raw map is -7 % already.

    Without the restoration (multispectral NLM alone) LEA's fell by 14 %; with distances over all 16
    images instead of the 3 signal components, by 15 %.
    """
    by_method = {name: figures(r2star, phantom.r2star, phantom.regions) for name, r2star in r2star_maps.items()}
    assert_lesions_kept("R2*", by_method, against="either")


def test_app_denoises_and_writes_the_noise_map(phantom, tmp_path):
    out = tmp_path / "out"
    code = run.main(
        [str(phantom.root), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "work"),
         "--denoise-search-radius", "1"]
    )  # fmt: skip
    assert code == 0
    anat = out / "sub-01" / "anat"
    noise_map = load(anat / "sub-01_desc-noise_sigmamap.nii.gz")
    relative = noise_map[phantom.brain] / phantom.sigma_map[phantom.brain] - 1
    assert np.abs(relative).max() < 0.10
    sidecar = json.loads((anat / "sub-01_R2starmap.json").read_text())
    assert sidecar["DenoisingMethod"] == "multispectral"
    assert sidecar["DenoisingSearchRadius"] == 1
    assert 1 <= sidecar["DenoisingSimilarityComponents"] < 8  # the signal subspace of 16 images
    assert 0.0 < sidecar["DenoisingRestoredFraction"] < 0.8
    assert "noise_sigmamap" in (out / ".bidsignore").read_text()
    assert run.run_validator(out) in (None, [])


@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_multispectral_denoising_lowers_the_r1_and_pd_error(phantom, denoised_maps, noiseless_r1_and_pd, quantity):
    reference = noiseless_r1_and_pd[quantity]
    by_method = {name: figures(maps[quantity], reference, phantom.regions) for name, maps in denoised_maps.items()}
    print_figures(quantity, by_method)
    _assert_issue_criteria(quantity, by_method)


# LEA / LLA / LCI contrast: R1 -2 / -1 / +1 %, PD -2 / -4 / +5 % against the truth (PD's raw LCI: +5 %);
# without the restoration R1 -8 / -1 / +1 % and PD -11 / -5 / +6 %.
@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_r1_and_pd_lesion_contrast_and_means_are_kept(phantom, denoised_maps, noiseless_r1_and_pd, quantity):
    reference = noiseless_r1_and_pd[quantity]
    by_method = {name: figures(maps[quantity], reference, phantom.regions) for name, maps in denoised_maps.items()}
    assert_lesions_kept(quantity, by_method, against="either")
