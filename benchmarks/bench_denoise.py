"""Time and peak memory of multispectral NLM against dipy's per-volume NLM (not a test).

The 1 mm phantom's GRE collection (2 flip angles x 8 echoes, SNR 20, ``oversample=1`` since only
the cost matters here) is written once; each method then runs in its own process on the brain
mask's bounding box, with the same patch and search radii, so the high-water mark of that process
(``VmHWM``) is its peak memory. Run on the shared 2-core machine with::

    PYTHONPATH=. python benchmarks/bench_denoise.py [search_radius] [dipy_threads] [dataset_dir]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = r"""
import json, re, sys, time
import nibabel as nib, numpy as np
from qmri_workflows.core import denoise, noise
spec = json.loads(sys.argv[1])
images = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in spec["files"]], -1)
mask = np.asarray(nib.load(spec["mask"]).dataobj) > 0
start = time.perf_counter(); cpu = time.process_time()
radii = dict(patch_radius=1, search_radius=spec["search_radius"])
if spec["method"] == "noise map":
    noise.estimate_sigma_map(images, voxel_size=(1.0, 1.0, 1.0), echo_trains=[range(8), range(8, 16)])
elif spec["method"] == "nlm":
    denoise.nlmeans_volumes(images, spec["sigma"], mask=mask, num_threads=spec["threads"], **radii)
elif spec["method"] == "multispectral NLM":
    denoise.multispectral_nlmeans(images, spec["sigma"], mask=mask, **radii)
else:  # the App's default: subspace, multispectral NLM, restoration
    denoise.multispectral_denoise(images, spec["sigma"], mask=mask, **radii)
print(json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "peak_gb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
                             / 2**20}))
"""


def run_step(name, spec):
    result = subprocess.run([sys.executable, "-c", STEP, json.dumps(spec)], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{name:34s} {report['wall']:7.1f} s wall {report['cpu']:7.1f} s CPU, peak RSS {report['peak_gb']:.2f} GiB")
    return report


def main():
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import Protocol

    search_radius = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    with tempfile.TemporaryDirectory() as work:
        root = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(work) / "phantom"
        if not root.exists():
            write_phantom_dataset(
                root, resolution=1.0, snr=20, subjects=1, seed=1, oversample=1,
                protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
            )  # fmt: skip
        anat = root / "sub-01" / "anat"
        files = [str(anat / f"sub-01_echo-{e}_flip-{f}_part-mag_VFA.nii.gz") for f in (1, 2) for e in range(1, 9)]
        mask = str(root / "derivatives" / "phantom" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz")
        sigma = json.loads((root / "derivatives" / "phantom" / "sub-01" / "sub-01_desc-simulation.json").read_text())[
            "NoiseSigma"
        ]
        spec = {"files": files, "mask": mask, "sigma": sigma, "search_radius": search_radius, "threads": threads}
        print(f"16 volumes of 1 mm, patch radius 1, search radius {search_radius}, dipy threads {threads}")
        run_step("noise map (homomorphic)", {**spec, "method": "noise map"})
        dipy = run_step("dipy nlmeans per volume (classic)", {**spec, "method": "nlm"})
        multi = run_step("multispectral NLM alone", {**spec, "method": "multispectral NLM"})
        default = run_step("multispectral NLM + restoration", {**spec, "method": "multispectral"})
        print(
            f"multispectral / dipy wall time: {multi['wall'] / dipy['wall']:.2f} alone, "
            f"{default['wall'] / dipy['wall']:.2f} with the restoration (the App's default)"
        )


if __name__ == "__main__":
    main()
