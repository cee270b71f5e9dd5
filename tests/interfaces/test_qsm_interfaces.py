"""QSM interfaces on a synthetic head with known susceptibility, on an oblique grid.

The head (tests/qsm_head.py): spheres of known susceptibility in a ball-shaped brain, an air-like
sphere outside, closed-form fields, two flip angles with different phase offsets, wraps at every
echo, SNR 60-100. The given brain mask is one voxel larger than the signal, so the QSM mask must
remove that shell.
"""

import logging

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.interfaces.qsm import (
    BACKGROUND_ALGORITHMS,
    INVERSION_ALGORITHMS,
    InvertDipole,
    QSMMask,
    ReferenceSusceptibility,
    RemoveBackground,
    TotalField,
    b0_direction_from_affine,
    voxel_size_from_affine,
)
from qmri_workflows.io.errors import BIDSInputError
from tests.core.qsm._analytic import ball, nrmse
from tests.qsm_head import (
    B0_TESLA,
    BRAIN_RADIUS,
    CENTRE,
    ECHO_TIMES,
    FLIP_ANGLES,
    HZ_PER_PPM,
    INTERIOR,
    SHAPE,
    oblique_affine,
    synthetic_head,
)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qsm_head")
    truth = synthetic_head()
    affine = truth["affine"]
    files = dict(magnitude=[], phase=[], scales=[], echo_times=[], flips=[])
    for (flip_index, echo_index), (magnitude, phase) in sorted(truth["images"].items()):
        for part, data in (("mag", magnitude), ("phase", phase)):
            path = folder / f"flip{flip_index + 1}_echo{echo_index + 1}_{part}.nii"
            nib.save(nib.Nifti1Image(data, affine), path)
            files["magnitude" if part == "mag" else "phase"].append(str(path))
        files["scales"].append(1.0)
        files["echo_times"].append(ECHO_TIMES[echo_index])
        files["flips"].append(FLIP_ANGLES[flip_index])
    given_mask = ball(SHAPE, CENTRE, BRAIN_RADIUS + 1.0)
    mask_path = folder / "brain_mask.nii"
    nib.save(nib.Nifti1Image(given_mask.astype(np.uint8), affine), mask_path)
    return dict(truth, files=files, mask_file=str(mask_path), given_mask=given_mask, folder=folder)


def total_field(files, mask_file, **options):
    """The TotalField node of the head's echoes (``files`` as in the ``head`` fixture)."""
    return TotalField(
        magnitude_files=files["magnitude"],
        phase_files=files["phase"],
        phase_scales=files["scales"],
        echo_times=files["echo_times"],
        flip_angles=files["flips"],
        mask_file=mask_file,
        **options,
    )


def _run(interface, folder, name):
    cwd = folder / name
    cwd.mkdir(exist_ok=True)
    return interface.run(cwd=str(cwd)).outputs


@pytest.fixture(scope="module")
def chain(head):
    files, folder = head["files"], head["folder"]
    total = _run(
        total_field(files, head["mask_file"]),
        folder,
        "total",
    )
    mask = _run(
        QSMMask(mask_file=head["mask_file"], magnitude_file=total.magnitude_file, field_sd_file=total.field_sd_file),
        folder,
        "mask",
    )
    return dict(total=total, mask=mask)


def _data(path):
    return np.asarray(nib.load(path).dataobj)


def test_geometry_from_the_affine():
    affine = oblique_affine() @ np.diag([0.8, 1.0, 2.0, 1.0])
    assert np.allclose(voxel_size_from_affine(affine), (0.8, 1.0, 2.0))
    b0 = np.asarray(b0_direction_from_affine(affine))
    # The voxel axes, expressed in scanner coordinates, carry b0 back onto the scanner's z axis.
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert np.allclose(rotation @ b0, (0, 0, 1), atol=1e-12)
    assert np.allclose(b0_direction_from_affine(np.diag([1.0, 1.0, 1.0, 1.0])), (0, 0, 1))


def test_total_field_and_mask(head, chain):
    field = _data(chain["total"].field_file)
    brain = head["brain"]
    error = nrmse(field, head["total_hz"], brain, demean=False)
    print(f"\ntotal field NRMSE {error:.2f} % (both flip angles averaged)")
    assert error < 1
    metadata = chain["total"].metadata
    assert "all flip angles" in metadata["QSMSteps"]["FlipAngles"] and metadata["FlipAngle"] == list(FLIP_ANGLES)
    qsm_mask = _data(chain["mask"].out_mask) > 0
    shell = head["given_mask"] & ~brain
    print(
        f"QSM mask: {qsm_mask.sum()} voxels of {head['given_mask'].sum()}, "
        f"{(qsm_mask & shell).sum()} of {shell.sum()} signal-free shell voxels kept"
    )
    assert (qsm_mask & shell).sum() < 0.02 * shell.sum()
    assert (qsm_mask & brain).sum() > 0.97 * brain.sum()


@pytest.mark.parametrize(
    "background, inversion",
    [("vsharp", "tv"), ("pdf", "tv"), ("lbv", "tv"), ("vsharp", "tkd"), ("vsharp", "l2"), ("vsharp", "ilsqr")],
)
def test_background_and_inversion_recover_chi(head, chain, background, inversion):
    folder = head["folder"]
    removed = _run(
        RemoveBackground(
            field_file=chain["total"].field_file,
            mask_file=chain["mask"].out_mask,
            magnitude_file=chain["total"].magnitude_file,
            method=background,
        ),
        folder,
        f"bg_{background}",
    )
    local_mask = _data(removed.local_mask_file) > 0
    evaluation = local_mask & ball(SHAPE, CENTRE, BRAIN_RADIUS - 3)
    local_error = nrmse(_data(removed.local_field_file), head["local_hz"], evaluation)
    inverted = _run(
        InvertDipole(
            local_field_file=removed.local_field_file,
            mask_file=removed.local_mask_file,
            magnitude_file=chain["total"].magnitude_file,
            field_strength=B0_TESLA,
            mean_echo_time=chain["total"].mean_echo_time,
            method=inversion,
        ),
        folder,
        f"{inversion}_{background}",
    )
    referenced = _run(
        ReferenceSusceptibility(
            chi_file=inverted.chi_file,
            mask_file=removed.local_mask_file,
            step_metadata=[chain["total"].metadata, removed.metadata, inverted.metadata],
        ),
        folder,
        f"ref_{background}_{inversion}",
    )
    chi = _data(referenced.chi_file)
    error = nrmse(chi, head["chi"], evaluation)
    trivial = nrmse(3 * _data(removed.local_field_file) / HZ_PER_PPM, head["chi"], evaluation)
    means = [
        chi[ball(SHAPE, p["centre"], p["radius"] - 1)].mean() - chi[evaluation].mean() + head["chi"][evaluation].mean()
        for _, p in INTERIOR
    ]
    worst = max(abs(m - p["chi"]) for m, (_, p) in zip(means, INTERIOR))
    print(
        f"\n{background} + {inversion}: local field NRMSE {local_error:.1f} %, chi NRMSE {error:.1f} % "
        f"(trivial {trivial:.0f} %), worst sphere mean error {worst:.3f} ppm"
    )
    # Sources come within 3 mm of the edge of this small brain, where background removal is least
    # accurate: the bounds are looser than the phantom targets of issue 10 (15 % local field).
    # TKD and L2 are the crude ones (L2 shrinks the sphere contrasts by about a quarter).
    assert local_error < 30
    assert error < (40 if inversion in ("tv", "ilsqr") else 50) and error < trivial / 2
    assert worst < (0.08 if inversion == "l2" else 0.03)
    assert abs(chi[local_mask].mean()) < 1e-4  # referenced to the whole-brain mean
    sidecar = referenced.metadata
    assert INVERSION_ALGORITHMS[inversion] in sidecar["EstimationAlgorithm"]
    assert BACKGROUND_ALGORITHMS[background] in sidecar["EstimationAlgorithm"]
    assert sidecar["ReferenceRegion"].startswith("whole brain")


def test_a_phase_echo_in_other_units_is_one_clear_error(head, tmp_path):
    files = {key: list(value) for key, value in head["files"].items()}
    wrong = tmp_path / "echo3_phase_siemens.nii"
    radians = _data(files["phase"][2])
    nib.save(nib.Nifti1Image(np.round(radians / np.pi * 4096).astype(np.int16), head["affine"]), wrong)
    files["phase"][2] = str(wrong)
    interface = total_field(files, head["mask_file"])
    expected = r"echo3_phase_siemens\.nii is not wrapped phase in the units of the first echo"
    with pytest.raises(BIDSInputError, match=expected):
        interface.run(cwd=str(tmp_path))


def test_a_missing_phase_sample_gets_no_weight(head, tmp_path, caplog):
    """A NaN phase beside a finite magnitude is a missing sample, not a phase of 0 rad."""
    files = {key: list(value) for key, value in head["files"].items()}
    brain = head["brain"]
    voxels = np.argwhere(brain)[:: max(1, int(brain.sum()) // 40)]
    for echo in (1, 4):  # flip angle 1, echoes 2 and 5: one voxel set each
        phase = _data(files["phase"][echo]).astype(np.float32)
        phase[tuple(voxels.T)] = np.nan
        path = tmp_path / f"missing_{echo}_phase.nii"
        nib.save(nib.Nifti1Image(phase, head["affine"]), path)
        files["phase"][echo] = str(path)
    with caplog.at_level(logging.WARNING, logger="qmri_workflows.interfaces"):
        total = _run(
            total_field(files, head["mask_file"]),
            tmp_path,
            "total",
        )
    error = np.abs(_data(total.field_file) - head["total_hz"])[tuple(voxels.T)]
    print(f"\nfield error at {len(voxels)} voxels missing two phase samples: max {error.max():.3f} Hz")
    assert error.max() < 0.5
    assert any("missing_1_phase.nii" in r.getMessage() and f"({len(voxels)})" in r.getMessage() for r in caplog.records)


def test_flip_angles_with_different_numbers_of_echoes_use_one_series(head, tmp_path):
    """A flip angle with one echo fewer (its last dropped) is not averaged with the others: the
    series of most signal is fitted. The echo-time comparison used to fail to broadcast (8 vs 7)."""
    files = {key: list(value) for key, value in head["files"].items()}
    last_of_first = max(i for i, flip in enumerate(files["flips"]) if flip == FLIP_ANGLES[0])
    for values in files.values():
        del values[last_of_first]
    total = _run(total_field(files, head["mask_file"]), tmp_path, "total")
    assert total.metadata["FlipAngle"] == FLIP_ANGLES[1]  # the brighter one, with every echo
    assert total.metadata["EchoTime"] == list(ECHO_TIMES)
    assert "different echo times" in total.metadata["QSMSteps"]["FlipAngles"]
    error = _data(total.field_file) - head["total_hz"]
    assert np.median(np.abs(error[head["brain"]])) < 0.2


@pytest.mark.parametrize("unwrap, fit", [("region_growing", "complex"), ("laplacian", "linear")])
def test_total_field_alternatives(head, tmp_path, unwrap, fit):
    files = head["files"]
    total = _run(
        total_field(files, head["mask_file"], unwrap=unwrap, fit=fit, flip_angles_used="best"),
        tmp_path,
        "total",
    )
    error = _data(total.field_file) - head["total_hz"]
    brain = head["brain"]
    wrong = np.abs(error[brain]) > 10  # off by multiples of 1 / (TE2 - TE1) = 250 Hz
    median = np.median(np.abs(error[brain]))
    print(
        f"\n{unwrap} + {fit}, best flip angle: median field error {median:.3f} Hz, "
        f"{wrong.sum()} of {brain.sum()} voxels off by a wrap"
    )
    assert median < 0.2
    # The congruent Laplacian solution of the first echo difference misses a wrap where its
    # harmonic error exceeds pi (a few voxels in the strongest gradients); region growing never.
    assert wrong.sum() <= (0 if unwrap == "region_growing" else 0.001 * brain.sum())
    assert total.metadata["FlipAngle"] == FLIP_ANGLES[1]  # the brighter of the two
    assert "most signal" in total.metadata["QSMSteps"]["FlipAngles"]


def test_csf_reference_from_a_segmentation(head, chain, tmp_path):
    dseg = np.where(ball(SHAPE, INTERIOR[0][1]["centre"], 3.0), 1, np.where(head["brain"], 2, 0))
    dseg_file = tmp_path / "dseg.nii"
    nib.save(nib.Nifti1Image(dseg.astype(np.int16), head["affine"]), dseg_file)
    tsv = tmp_path / "dseg.tsv"
    tsv.write_text("index\tname\n1\tLateral-Ventricle CSF\n2\tWM\n")
    chi_file = tmp_path / "chi.nii"
    nib.save(nib.Nifti1Image(head["chi"].astype(np.float32), head["affine"]), chi_file)
    referenced = _run(
        ReferenceSusceptibility(
            chi_file=str(chi_file),
            mask_file=chain["mask"].out_mask,
            reference="csf",
            dseg_file=str(dseg_file),
            dseg_tsv=str(tsv),
        ),
        tmp_path,
        "ref",
    )
    chi = _data(referenced.chi_file)
    assert np.allclose(chi[dseg == 1].mean(), 0, atol=1e-6)
    assert referenced.metadata["ReferenceValue"] == pytest.approx(head["chi"][dseg == 1].mean(), abs=1e-5)
    assert "CSF (dseg labels 1: Lateral-Ventricle CSF" in referenced.metadata["ReferenceRegion"]
    without = ReferenceSusceptibility(chi_file=str(chi_file), mask_file=chain["mask"].out_mask, reference="csf")
    with pytest.raises(ValueError, match=r"--qsm-reference csf needs a segmentation .* or an R2\* map"):
        without.run(cwd=str(tmp_path))


def test_csf_reference_estimated_from_r2star(head, chain, tmp_path):
    """Without a segmentation: low R2* deep in the brain is CSF; low R2* near the edge is not."""
    deep = ball(SHAPE, CENTRE + (0, 0, 2), 4.0)
    shallow = ball(SHAPE, CENTRE + (13, 0, 0), 3.0)
    r2star = np.where(deep | shallow, 2.0, 20.0) * head["brain"]
    r2star_file = tmp_path / "r2star.nii"
    nib.save(nib.Nifti1Image(r2star.astype(np.float32), head["affine"]), r2star_file)
    chi_file = tmp_path / "chi.nii"
    chi = head["chi"] + 0.05 * shallow  # the wrong region would shift the reference
    nib.save(nib.Nifti1Image(chi.astype(np.float32), head["affine"]), chi_file)
    referenced = _run(
        ReferenceSusceptibility(
            chi_file=str(chi_file), mask_file=chain["mask"].out_mask, reference="csf", r2star_file=str(r2star_file)
        ),
        tmp_path,
        "ref",
    )
    mask = _data(chain["mask"].out_mask) > 0
    assert referenced.metadata["ReferenceRegionVoxels"] == (deep & mask).sum()
    assert referenced.metadata["ReferenceValue"] == pytest.approx(chi[deep].mean(), abs=1e-5)
    assert referenced.metadata["ReferenceRegion"].startswith("CSF estimated without a segmentation")
    uniform_file = tmp_path / "uniform.nii"
    nib.save(nib.Nifti1Image((20.0 * head["brain"]).astype(np.float32), head["affine"]), uniform_file)
    no_csf = ReferenceSusceptibility(
        chi_file=str(chi_file), mask_file=chain["mask"].out_mask, reference="csf", r2star_file=str(uniform_file)
    )
    with pytest.raises(ValueError, match="too little to serve as a CSF reference; give a segmentation"):
        no_csf.run(cwd=str(tmp_path))
