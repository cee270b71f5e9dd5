"""A 2 mm phantom subject and what its scanner gives (shared by the PD and map-free B1 tests)."""

import numpy as np

from qmri_workflows.phantom.protocol import Protocol
from qmri_workflows.phantom.simulate import PhantomScanner, list_volumes
from qmri_workflows.phantom.truth import make_phantom

REGIONS = tuple(range(1, 14))


class Subject2mm:
    """Truth, noiseless TE = 0 VFA intercepts, the RB1COR pair and interior masks of a 2 mm subject."""

    def __init__(self, subject="patient", *, rb1cor_factor=1):
        self.truth = make_phantom(resolution=2.0, subject=subject, seed=0)
        # Ideal spoiling: these tests are about B1+ and the receive field, which the core functions
        # under test take from Ernst-equation signals (the R1 tests cover the spoiling correction).
        self.protocol = Protocol(spoiling="ideal")
        self.scanner = PhantomScanner(self.truth, rb1cor_factor=rb1cor_factor)
        intercepts = {}
        for name, data in self.scanner.truth_maps(self.protocol):
            if name.startswith("S0map-"):
                intercepts[int(name.split("-")[1])] = data
            elif name == "brainmask":
                self.brain_mask = data
        self.intercepts = np.stack([intercepts[k] for k in sorted(intercepts)], axis=-1)
        self.flip_angles = np.radians(self.protocol.vfa.flip_angles)
        self.repetition_time = self.protocol.vfa.repetition_time
        pair = {v.parameters["coil"]: v for v in list_volumes(self.protocol) if v.kind == "rb1cor"}
        self.head = self.scanner.acquire(pair["head"])[0]
        self.body = self.scanner.acquire(pair["body"])[0]
        self.masks = {
            label: mask for label, (mask, _) in self.scanner.interior_masks(REGIONS).items() if np.count_nonzero(mask)
        }

    def median_errors(self, estimate, truth):
        """Median relative error (percent) of ``estimate`` against ``truth`` per interior region."""
        return {
            self.truth.labels[label]: 100.0 * float(np.median(estimate[mask] / truth[mask] - 1.0))
            for label, mask in self.masks.items()
        }


def format_errors(errors):
    return ", ".join(f"{name} {value:+.1f}" for name, value in errors.items())


def save_map(path, data, affine):
    """Write ``data`` as float32 NIfTI; return the path as a string."""
    import nibabel as nib

    nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine).to_filename(str(path))
    return str(path)


def write_subject_files(subject, root):
    """The subject's M0 (PD x receive), R1, brain mask and VFA intercepts on the map grid, and the
    RB1COR pair on its own grid, as files in ``root``.

    Returns
    -------
    dict
        ``m0_file``, ``r1_file``, ``mask_file``, ``head_file``, ``body_file``, ``flip_files`` and
        ``rb1cor_affine``.
    """
    truth, affine = subject.truth, subject.scanner.affine
    pair = {v.parameters["coil"]: v for v in list_volumes(subject.protocol) if v.kind == "rb1cor"}
    rb1cor_affine, _ = subject.scanner.grid(pair["head"])
    return {
        "m0_file": save_map(root / "M0map.nii", truth.pd / 100 * truth.receive * 1000.0, affine),
        "r1_file": save_map(root / "R1map.nii", truth.r1, affine),
        "mask_file": save_map(root / "brainmask.nii", subject.brain_mask, affine),
        "head_file": save_map(root / "acq-headPDw_RB1COR.nii", subject.head, rb1cor_affine),
        "body_file": save_map(root / "acq-bodyPDw_RB1COR.nii", subject.body, rb1cor_affine),
        "flip_files": [
            save_map(root / f"S0map_flip{k + 1}.nii", subject.intercepts[..., k], affine)
            for k in range(subject.intercepts.shape[-1])
        ],
        "rb1cor_affine": rb1cor_affine,
    }
