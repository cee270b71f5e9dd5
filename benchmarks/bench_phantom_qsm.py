"""Time, peak memory and accuracy of the default QSM chain on the 1 mm MS-brain phantom (not a test).

The phantom (air cavities, neck, veins, oblique B0; ``tests/phantom/qsm_phantom_data.py``) is
simulated at 1 mm, SNR 100, both VFA flip angles x 8 echoes, and written as NIfTI. Each node of the
App's chain (TotalField -> QSMMask -> RemoveBackground -> InvertDipole -> ReferenceSusceptibility,
the App's default methods unless given) then runs in its own process (its ``VmHWM`` is the node's
peak memory, as in ``bench_qsm_interfaces.py``); the sum of the nodes' wall times is the chain's time
on one worker. It prints the figures of issue 10: chi NRMSE against the truth and against
chi = 3 x local field, the deep-grey slope and each nucleus's error (as
``tests/phantom/test_qsm_phantom.py`` at 2 mm). ``--oversample 2`` builds the phantom at 0.5 mm
(the fair field at every 0.5 mm voxel; about 7 min and 7 GB); the default 1 computes the field on
the 1 mm grid itself (enough for timing). Run on 2 cores with::

    PYTHONPATH=. python benchmarks/bench_phantom_qsm.py [--oversample 2] [--cache FILE] [--background lbv]
"""

import argparse
import inspect
import pickle
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from bench_qsm_interfaces import run_step  # noqa: E402

from qmri_workflows.workflows.qsm import BACKGROUND_CHOICES, INVERSION_CHOICES, init_qsm_wf  # noqa: E402
from tests.phantom.qsm_phantom_data import phantom_gre, write_gre  # noqa: E402

NUCLEI = {4: "caudate", 5: "putamen", 6: "globus pallidus", 7: "thalamus"}


def _nrmse(estimate, truth, mask):
    estimate = estimate[mask] - estimate[mask].mean()
    truth = truth[mask] - truth[mask].mean()
    return 100 * np.linalg.norm(estimate - truth) / np.linalg.norm(truth)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--oversample", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tilt", type=float, default=25.0)
    defaults = inspect.signature(init_qsm_wf).parameters
    parser.add_argument("--background", default=defaults["background"].default, choices=BACKGROUND_CHOICES)
    parser.add_argument("--inversion", default=defaults["inversion"].default, choices=INVERSION_CHOICES)
    parser.add_argument("--cache", type=Path, help="pickle of the simulated data (written if missing)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.cache is not None and args.cache.exists():
        data = pickle.loads(args.cache.read_bytes())
    else:
        data = phantom_gre(resolution=args.resolution, oversample=args.oversample, b0_tilt_degrees=args.tilt)
        if args.cache is not None:
            args.cache.write_bytes(pickle.dumps(data))
    shape = data["chi"].shape
    print(
        f"phantom {shape} at {args.resolution} mm (oversample {args.oversample}): {time.perf_counter() - start:.0f} s"
    )
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        files, mask_file = write_gre(data, folder)
        walls = {}

        def step(name, interface, inputs):
            begin = time.perf_counter()
            outputs, peak = run_step(name, interface, inputs, folder)
            walls[name] = (time.perf_counter() - begin, peak)
            return outputs

        total = step("total_field", "TotalField", {**files, "mask_file": mask_file})
        mask = step(
            "mask",
            "QSMMask",
            {
                "mask_file": mask_file,
                "magnitude_file": total["magnitude_file"],
                "field_sd_file": total["field_sd_file"],
            },
        )
        local = step(
            "background",
            "RemoveBackground",
            {
                "field_file": total["field_file"],
                "mask_file": mask["out_mask"],
                "magnitude_file": total["magnitude_file"],
                "num_threads": args.threads,
                "method": args.background,
            },
        )
        chi = step(
            "inversion",
            "InvertDipole",
            {
                "local_field_file": local["local_field_file"],
                "mask_file": local["local_mask_file"],
                "magnitude_file": total["magnitude_file"],
                "field_strength": data["field_strength"],
                "mean_echo_time": total["mean_echo_time"],
                "num_threads": args.threads,
                "method": args.inversion,
            },
        )
        referenced = step(
            "reference", "ReferenceSusceptibility", {"chi_file": chi["chi_file"], "mask_file": local["local_mask_file"]}
        )
        wall = sum(w for w, _ in walls.values())
        peak = max(p for _, p in walls.values())
        print(
            f"{args.background} + {args.inversion} chain: {wall:.1f} s wall (sum of nodes, incl. process "
            f"start), peak node memory {peak:.2f} GiB"
        )
        estimate = np.asarray(nib.load(referenced["chi_file"]).dataobj, dtype=float)
        region = (np.asarray(nib.load(local["local_mask_file"]).dataobj) > 0) & data["brain_mask"]
        local_ppm = np.asarray(nib.load(local["local_field_file"]).dataobj, dtype=float) / (42.577478518 * 3.0)
        truth = data["chi"]
        estimate = estimate - estimate[region].mean()
        reference = truth - truth[region].mean()
        errors, true_means, estimated_means = {}, [], []
        for label, name in NUCLEI.items():
            voxels = (data["dseg"] == label) & region
            true_means.append(reference[voxels].mean())
            estimated_means.append(estimate[voxels].mean())
            errors[name] = estimated_means[-1] - true_means[-1]
        slope = np.polyfit(true_means, estimated_means, 1)[0]
        print(
            f"chi NRMSE {_nrmse(estimate, truth, region):.1f} % "
            f"(chi = 3 x local field {_nrmse(3 * local_ppm, truth, region):.1f} %), deep grey slope {slope:.3f}, "
            "nucleus errors (ppm) " + ", ".join(f"{name} {error:+.4f}" for name, error in errors.items())
        )


if __name__ == "__main__":
    main()
