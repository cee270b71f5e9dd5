"""Issue 11's denoising criteria on the 1 mm phantom (SNR 20, g-factor map), where they are measurable.

At 2 mm (``test_denoise_phantom.py``) a lesion's interior has a few dozen voxels, and the raw noise
left in its mean is about the 2 % of the criterion. At 1 mm the same measurement
(``benchmarks/bench_denoise_phantom.py`` prints every figure) resolves it. R2*, R1 and PD come from
the raw, per-volume dipy NLM and multispectral NLM images with the measured noise map. They are
compared with the noiseless fits: the true R2* map, and R1 and PD of the noiseless intercepts.
"""

import numpy as np
import pytest

from qmri_workflows.core import denoise, noise
from qmri_workflows.core.masking import air_mask
from qmri_workflows.core.r2star import fit_estatics
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol
from tests.workflows.test_denoise_phantom import LARGE_REGIONS, LESIONS, _figures, _load, _r1_and_pd

pytestmark = pytest.mark.slow

VOXEL_SIZE = (1.0, 1.0, 1.0)
ECHO_TIMES = np.array([[0.0023 * (i + 1) for i in range(8)]] * 2)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Maps of each method ("none", "nlm", "multispectral"), the noiseless references and the regions."""
    root = write_phantom_dataset(
        tmp_path_factory.mktemp("denoise-1mm") / "raw", resolution=1.0, snr=20, subjects=1, seed=3,
        oversample=1, noise_gfactor=0.5, protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
    )  # fmt: skip
    anat = root / "sub-01" / "anat"
    truth = root / "derivatives" / "phantom" / "sub-01" / "anat"
    files = [anat / f"sub-01_echo-{e}_flip-{f}_part-mag_VFA.nii.gz" for f in (1, 2) for e in range(1, 9)]
    images = np.stack([_load(path) for path in files], -1)
    brain = _load(truth / "sub-01_desc-brain_mask.nii.gz") > 0
    regions = {}
    for name in LARGE_REGIONS + LESIONS:
        path = truth / f"sub-01_label-{name}_desc-interior_mask.nii.gz"
        if path.exists() and _load(path).sum() >= 5:
            regions[name] = _load(path) > 0
    air = images[..., 0][air_mask(images[..., 0], voxel_size=VOXEL_SIZE)]
    sigma_map = noise.estimate_sigma_map(
        images,
        sigma_global=noise.estimate_sigma_background(air, method="median"),
        voxel_size=VOXEL_SIZE,
        echo_trains=[range(8), range(8, 16)],
    )

    def fit(magnitude):
        s0, r2star = fit_estatics(magnitude.reshape(magnitude.shape[:3] + (2, 8)), ECHO_TIMES, mask=brain)
        return {"R2*": r2star, **_r1_and_pd(s0, brain)}

    s0_noiseless = np.stack([_load(truth / f"sub-01_desc-flip{f}_S0map.nii.gz") for f in (1, 2)], -1)
    reference = {"R2*": _load(truth / "sub-01_R2starmap.nii.gz"), **_r1_and_pd(s0_noiseless, brain)}
    by_method = {
        "none": fit(images),
        "nlm": fit(denoise.nlmeans_volumes(images, sigma_map, mask=brain)),
        "multispectral": fit(denoise.multispectral_nlmeans(images, sigma_map, mask=brain)),
    }
    assert {"LEA", "LLA", "LCAC", "LCAR", "LCI", "CL"} <= set(regions)  # every stage has an interior
    return by_method, reference, regions


def _figures_of(maps, quantity):
    by_method, reference, regions = maps
    figures = {name: _figures(by_method[name][quantity], reference[quantity], regions) for name in by_method}
    rmse = {name: figures[name][0] for name in figures}
    print(
        f"\n{quantity}: multispectral RMSE {1 - rmse['multispectral'] / rmse['none']:.1%} below none, "
        f"{1 - rmse['multispectral'] / rmse['nlm']:.1%} below dipy NLM"
    )
    return rmse, figures["multispectral"][1], figures["multispectral"][2], figures["none"][1]


@pytest.mark.parametrize("quantity", ["R1", "PD"])
def test_r1_and_pd_meet_every_criterion_at_1mm(maps, quantity):
    rmse, bias, contrast, _ = _figures_of(maps, quantity)
    assert rmse["multispectral"] <= 0.7 * rmse["none"]
    assert rmse["multispectral"] <= 0.9 * rmse["nlm"]
    for name, value in bias.items():
        assert abs(value) < 0.02, f"{name}: mean {quantity} biased by {value:+.1%}"
    for name, change in contrast.items():
        assert abs(change) < 0.05, f"{name}: lesion-to-NAWM {quantity} contrast changed by {change:+.1%}"


def test_r2star_error_and_large_regions_at_1mm(maps):
    rmse, bias, _, raw_bias = _figures_of(maps, "R2*")
    assert rmse["multispectral"] <= 0.7 * rmse["none"]
    assert rmse["multispectral"] <= 0.9 * rmse["nlm"]
    for name in LARGE_REGIONS:
        assert abs(bias[name]) < 0.02, f"{name}: mean R2* biased by {bias[name]:+.1%}"
    # The lesions that keep their mean: against the raw map, whose own region means carry the noise
    # draw (LEA reads -2.2 % in the raw map as in the denoised one).
    for name in ("LEA", "LCAC", "LCAR", "LCI"):
        moved = (1 + bias[name]) / (1 + raw_bias[name]) - 1
        assert abs(moved) < 0.02, f"{name}: denoising moved the mean R2* by {moved:+.1%}"


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 at 1 mm: multispectral NLM raises the cortical lesion's mean R2* by about 4 points "
    "(contrast -9 %) and changes LLA's contrast by about -5 %: the cortical lesion's signal differs too "
    "little from the cortex around it (same S0 at 6 degrees, +5 % at 21 degrees, R2* 13.4 vs 15.5 1/s)",
)
def test_r2star_lesion_contrast_and_means_at_1mm(maps):
    _, bias, contrast, _ = _figures_of(maps, "R2*")
    for name in contrast:
        assert abs(contrast[name]) < 0.05, f"{name}: lesion-to-NAWM contrast changed by {contrast[name]:+.1%}"
        assert abs(bias[name]) < 0.02, f"{name}: mean R2* biased by {bias[name]:+.1%}"
