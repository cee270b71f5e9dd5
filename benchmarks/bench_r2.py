"""Time and peak memory that R2 from phase-cycled bSSFP adds to a subject (default: the 1 mm phantom).

Each step runs its Nipype interface in a fresh process (``bench_pipeline.measure``: wall seconds and
peak resident memory of the process), on the phantom's own bSSFP images, with the phantom's true R1
and B1+ maps standing in for the R1 family's (their cost is ``bench_r1.py``'s)::

    python benchmarks/bench_r2.py --resolution 1 --workdir /tmp/qmri-bench-r2

The figures R2 adds are the rows ``band-free (geometric)`` and ``DESPOT2``; the ellipse fit, the
alternative combination, is timed too. ``--dataset`` reuses a phantom written before.

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import measure  # noqa: E402
from bench_r1 import with_cpu_time  # noqa: E402


def step_phantom(root, resolution, oversample):
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import Protocol

    write_phantom_dataset(
        root, resolution=resolution, snr=50.0, subjects=1, seed=1, oversample=oversample,
        protocol=Protocol(rb1cor=None, afi=None),
    )  # fmt: skip
    return None


def _truth(root, name):
    return root / "derivatives" / "phantom" / "sub-01" / name


def step_inputs(root, workdir):
    """The true R1 and B1+ ratio maps on the map grid (what the R1 family would pass)."""
    import nibabel as nib
    import numpy as np

    from qmri_workflows.io.derivatives import write_nifti

    b1 = nib.load(_truth(root, "fmap/sub-01_TB1map.nii.gz"))
    ratio = np.asarray(b1.dataobj, dtype=np.float32) / 100.0
    return (
        str(_truth(root, "anat/sub-01_R1map.nii.gz")),
        str(write_nifti(str(workdir / "b1ratio.nii"), ratio, b1.affine)),
        str(_truth(root, "anat/sub-01_desc-brain_mask.nii.gz")),
    )


@with_cpu_time
def step_band_free(root, workdir, mask_file, combination):
    from qmri_workflows.interfaces.bssfp import BandFreeBSSFP
    from qmri_workflows.io.query import collect_inputs, open_layout

    series = collect_inputs(open_layout(root), "01").bssfp
    folder = workdir / combination
    folder.mkdir(exist_ok=True)
    result = BandFreeBSSFP(
        magnitude_files=[p for s in series for p in s.magnitude],
        phase_files=[p for s in series for p in s.phase],
        phase_scale=series[0].phase_scale,
        flip_angles=[s.flip_angle for s in series],
        phase_increments=list(series[0].phase_increments),
        repetition_time=series[0].repetition_time,
        combination=combination,
        reference_file=series[0].magnitude[0],
        mask_file=mask_file,
        num_threads=2,
    ).run(cwd=str(folder))
    return list(result.outputs.band_free_files), [s.flip_angle for s in series], series[0].repetition_time


@with_cpu_time
def step_despot2(workdir, band_free_files, flips, tr, r1_file, b1_file, mask_file):
    from qmri_workflows.interfaces.bssfp import FitDESPOT2

    folder = workdir / "despot2"
    folder.mkdir(exist_ok=True)
    result = FitDESPOT2(
        band_free_files=band_free_files,
        flip_angles=flips,
        repetition_time=tr,
        r1_file=r1_file,
        b1_file=b1_file,
        mask_file=mask_file,
        num_threads=2,
    ).run(cwd=str(folder))
    return result.outputs.metadata["FittedVoxels"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--oversample", type=int, default=1, help="phantom oversampling (1: fast to write)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmri-bench-r2"))
    parser.add_argument("--dataset", type=Path, help="a phantom dataset written before")
    parser.add_argument("--skip-ellipse", action="store_true", help="time only the default steps")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    root = args.dataset or args.workdir / "raw"
    rows = []
    if args.dataset is None and not (root / "dataset_description.json").is_file():
        seconds, peak, _ = measure(step_phantom, root, args.resolution, args.oversample)
        rows.append(("phantom", seconds, float("nan"), peak))
    r1_file, b1_file, mask_file = step_inputs(root, args.workdir)
    # the machine may be shared: the CPU seconds tell the cost when the wall time cannot
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    seconds, peak, ((band_free, flips, tr), cpu) = measure(step_band_free, root, args.workdir, mask_file, "geometric")
    rows.append(("band-free (geometric, 2 threads)", seconds, cpu, peak))
    seconds, peak, (voxels, cpu) = measure(
        step_despot2, args.workdir, band_free, flips, tr, r1_file, b1_file, mask_file
    )
    rows.append((f"DESPOT2 (nonlinear, 2 threads), {voxels} voxels", seconds, cpu, peak))
    if not args.skip_ellipse:
        seconds, peak, (_, cpu) = measure(step_band_free, root, args.workdir, mask_file, "ellipse")
        rows.append(("band-free (ellipse fit, 2 threads)", seconds, cpu, peak))
    print(f"load average before: {load}")
    print(f"{'step':<62} {'wall s':>8} {'CPU s':>7} {'peak MB':>9}")
    for name, seconds, cpu, peak in rows:
        print(f"{name:<62} {seconds:8.1f} {cpu:7.1f} {peak:9.0f}")


if __name__ == "__main__":
    main()
