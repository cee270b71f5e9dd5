"""Time and peak memory that B1+ (AFI) and R1 (DESPOT1) add to a subject (default: the 1 mm phantom).

Each step runs its Nipype interface in a fresh process (``bench_pipeline.measure``: wall seconds and
peak resident memory of the process), on the phantom's own images::

    python benchmarks/bench_r1.py --resolution 1 --workdir /tmp/qmri-bench-r1

The brain mask and the R2* fit (which gives the S0 maps R1 starts from) run first and are reported
too, for scale; the figures that B1+ and R1 add are the rows ``B1+ (AFI)`` and ``R1 ...``.
``--dataset`` reuses a phantom written before (with an AFI pair).

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import measure  # noqa: E402


def with_cpu_time(step):
    """``step``'s result and the CPU seconds (all threads) its process spent in it."""

    @functools.wraps(step)
    def timed(*args):
        start = time.process_time()
        result = step(*args)
        return result, time.process_time() - start

    return timed


def step_phantom(root, resolution, oversample):
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import Protocol

    write_phantom_dataset(
        root,
        resolution=resolution,
        snr=50.0,
        subjects=1,
        seed=1,
        oversample=oversample,
        protocol=Protocol(bssfp=None, rb1cor=None),
    )
    return None


def _inputs(root):
    from qmri_workflows.io.query import collect_inputs, open_layout

    return collect_inputs(open_layout(root), "01")


@with_cpu_time
def step_mask(root, workdir):
    from qmri_workflows.interfaces.masking import BrainMask

    inputs = _inputs(root)
    result = BrainMask(in_files=[series.magnitude[0] for series in inputs.gre]).run(cwd=str(workdir))
    return result.outputs.out_mask


@with_cpu_time
def step_r2star(root, workdir, mask_file):
    from qmri_workflows.interfaces.r2star import FitR2star
    from qmri_workflows.workflows.base import flatten_echoes

    files, echo_times, flips = flatten_echoes(_inputs(root).gre)
    result = FitR2star(
        magnitude_files=files, echo_times=echo_times, flip_angles=flips, mask_file=mask_file, num_threads=2
    ).run(cwd=str(workdir))
    outputs = result.outputs
    return list(outputs.s0_files), list(outputs.flip_angles), outputs.r2star_file, outputs.r2star_stderr_file


@with_cpu_time
def step_b1(root, workdir):
    from qmri_workflows.interfaces.relaxometry import AFIFlipAngleMap

    inputs = _inputs(root)
    afi = inputs.afi
    result = AFIFlipAngleMap(
        tr1_file=afi.tr1_file,
        tr2_file=afi.tr2_file,
        repetition_time_1=afi.tr1,
        repetition_time_2=afi.tr2,
        flip_angle=afi.flip_angle,
        reference_file=inputs.gre[0].magnitude[0],
    ).run(cwd=str(workdir))
    return result.outputs.tb1map_file


@with_cpu_time
def step_r1(root, workdir, s0_files, flips, r2star_files, mask_file, b1_file, spoiling):
    from qmri_workflows.interfaces.relaxometry import FitR1

    inputs = _inputs(root)
    afi = inputs.afi
    result = FitR1(
        signal_files=s0_files,
        flip_angles=flips,
        repetition_time=inputs.gre[0].repetition_time,
        mask_file=mask_file,
        b1_file=b1_file,
        afi_repetition_times=[afi.tr1, afi.tr2],
        afi_flip_angle=afi.flip_angle,
        spoiling_correction=spoiling,
        phase_increment=inputs.gre[0].metadata.get("SpoilingRFPhaseIncrement", 50.0),
        # as in the App: R2* gives the T2 prior and, with its standard error, the intercepts' noise
        r2star_file=r2star_files[0],
        r2star_stderr_file=r2star_files[1],
        echo_times=[list(series.echo_times) for series in inputs.gre],
        num_threads=2,
    ).run(cwd=str(workdir))
    return result.outputs.metadata["FittedVoxels"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--oversample", type=int, default=1, help="phantom oversampling (1: fast to write)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmri-bench-r1"))
    parser.add_argument("--dataset", type=Path, help="a phantom dataset written before")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.dataset or args.workdir / "raw"
    # the machine may be shared: the CPU seconds tell the cost when the wall time cannot
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    rows = []
    if args.dataset is None and not (root / "dataset_description.json").is_file():
        seconds, peak, _ = measure(step_phantom, root, args.resolution, args.oversample)
        rows.append(("phantom", seconds, float("nan"), peak))
    seconds, peak, (mask_file, cpu) = measure(step_mask, root, args.workdir)
    rows.append(("brain mask", seconds, cpu, peak))
    seconds, peak, ((s0_files, flips, *r2star_files), cpu) = measure(step_r2star, root, args.workdir, mask_file)
    rows.append(("R2* (ESTATICS, 2 threads)", seconds, cpu, peak))
    seconds, peak, (b1_file, cpu) = measure(step_b1, root, args.workdir)
    rows.append(("B1+ (AFI)", seconds, cpu, peak))
    for spoiling in (True, False):
        seconds, peak, (voxels, cpu) = measure(
            step_r1, root, args.workdir, s0_files, flips, r2star_files, mask_file, b1_file, spoiling
        )
        label = "R1 (linear, spoiling corrected, 2 threads)" if spoiling else "R1 (linear, no spoiling correction)"
        rows.append((f"{label}, {voxels} voxels", seconds, cpu, peak))
    print(f"load average before: {load}")
    print(f"{'step':<62} {'wall s':>8} {'CPU s':>7} {'peak MB':>9}")
    for name, seconds, cpu, peak in rows:
        print(f"{name:<62} {seconds:8.1f} {cpu:7.1f} {peak:9.0f}")


if __name__ == "__main__":
    main()
