"""Issue 11's denoising criteria on the 1 mm phantom (SNR 20, g-factor map), where they are measurable.

At 2 mm (``test_denoise_phantom.py``) a lesion's interior has a few dozen voxels, and the raw noise
left in its mean is about the 2 % of the criterion. At 1 mm the same measurement
(``tests/denoising_case.py``; ``benchmarks/bench_denoise_phantom.py`` prints every figure) resolves
it. R2*, R1 and PD come from the raw, per-volume dipy NLM and multispectral (NLM, then restoration) images with the
measured noise map, and are compared with the noiseless fits: the true R2* map, and R1 and PD of the
noiseless intercepts.
"""

import pytest

from tests.denoising_case import (
    ALL_LESIONS,
    LESIONS,
    METHODS,
    assert_lesions_kept,
    assert_rmse_and_large_regions,
    denoise_with,
    figures,
    fit_maps,
    reference_maps,
    simulate,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """``{quantity: {method: figures(...)}}`` for R2*, R1 and PD."""
    case = simulate(tmp_path_factory.mktemp("denoise-1mm") / "raw", resolution=1.0)
    assert set(LESIONS) <= set(case.regions)  # every lesion stage has an interior
    sigma_map = case.measured_noise_map()
    by_method = {method: fit_maps(denoise_with(method, case, sigma_map), case.brain) for method in METHODS}
    reference = reference_maps(case)

    def of(quantity):
        return {method: figures(by_method[method][quantity], reference[quantity], case.regions) for method in METHODS}

    return {quantity: of(quantity) for quantity in reference}


def _print_reductions(quantity, by_method):
    rmse = {method: by_method[method][0] for method in METHODS}
    print(
        f"\n{quantity}: multispectral RMSE {1 - rmse['multispectral'] / rmse['none']:.1%} below none, "
        f"{1 - rmse['multispectral'] / rmse['nlm']:.1%} below dipy NLM"
    )


@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_r1_and_pd_meet_every_criterion_at_1mm(maps, quantity):
    _print_reductions(quantity, maps[quantity])
    assert_rmse_and_large_regions(quantity, maps[quantity])
    assert_lesions_kept(quantity, maps[quantity])


def test_r2star_meets_the_criteria_but_for_the_cortical_lesion_at_1mm(maps):
    """Every criterion but the cortical lesion's, lesions judged against the raw map.

    A lesion's mean keeps the noise of its voxels: over six noise draws of this subject (added to the
    noiseless images of the same seed), the raw map's own LLA contrast ranged from -5.3 to +2.7 % and
    LEA's from -6.8 to +11.7 %, while multispectral NLM moved them by a few points either way. So
    what denoising moved is measured against the raw map of the same draw.
    """
    _print_reductions("R2*", maps["R2*"])
    assert_rmse_and_large_regions("R2*", maps["R2*"])
    assert_lesions_kept("R2*", maps["R2*"], lesions=[name for name in LESIONS if name != "CL"], against="raw")


@pytest.mark.parametrize("quantity", ["R2*", "R1", "PD"])
def test_lesions_together_are_kept_at_1mm(maps, quantity):
    """The issue's "mean lesion-to-NAWM contrast" read as one figure per map: the lesions' voxels
    pooled (measured: R2* mean +1.2 %, contrast -3.5 % against the truth; R1 and PD within 1.2 %)."""
    assert_lesions_kept(quantity, maps[quantity], lesions=[ALL_LESIONS])


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 at 1 mm: denoising raises the cortical lesion's mean R2* by 3 points against the raw map "
    "(contrast -7 %; 60 interior voxels). Its signal is statistically the cortex's: over all 16 images the two "
    "differ by a noncentrality of 1.4 per voxel, 0.66 SD of the noise of a 3x3x3 patch distance, so patch "
    "similarity hardly tells them apart, and the residual the filter removed there hardly stands above the noise "
    "(the restoration takes +5.9 to +4.7 %). Against the truth (raw map +1.6 %) dipy NLM gives +4.0 %, and "
    "multispectral NLM alone +5.9 %, +5.0 % with a search radius of 1, +6.5 % with a 5x5x5 patch, +4.2 % with a "
    "spatial kernel and +5.8 to +6.2 % with stricter thresholds (a box around the lesion); six noise draws: +4.4 "
    "to +9.7 %; a second pass of the restoration adds noise and overshoots the other lesions",
)
def test_r2star_cortical_lesion_is_kept_at_1mm(maps):
    assert_lesions_kept("R2*", maps["R2*"], lesions=["CL"], against="raw")
