"""Time and peak memory of the double-angle B1+ node on the 1 mm phantom (not a test).

Simulates the 1 mm phantom with a double-angle pair (60/120 deg, TR 2 s) once (``oversample=1``:
only the cost matters here) and runs ``DAMFlipAngleMap`` with the VFA first echoes for its T1 in
this process, so the high-water mark (``VmHWM``) is the node's peak. Run with::

    PYTHONPATH=. python benchmarks/bench_dam.py [dataset_dir]
"""

import re
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def main():
    from qmri_workflows.interfaces.relaxometry import DAMFlipAngleMap
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import DAMProtocol, Protocol
    from qmri_workflows.workflows.base import estimate_fit_mem_gb

    with tempfile.TemporaryDirectory() as work:
        root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(work) / "phantom"
        if not root.exists():
            write_phantom_dataset(
                root, resolution=1.0, snr=50, subjects=1, seed=11, oversample=1,
                protocol=Protocol(afi=None, bssfp=None, rb1cor=None, dam=DAMProtocol()),
            )  # fmt: skip
        subject = root / "sub-01"
        vfa = [str(subject / "anat" / f"sub-01_echo-1_flip-{i}_part-mag_VFA.nii.gz") for i in (1, 2)]
        node = DAMFlipAngleMap(
            flip1_file=str(subject / "fmap" / "sub-01_flip-1_TB1DAM.nii.gz"),
            flip2_file=str(subject / "fmap" / "sub-01_flip-2_TB1DAM.nii.gz"),
            flip_angles=(60.0, 120.0),
            repetition_time=2.0,
            vfa_files=vfa,
            vfa_flip_angles=[6.0, 21.0],
            vfa_repetition_time=0.025,
            vfa_phase_increment=50.0,  # the phantom's VFA spoiling
            vfa_gradient_moment=0.09,
            reference_file=vfa[0],
        )
        start = time.perf_counter()
        result = node.run(cwd=tempfile.mkdtemp(dir=work))
        wall = time.perf_counter() - start
        peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20
        truth = root / "derivatives" / "phantom" / "sub-01"
        true_b1 = np.asarray(nib.load(truth / "fmap" / "sub-01_TB1map.nii.gz").dataobj, dtype=float)
        brain = np.asarray(nib.load(truth / "anat" / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
        estimate = np.asarray(nib.load(result.outputs.tb1map_file).dataobj, dtype=float)
        error = np.median(estimate[brain] / true_b1[brain] - 1)
        print(f"DAM node, 1 mm: {wall:.1f} s wall, peak {peak:.2f} GiB (estimate "
              f"{estimate_fit_mem_gb(vfa[0], 10):.2f} GB); B1+ median error {error:+.2%} in the brain")  # fmt: skip
        print(result.outputs.metadata["T1Correction"])


if __name__ == "__main__":
    main()
