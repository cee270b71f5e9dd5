"""Time and peak memory of each QSM node (interface) on a 1 mm head-sized volume (not a test).

The data of ``bench_core_qsm.py`` (191 x 227 x 201 voxels, 6 echoes per flip angle) are written as
NIfTI files; each interface then runs in its own process, so the high-water mark of that process is the
peak memory the node needs (``VmHWM``: ``ru_maxrss`` would include
the parent's data, as Linux keeps it across fork and exec) (what ``mem_gb`` must cover;
``workflows.qsm.estimate_qsm_mem_gb``
prints its figure next to it). Run on 2 cores with::

    PYTHONPATH=. python benchmarks/bench_qsm_interfaces.py [n_flip_angles] [threads] [background] [inversion]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

STEP = r"""
import json, re, sys, time
from qmri_workflows.interfaces import qsm
spec = json.loads(sys.argv[1])
interface = getattr(qsm, spec["interface"])(**spec["inputs"])
start = time.perf_counter(); cpu = time.process_time()
outputs = interface.run(cwd=spec["cwd"]).outputs.get()
print(json.dumps({"outputs": {k: v for k, v in outputs.items() if k != "metadata"},
                  "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "peak_gb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
                             / 2**20}))
"""


def run_step(name, interface, inputs, folder):
    cwd = folder / name
    cwd.mkdir()
    spec = json.dumps({"interface": interface, "inputs": inputs, "cwd": str(cwd)})
    result = subprocess.run([sys.executable, "-c", STEP, spec], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{name:18s} {report['wall']:6.1f} s wall {report['cpu']:6.1f} s CPU, peak RSS {report['peak_gb']:.2f} GiB")
    return report["outputs"], report["peak_gb"]


def main():
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_core_qsm import SHAPE, make_data

    from qmri_workflows.workflows.qsm import estimate_qsm_mem_gb

    n_flips = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    background = sys.argv[3] if len(sys.argv) > 3 else "vsharp"
    inversion = sys.argv[4] if len(sys.argv) > 4 else "tv"
    phase, magnitude, echo_times, brain, _, _ = make_data(6)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        files = dict(magnitude_files=[], phase_files=[], phase_scales=[], echo_times=[], flip_angles=[])
        for flip in range(n_flips):
            for echo, te in enumerate(echo_times):
                for part, data in (("mag", magnitude[..., echo] * (1 + 0.5 * flip)), ("phase", phase[..., echo])):
                    path = folder / f"flip{flip}_echo{echo}_{part}.nii"
                    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
                    files["magnitude_files" if part == "mag" else "phase_files"].append(str(path))
                files["phase_scales"].append(1.0)
                files["echo_times"].append(float(te))
                files["flip_angles"].append(5.0 + 10 * flip)
        mask_file = folder / "mask.nii"
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), mask_file)
        del phase, magnitude
        print(f"{SHAPE} voxels, {n_flips} flip angle(s) x 6 echoes, {threads} threads, {background}, {inversion}")
        peaks = {}
        total, peaks["total_field"] = run_step(
            "total_field", "TotalField", {**files, "mask_file": str(mask_file)}, folder
        )
        mask, peaks["mask"] = run_step(
            "mask",
            "QSMMask",
            {
                "mask_file": str(mask_file),
                "magnitude_file": total["magnitude_file"],
                "field_sd_file": total["field_sd_file"],
            },
            folder,
        )
        local, peaks["background"] = run_step(
            "background",
            "RemoveBackground",
            {
                "field_file": total["field_file"],
                "mask_file": mask["out_mask"],
                "num_threads": threads,
                "magnitude_file": total["magnitude_file"],
                "method": background,
            },
            folder,
        )
        chi, peaks["inversion"] = run_step(
            "inversion",
            "InvertDipole",
            {
                "local_field_file": local["local_field_file"],
                "mask_file": local["local_mask_file"],
                "magnitude_file": total["magnitude_file"],
                "field_strength": 3.0,
                "mean_echo_time": total["mean_echo_time"],
                "num_threads": threads,
                "method": inversion,
            },
            folder,
        )
        _, peaks["reference"] = run_step(
            "reference",
            "ReferenceSusceptibility",
            {"chi_file": chi["chi_file"], "mask_file": local["local_mask_file"]},
            folder,
        )
        estimate = estimate_qsm_mem_gb(
            files["magnitude_files"][0], 6, n_flips, background=background, inversion=inversion
        )
        print(
            "mem_gb of the workflow: "
            + ", ".join(f"{step} {estimate[step]:.2f} GB (measured {peaks[step] * 1.074:.2f} GB)" for step in peaks)
        )


if __name__ == "__main__":
    main()
