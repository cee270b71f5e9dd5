"""Wall time and peak memory of each step on the phantom (default: 1 mm, the size of real data).

Each step runs in a fresh process so that its peak resident memory (ru_maxrss) is its own::

    python benchmarks/bench_pipeline.py --resolution 1 --snr 50 --workdir /tmp/qmri-bench

``--dataset`` reuses a phantom written before (``qmri-phantom OUT --resolution 1 --snr 50``), which
saves minutes per run. The App's run ends with the share of its wall time spent outside the numerical
core (``qmri_workflows.core`` functions called by the interfaces): loading, saving, publishing,
indexing, imports and scheduling.

Not a test: it prints a table to paste into release notes / issue reports.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import multiprocessing as mp
import os
import pkgutil
import resource
import sys
import time
from pathlib import Path
from queue import Empty

TIMINGS_ENV = "QMRI_BENCH_TIMINGS"


def _measure(queue, function, args):
    start = time.perf_counter()
    result = function(*args)
    elapsed = time.perf_counter() - start
    # Nipype's MultiProc runs nodes in child processes: count the largest of them too.
    peak_mb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    queue.put((elapsed, peak_mb, result))


def measure(function, *args):
    """Run ``function(*args)`` in a fresh process; return (seconds, peak MB, result)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(queue, function, args))
    process.start()
    while True:
        try:
            outcome = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():  # it crashed (its traceback is above)
                raise RuntimeError(f"{function.__name__} failed (exit code {process.exitcode})") from None
    process.join()
    return outcome


def step_phantom(root, resolution, snr, oversample=2, protocol=None):
    from qmri_workflows.phantom.dataset import write_phantom_dataset

    write_phantom_dataset(
        root, resolution=resolution, snr=snr, subjects=1, seed=1, oversample=oversample, protocol=protocol
    )
    return None


def step_load(root, workdir):
    import numpy as np

    from qmri_workflows.interfaces.r2star import group_echoes_by_flip_angle, stack_contrasts
    from qmri_workflows.io.query import collect_inputs, open_layout
    from qmri_workflows.workflows.base import flatten_echoes

    inputs = collect_inputs(open_layout(root), "01")
    files, tes, flips = flatten_echoes(inputs.gre)
    signal, echo_times, _ = stack_contrasts(group_echoes_by_flip_angle(files, tes, flips))
    np.save(Path(workdir) / "signal.npy", signal)
    np.save(Path(workdir) / "echo_times.npy", echo_times)
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
        from qmri_workflows.interfaces._noise import measure_air_noise

        noise = measure_air_noise(signal[..., 0, 0], voxel_size=(RESOLUTION,) * 3)
        if noise.sigma is None:
            raise ValueError(noise.problem)
        sigma = noise.sigma
    fit_estatics(signal, echo_times, method=method, mask=mask, sigma=sigma, return_stderr=True)
    return f"{int(mask.sum())} voxels"


def step_app(root, output, nprocs):
    from nipype import config, logging

    # This process was spawned, which made spawn its children's start method too; the App run from
    # a shell forks its MultiProc workers (Linux default), so measure that.
    mp.set_start_method("fork", force=True)

    from qmri_workflows.cli.run import main

    config.update_config({"logging": {"workflow_level": "WARNING"}})
    logging.update_logging(config)

    return main(
        [
            str(root),
            str(output),
            "participant",
            "--nprocs",
            str(nprocs),
            "--skip-bids-validation",
            "-w",
            str(Path(output).parent / "work"),
        ]
    )


def _record_timing(kind, name, seconds, cpu_seconds):
    # Nodes may run in MultiProc's worker processes (forked, so patched too): append to a file.
    with open(os.environ[TIMINGS_ENV], "a") as handle:
        handle.write(json.dumps({"kind": kind, "name": name, "seconds": seconds, "cpu": cpu_seconds}) + "\n")


def _timed(function, kind, name):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            # process_time counts every thread of the process; a node runs alone in its process.
            _record_timing(kind, name, time.perf_counter() - start, time.process_time() - start_cpu)

    return wrapper


def _cpu_seconds():
    mp.active_children()  # reap finished MultiProc workers so that RUSAGE_CHILDREN counts them
    return sum(
        resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )


def instrument_interfaces():
    """Time every interface run and every core function the interfaces call.

    The core functions are patched where the interface modules imported them, so only the calls
    from an interface count (the core's own inner calls are inside those).
    """
    from nipype.interfaces.base import BaseInterface

    import qmri_workflows.interfaces as interfaces

    for info in pkgutil.iter_modules(interfaces.__path__):
        module = importlib.import_module(f"{interfaces.__name__}.{info.name}")
        for attribute, value in list(vars(module).items()):
            if inspect.isfunction(value) and value.__module__.startswith("qmri_workflows.core"):
                setattr(module, attribute, _timed(value, "core", f"{value.__module__}.{value.__name__}"))
            elif (
                inspect.isclass(value)
                and issubclass(value, BaseInterface)
                and value.__module__ == module.__name__
                and "_run_interface" in vars(value)
            ):
                value._run_interface = _timed(value._run_interface, "interface", value.__name__)


def step_app_core_share(root, output, nprocs, timings):
    """The App on ``root`` with the interfaces and the core calls timed; returns a summary line."""
    os.environ[TIMINGS_ENV] = str(timings)
    Path(timings).unlink(missing_ok=True)
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    instrument_interfaces()
    code = step_app(root, output, nprocs)
    total, total_cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    records = [json.loads(line) for line in Path(timings).read_text().splitlines()]
    core = sum(r["seconds"] for r in records if r["kind"] == "core")
    core_cpu = sum(r["cpu"] for r in records if r["kind"] == "core")
    nodes = sum(r["seconds"] for r in records if r["kind"] == "interface")
    by_name = {}
    for record in records:
        by_name[record["name"]] = by_name.get(record["name"], 0.0) + record["seconds"]
    details = ", ".join(f"{name.rsplit('.', 1)[-1]} {seconds:.1f} s" for name, seconds in by_name.items())
    # One subject: its nodes run one after the other, so their times add up within the wall time.
    return (
        f"rc {code}; core {core:.1f} s, interfaces {nodes:.1f} s (load + save {nodes - core:.1f} s), "
        f"App {total:.1f} s: {1 - core / total:.0%} of the wall time outside the core; CPU: core "
        f"{core_cpu:.1f} s of {total_cpu:.1f} s ({1 - core_cpu / total_cpu:.0%} outside) [{details}]"
    )


RESOLUTION = 1.0


def main(argv=None):
    global RESOLUTION
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=50.0)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument(
        "--oversample", type=int, default=2, help="phantom simulated on a grid this many times finer (default: 2)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmri-bench"))
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="existing phantom dataset to reuse (its --resolution must be given too)",
    )
    parser.add_argument(
        "--app-only", action="store_true", help="run only the App with its core-time share (needs --dataset)"
    )
    args = parser.parse_args(argv)
    RESOLUTION = args.resolution
    os.environ["NIPYPE_NO_ET"] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    import shutil

    root = args.dataset.resolve() if args.dataset else args.workdir / "phantom"
    output = args.workdir / "derivatives"
    for previous in (output, args.workdir / "work"):
        shutil.rmtree(previous, ignore_errors=True)
    if args.dataset is None and root.exists():
        shutil.rmtree(root)

    rows = []

    def record(name, outcome):
        seconds, peak_mb, result = outcome
        rows.append((name, seconds, peak_mb, result))
        print(f"{name:28s} {seconds:8.1f} s {peak_mb:9.0f} MB   {result}", flush=True)

    print(
        f"phantom {args.resolution} mm (oversample {args.oversample}), SNR {args.snr}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if not args.app_only:
        if args.dataset is None:
            record("phantom (1 subject)", measure(step_phantom, root, args.resolution, args.snr, args.oversample))
        record("query + load echoes", measure(step_load, root, args.workdir))
        record("brain mask", measure(step_mask, args.workdir))
        record("R2* ESTATICS wls", measure(step_fit, args.workdir, "wls"))
        record("R2* ESTATICS nls", measure(step_fit, args.workdir, "nls"))
    record(
        f"BIDS App end to end (nprocs={args.nprocs})",
        measure(step_app_core_share, root, output, args.nprocs, args.workdir / "timings.jsonl"),
    )
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
            print(
                f"  R2* {row['name']:28s} n={region.sum():7d} median error {np.median(relative):+.2%}"
                f"  IQR {np.subtract(*np.percentile(relative, [75, 25])):.2%}"
            )
    inputs = collect_inputs(open_layout(root), "01")
    files = [f for series in inputs.gre for f in series.magnitude]
    print(f"declared mem_gb of the R2* fit node: {estimate_fit_mem_gb(files[0], len(files))}")


if __name__ == "__main__":
    sys.exit(main())
