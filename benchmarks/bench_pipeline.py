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
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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


def step_phantom(root, resolution, snr):
    from qmri_workflows.phantom.dataset import write_phantom_dataset

    write_phantom_dataset(root, resolution=resolution, snr=snr, subjects=1, seed=1)
    return None


def step_load(root):
    import numpy as np

    from qmri_workflows.interfaces.r2star import group_echoes_by_flip_angle, stack_contrasts
    from qmri_workflows.io.query import collect_inputs, open_layout

    inputs = collect_inputs(open_layout(root), "01")
    files, tes, flips = _flat(inputs)
    signal, echo_times, _ = stack_contrasts(group_echoes_by_flip_angle(files, tes, flips))
    np.save(Path(root).parent / "signal.npy", signal)
    np.save(Path(root).parent / "echo_times.npy", echo_times)
    return f"{signal.shape}"


def _flat(inputs):
    files, tes, flips = [], [], []
    for series in inputs.gre:
        files += list(series.magnitude)
        tes += list(series.echo_times)
        flips += [series.flip_angle or 0.0] * len(series.magnitude)
    return files, tes, flips


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

        sigma = estimate_noise_from_air(signal[..., 0, 0], mask)
    fit_estatics(signal, echo_times, method=method, mask=mask, sigma=sigma)
    return f"{int(mask.sum())} voxels"


def step_app(root, output, nprocs):
    from qmri_workflows.cli.run import main

    return main([str(root), str(output), "participant", "--nprocs", str(nprocs),
                 "--skip-bids-validation", "-w", str(Path(output).parent / "work")])


RESOLUTION = 1.0


def main(argv=None):
    global RESOLUTION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument("--nprocs", type=int, default=2)
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

    print(f"phantom {args.resolution} mm, SNR {args.snr}, {os.cpu_count()} cores", flush=True)
    record("phantom (1 subject)", measure(step_phantom, root, args.resolution, args.snr))
    record("query + load echoes", measure(step_load, root))
    record("brain mask", measure(step_mask, args.workdir))
    record("R2* ESTATICS wls", measure(step_fit, args.workdir, "wls"))
    record("R2* ESTATICS nls", measure(step_fit, args.workdir, "nls"))
    record(f"BIDS App end to end (nprocs={args.nprocs})",
           measure(step_app, root, output, args.nprocs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
