"""Wall time and peak memory of each step on the phantom (default: 1 mm, the size of real data).

Each step runs in a fresh process so that its peak resident memory (ru_maxrss) is its own::

    python benchmarks/bench_pipeline.py --resolution 1 --snr 50 --workdir /tmp/qmri-bench

Not a test: it prints a table to paste into release notes / issue reports.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path


def _measure(queue, function, args):
    start = time.perf_counter()
    result = function(*args)
    elapsed = time.perf_counter() - start
    # Nipype's MultiProc runs nodes in child processes: count the largest of them too.
    peak_mb = max(resource.getrusage(who).ru_maxrss
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    queue.put((elapsed, peak_mb, result))


def measure(function, *args):
    """Run ``function(*args)`` in a fresh process; return (seconds, peak MB, result)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(queue, function, args))
    process.start()
    outcome = queue.get()
    process.join()
    return outcome


def step_phantom(root, resolution, snr, oversample=2, protocol=None):
    from qmri_workflows.phantom.dataset import write_phantom_dataset

    write_phantom_dataset(root, resolution=resolution, snr=snr, subjects=1, seed=1, oversample=oversample,
                          protocol=protocol)
    return None


def step_load(root):
    import numpy as np

    from qmri_workflows.interfaces.r2star import group_echoes_by_flip_angle, stack_contrasts
    from qmri_workflows.io.query import collect_inputs, open_layout
    from qmri_workflows.workflows.base import flatten_echoes

    inputs = collect_inputs(open_layout(root), "01")
    files, tes, flips = flatten_echoes(inputs.gre)
    signal, echo_times, _ = stack_contrasts(group_echoes_by_flip_angle(files, tes, flips))
    np.save(Path(root).parent / "signal.npy", signal)
    np.save(Path(root).parent / "echo_times.npy", echo_times)
    return f"{signal.shape}"


def step_mask(workdir):
    import numpy as np

    from qmri_workflows.core.masking import brain_mask

    signal = np.load(Path(workdir) / "signal.npy", mmap_mode="r")
    image = np.sqrt(np.nansum(np.square(signal[..., :, 0], dtype=np.float64), axis=-1))
    mask = brain_mask(image, voxel_size=(RESOLUTION,) * 3)
    np.save(Path(workdir) / "mask.npy", mask)
    return f"{int(mask.sum())} voxels"


def step_fit(workdir, method):
    import numpy as np

    from qmri_workflows.core.r2star import fit_estatics

    signal = np.load(Path(workdir) / "signal.npy")
    echo_times = np.load(Path(workdir) / "echo_times.npy")
    mask = np.load(Path(workdir) / "mask.npy")
    sigma = None
    if method == "nls":
        from qmri_workflows.interfaces.r2star import estimate_noise_from_air

        sigma = estimate_noise_from_air(signal[..., 0, 0], voxel_size=(RESOLUTION,) * 3)
    fit_estatics(signal, echo_times, method=method, mask=mask, sigma=sigma, return_stderr=True)
    return f"{int(mask.sum())} voxels"


def step_app(root, output, nprocs):
    from nipype import config, logging

    from qmri_workflows.cli.run import main

    config.update_config({"logging": {"workflow_level": "WARNING"}})
    logging.update_logging(config)

    return main([str(root), str(output), "participant", "--nprocs", str(nprocs),
                 "--skip-bids-validation", "-w", str(Path(output).parent / "work")])


RESOLUTION = 1.0


def main(argv=None):
    global RESOLUTION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--oversample", type=int, default=2,
                        help="phantom simulated on a grid this many times finer (default: 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmri-bench"))
    args = parser.parse_args(argv)
    RESOLUTION = args.resolution
    os.environ["NIPYPE_NO_ET"] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.workdir / "phantom"
    output = args.workdir / "derivatives"
    if root.exists():
        import shutil

        shutil.rmtree(root)

    rows = []

    def record(name, outcome):
        seconds, peak_mb, result = outcome
        rows.append((name, seconds, peak_mb, result))
        print(f"{name:28s} {seconds:8.1f} s {peak_mb:9.0f} MB   {result}", flush=True)

    print(f"phantom {args.resolution} mm (oversample {args.oversample}), SNR {args.snr}, {os.cpu_count()} cores",
          flush=True)
    record("phantom (1 subject)", measure(step_phantom, root, args.resolution, args.snr, args.oversample))
    record("query + load echoes", measure(step_load, root))
    record("brain mask", measure(step_mask, args.workdir))
    record("R2* ESTATICS wls", measure(step_fit, args.workdir, "wls"))
    record("R2* ESTATICS nls", measure(step_fit, args.workdir, "nls"))
    record(f"BIDS App end to end (nprocs={args.nprocs})",
           measure(step_app, root, output, args.nprocs))
    report_accuracy(root, output)
    return 0


def report_accuracy(root, output):
    """Median relative R2* error per region of the phantom, and the memory the graph declares."""
    import csv

    import nibabel as nib
    import numpy as np

    from qmri_workflows.io.query import collect_inputs, open_layout
    from qmri_workflows.workflows.base import estimate_fit_mem_gb

    truth = root / "derivatives" / "phantom" / "sub-01" / "anat"
    estimate = output / "sub-01" / "anat"
    r2star_true = nib.load(truth / "sub-01_R2starmap.nii.gz").get_fdata()
    r2star = nib.load(estimate / "sub-01_R2starmap.nii.gz").get_fdata()
    mask = nib.load(estimate / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    true_mask = nib.load(truth / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    dseg = nib.load(truth / "sub-01_dseg.nii.gz").get_fdata().astype(int)
    dice = 2 * (mask & true_mask).sum() / (mask.sum() + true_mask.sum())
    print(f"brain mask Dice vs truth: {dice:.4f}")
    with open(truth / "sub-01_dseg.tsv") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            region = (dseg == int(row["index"])) & mask
            if row["name"] in ("background", "skull", "scalp") or not region.any():
                continue
            relative = r2star[region] / r2star_true[region] - 1
            print(f"  R2* {row['name']:28s} n={region.sum():7d} median error {np.median(relative):+.2%}"
                  f"  IQR {np.subtract(*np.percentile(relative, [75, 25])):.2%}")
    inputs = collect_inputs(open_layout(root), "01")
    files = [f for series in inputs.gre for f in series.magnitude]
    print(f"declared mem_gb of the R2* fit node: {estimate_fit_mem_gb(files[0], len(files))}")


if __name__ == "__main__":
    sys.exit(main())
