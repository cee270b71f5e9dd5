"""Issue 11's accuracy criteria of denoising on the phantom at 1 mm (not a test: minutes).

The test (``tests/workflows/test_denoise_phantom.py``) runs the same measurement at 2 mm, where a
lesion's interior has a few dozen voxels and the noise left in its mean is of the order of the 2 %
criterion itself. Here the phantom is simulated at ``resolution`` (1 mm by default), SNR 20 in white
matter at the first echo, a g-factor map raising the noise by up to 50 %, VFA 2 flips x 8 echoes.
R2* (ESTATICS), R1 (DESPOT1 on the intercepts) and PD are fitted to the raw, per-volume dipy NLM and
multispectral NLM images, each with the measured noise map, and compared with the same fits of the
noiseless phantom of the same seed (the true maps for R2*). Printed per map and method: RMSE over the
evaluation regions, each region's bias and each lesion's contrast change against white matter, and
the same two figures relative to the raw map (what the denoising itself moved, the raw map's noise
in the region means taken out)::

    PYTHONPATH=. python benchmarks/bench_denoise_phantom.py [resolution_mm] [seed] [search_radius]
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qmri_workflows.core import denoise, noise
from qmri_workflows.core.r2star import fit_estatics
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol
from tests.workflows import test_denoise_phantom as criteria

ECHO_TIMES = np.array([[0.0023 * (i + 1) for i in range(8)]] * 2)


def simulate(folder, resolution, seed, snr):
    root = write_phantom_dataset(
        folder, resolution=resolution, snr=snr, subjects=1, seed=seed, oversample=1, noise_gfactor=0.5,
        protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
    )  # fmt: skip
    anat = root / "sub-01" / "anat"
    files = [anat / f"sub-01_echo-{e}_flip-{f}_part-mag_VFA.nii.gz" for f in (1, 2) for e in range(1, 9)]
    return root, np.stack([criteria._load(path) for path in files], -1)


def main():
    resolution = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    search_radius = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    criteria.VOXEL_SIZE = (resolution,) * 3
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        root, images = simulate(Path(work) / "noisy", resolution, seed, 20.0)
        _, noiseless = simulate(Path(work) / "noiseless", resolution, seed, float("inf"))
        print(f"two {resolution:g} mm phantoms simulated in {time.perf_counter() - start:.0f} s")
        truth = root / "derivatives" / "phantom" / "sub-01" / "anat"
        brain = criteria._load(truth / "sub-01_desc-brain_mask.nii.gz") > 0
        regions = {}
        for name in criteria.LARGE_REGIONS + criteria.LESIONS:
            path = truth / f"sub-01_label-{name}_desc-interior_mask.nii.gz"
            if path.exists() and criteria._load(path).sum() >= 5:
                regions[name] = criteria._load(path) > 0
    print("interior voxels: " + ", ".join(f"{name} {int(mask.sum())}" for name, mask in regions.items()))

    sigma, _ = criteria._air_sigma(images)
    sigma_map = noise.estimate_sigma_map(
        images, sigma_global=sigma, voxel_size=criteria.VOXEL_SIZE, echo_trains=[range(8), range(8, 16)]
    )

    def fit(magnitude):
        s0, r2star = fit_estatics(magnitude.reshape(magnitude.shape[:3] + (2, 8)), ECHO_TIMES, mask=brain)
        return {"R2*": r2star, **criteria._r1_and_pd(s0, brain)}

    reference = fit(noiseless)
    maps = {"none": fit(images)}
    for name, method in (("nlm", denoise.nlmeans_volumes), ("multispectral", denoise.multispectral_nlmeans)):
        start = time.perf_counter()
        denoised = method(images, sigma_map, mask=brain, search_radius=search_radius)
        print(f"{name}: {time.perf_counter() - start:.0f} s (search radius {search_radius}, patch radius 1)")
        maps[name] = fit(denoised)

    for quantity in ("R2*", "R1", "PD"):
        figures = {name: criteria._figures(maps[name][quantity], reference[quantity], regions) for name in maps}
        rmse = {name: figures[name][0] for name in figures}
        print(
            f"\n{quantity}: RMSE none {rmse['none']:.4g}, nlm {rmse['nlm']:.4g}, multispectral "
            f"{rmse['multispectral']:.4g} ({1 - rmse['multispectral'] / rmse['none']:.1%} below none, "
            f"{1 - rmse['multispectral'] / rmse['nlm']:.1%} below nlm; issue: 30 % and 10 %)"
        )
        _, raw_bias, raw_contrast = figures["none"]
        for name in ("nlm", "multispectral"):
            _, bias, contrast = figures[name]
            failing = [region for region in bias if abs(bias[region]) >= 0.02]
            failing += [lesion for lesion in contrast if abs(contrast[lesion]) >= 0.05]
            print(f"  {name:13s} region bias / lesion contrast change (against the noiseless fit; raw-map change):")
            for region in bias:
                moved = (1 + bias[region]) / (1 + raw_bias[region]) - 1
                text = f"    {region:5s} bias {bias[region]:+6.1%} ({moved:+6.1%})"
                if region in contrast:
                    change = (1 + contrast[region]) / (1 + raw_contrast[region]) - 1
                    text += f"  contrast {contrast[region]:+6.1%} ({change:+6.1%})"
                print(text)
            print(f"    outside the issue's 2 % / 5 %: {', '.join(sorted(set(failing))) or 'none'}")


if __name__ == "__main__":
    main()
