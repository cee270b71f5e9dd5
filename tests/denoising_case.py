"""Issue 11's denoising measurement on the phantom, at any resolution: data, fits and criteria.

The tests at 2 mm (``tests/workflows/test_denoise_phantom.py``) and 1 mm
(``tests/workflows/test_denoise_phantom_1mm.py``) and ``benchmarks/bench_denoise_phantom.py`` share
it. The phantom: SNR 20 in white matter at the first echo, a g-factor map raising the noise by up to
50 % towards the centre, VFA 2 flip angles x 8 echoes, simulated at oversample 1 so that the
noiseless R2* reference is the true map. R2* is fitted (ESTATICS, weighted log-linear) to the raw,
per-volume NLM and multispectral NLM magnitudes with the same measured noise map and radii; R1
(DESPOT1) and PD (M0 calibrated on the CSF) follow from the ESTATICS intercepts, as in the App. R1
and PD are compared with the same fits of the phantom's noiseless intercepts
(``desc-flip<f>_S0map``), so that only what denoising does is measured, not the nominal-B1+ and
spoiling bias that the R1 fit has without a B1+ map. Errors are measured in the interior masks of
the truth folder.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_workflows.core import denoise, noise
from qmri_workflows.core.masking import air_mask
from qmri_workflows.core.r2star import fit_estatics
from qmri_workflows.core.relaxometry import calibrate_pd, fit_r1
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol

LARGE_REGIONS = ("WM", "CGM", "CAU", "PUT", "THA")
LESIONS = ("LEA", "LLA", "LCAC", "LCAR", "LCI", "CL")
ALL_LESIONS = "lesions"
FLIP_ANGLES = np.radians([6.0, 21.0])
REPETITION_TIME = 0.025
ECHO_TIMES = np.array([[0.0023 * (i + 1) for i in range(8)]] * 2)
METHODS = ("none", "nlm", "multispectral")
# Issue 11: multispectral NLM lowers the RMSE by 30 % against none and 10 % against dipy NLM, and
# keeps each region's mean within 2 % and each lesion's contrast with white matter within 5 %.
RMSE_BELOW_NONE, RMSE_BELOW_NLM, MEAN_BIAS, CONTRAST_CHANGE = 0.30, 0.10, 0.02, 0.05


def load(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


@dataclass
class DenoisingCase:
    """One simulated subject: magnitudes (X, Y, Z, 16; flip angle major), truth and interior regions."""

    root: Path
    voxel_size: tuple
    images: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    r2star: np.ndarray
    s0: np.ndarray
    sigma_map: np.ndarray
    regions: dict

    @functools.cached_property
    def air(self):
        """Mask of the air around the head in the first image."""
        return air_mask(self.images[..., 0], voxel_size=self.voxel_size)

    def air_sigma(self):
        """Noise SD measured in the air (median over blocks), as the App does."""
        return noise.estimate_sigma_air(self.images[..., 0], self.air, voxel_size=self.voxel_size)

    def measured_noise_map(self):
        """The App's spatially varying noise map, anchored on the air's SD."""
        return noise.estimate_sigma_map(
            self.images,
            sigma_global=self.air_sigma(),
            voxel_size=self.voxel_size,
            echo_trains=[range(8), range(8, 16)],
        )


def simulate(folder, *, resolution, seed=3, snr=20.0):
    """The phantom of the denoising tests at ``resolution`` mm, written to ``folder`` and loaded."""
    root = write_phantom_dataset(
        folder, resolution=resolution, snr=snr, subjects=1, seed=seed, oversample=1, noise_gfactor=0.5,
        protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
    )  # fmt: skip
    anat = root / "sub-01" / "anat"
    truth = root / "derivatives" / "phantom" / "sub-01" / "anat"
    files = [anat / f"sub-01_echo-{e}_flip-{f}_part-mag_VFA.nii.gz" for f in (1, 2) for e in range(1, 9)]
    regions = {}
    for name in LARGE_REGIONS + LESIONS:
        path = truth / f"sub-01_label-{name}_desc-interior_mask.nii.gz"
        if path.exists() and load(path).sum() >= 5:
            regions[name] = load(path) > 0
    return DenoisingCase(
        root=root,
        voxel_size=(float(resolution),) * 3,
        images=np.stack([load(path) for path in files], -1),
        brain=load(truth / "sub-01_desc-brain_mask.nii.gz") > 0,
        head=load(truth / "sub-01_desc-head_mask.nii.gz") > 0,
        r2star=load(truth / "sub-01_R2starmap.nii.gz"),
        s0=np.stack([load(truth / f"sub-01_desc-flip{f}_S0map.nii.gz") for f in (1, 2)], -1),
        sigma_map=load(truth / "sub-01_desc-noise_sigmamap.nii.gz"),
        regions=regions,
    )


def r1_and_pd(s0, brain):
    """R1 (DESPOT1) and PD (CSF-calibrated M0) of the two ESTATICS intercepts."""
    r1 = fit_r1(s0, FLIP_ANGLES, REPETITION_TIME, mask=brain)
    return {"R1": r1.r1, "PD": calibrate_pd(r1.m0, r1.r1, brain).pd}


def fit_maps(magnitude, brain):
    """R2*, R1 and PD of 16 magnitudes (2 flip angles x 8 echoes)."""
    s0, r2star = fit_estatics(magnitude.reshape(magnitude.shape[:3] + (2, 8)), ECHO_TIMES, mask=brain)
    return {"R2*": r2star, **r1_and_pd(s0, brain)}


def reference_maps(case):
    """The noiseless references: the true R2* map, and R1 and PD of the noiseless intercepts."""
    return {"R2*": case.r2star, **r1_and_pd(case.s0, case.brain)}


def denoise_with(method, case, sigma_map, *, search_radius=2):
    """The magnitudes after ``method`` ("none", "nlm" or "multispectral")."""
    if method == "none":
        return case.images
    if method == "nlm":
        return denoise.nlmeans_volumes(case.images, sigma_map, mask=case.brain, search_radius=search_radius)
    denoised, _ = denoise.multispectral_denoise(case.images, sigma_map, mask=case.brain, search_radius=search_radius)
    return denoised


def figures(estimate, truth, regions):
    """RMSE over all regions, relative bias of each region's mean, relative change of each lesion's contrast.

    The contrast is that of the lesion's mean against the white matter's mean. The lesions also
    count together, as ``ALL_LESIONS`` (their voxels pooled), in the bias and the contrast.
    """
    tissue = np.any([mask for mask in regions.values()], axis=0)
    rmse = float(np.sqrt(np.nanmean((estimate - truth)[tissue] ** 2)))
    lesions = [name for name in LESIONS if name in regions]
    if lesions:
        regions = {**regions, ALL_LESIONS: np.any([regions[name] for name in lesions], axis=0)}
    bias = {name: float(np.nanmean(estimate[mask]) / np.nanmean(truth[mask]) - 1) for name, mask in regions.items()}
    wm_estimate, wm_truth = np.nanmean(estimate[regions["WM"]]), np.nanmean(truth[regions["WM"]])
    contrast = {
        name: float(
            (np.nanmean(estimate[regions[name]]) / wm_estimate - 1) / (np.nanmean(truth[regions[name]]) / wm_truth - 1)
            - 1
        )
        for name in (*lesions, ALL_LESIONS)
        if name in regions
    }
    return rmse, bias, contrast


def print_figures(quantity, by_method):
    """One line per method of ``{method: figures(...)}``, then the two RMSE reductions."""
    print()
    for name, (rmse, bias, contrast) in by_method.items():
        regions_text = " ".join(f"{k} {v:+.1%}" for k, v in bias.items())
        contrast_text = " ".join(f"{k} {v:+.1%}" for k, v in contrast.items())
        print(f"{name:13s} {quantity} RMSE {rmse:.4g}; region bias {regions_text}; contrast change {contrast_text}")
    rmse = {name: by_method[name][0] for name in by_method}
    print(f"{quantity}: multispectral RMSE {1 - rmse['multispectral'] / rmse['none']:.1%} below none, "
          f"{1 - rmse['multispectral'] / rmse['nlm']:.1%} below dipy NLM")  # fmt: skip


def assert_rmse_and_large_regions(quantity, by_method):
    """Issue 11's RMSE criteria and the 2 % bias criterion in the large regions."""
    rmse = {name: by_method[name][0] for name in by_method}
    assert rmse["multispectral"] <= (1 - RMSE_BELOW_NONE) * rmse["none"]
    assert rmse["multispectral"] <= (1 - RMSE_BELOW_NLM) * rmse["nlm"]
    _, bias, _ = by_method["multispectral"]
    for name in LARGE_REGIONS:
        if name in bias:
            assert abs(bias[name]) < MEAN_BIAS, f"{name}: mean {quantity} biased by {bias[name]:+.1%}"


def assert_lesions_kept(quantity, by_method, *, lesions=LESIONS, against="truth"):
    """Issue 11's lesion criteria: each lesion's mean within 2 % and its contrast within 5 %.

    ``against``: ``"truth"``; ``"raw"``, what denoising moved, relative to the raw map's own mean
    and contrast, whose noise draw is otherwise part of the figure (a lesion's mean keeps the noise
    of a few dozen to a few hundred correlated voxels, which no filter that keeps the lesion apart
    can average away); ``"either"``, each lesion meets the criteria against one of the two.
    """
    _, bias, contrast = by_method["multispectral"]
    _, raw_bias, raw_contrast = by_method["none"]
    for name in lesions:
        if name not in contrast:
            continue
        moved = {
            "truth": (bias[name], contrast[name]),
            "raw": ((1 + bias[name]) / (1 + raw_bias[name]) - 1, (1 + contrast[name]) / (1 + raw_contrast[name]) - 1),
        }
        judged = [moved[against]] if against in moved else list(moved.values())
        kept = [abs(mean) < MEAN_BIAS and abs(change) < CONTRAST_CHANGE for mean, change in judged]
        text = "; ".join(
            f"against {key}: mean {mean:+.1%}, contrast {change:+.1%}" for key, (mean, change) in moved.items()
        )
        assert any(kept), f"{name} ({quantity}): {text}"
