"""Per-subject outcomes of the App: each subject is processed or reported, never both silently."""

import os

import nibabel as nib
import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

from qmri_workflows.cli import run
from qmri_workflows.io.derivatives import write_nifti
from qmri_workflows.io.query import GRE
from qmri_workflows.io.staging import STAGING_FOLDER
from qmri_workflows.workflows import registry
from tests.bids_factory import make_vfa_dataset


def test_a_one_echo_subject_is_reported_and_the_others_processed(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    # one echo of one flip angle: nothing to compute (two flip angles of one echo would give R1)
    anat = raw / "sub-02" / "anat"
    for path in {*anat.glob("*echo-[23]_*"), *anat.glob("*flip-2*")}:
        path.unlink()
    code = run.main(
        [
            str(raw),
            str(tmp_path / "out"),
            "participant",
            "--skip-bids-validation",
            "-w",
            str(tmp_path / "work"),
            "--nprocs",
            "1",
        ]
    )
    assert code == run.EXIT_DATA
    assert "sub-02: not processed: 1 echo(es); R2* needs at least 2" in caplog.text
    assert not (tmp_path / "out" / "sub-02").exists()
    for subject in ("01", "03"):
        assert (tmp_path / "out" / f"sub-{subject}" / "anat" / f"sub-{subject}_R2starmap.nii.gz").is_file()


def test_a_subject_without_qmri_data_exits_66_when_alone(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    for path in (raw / "sub-01" / "anat").glob("*"):
        path.rename(
            path.with_name(
                path.name.replace("_VFA", "_T1w")
                .replace("_echo-", "_run-")
                .replace("_flip-", "_acq-f")
                .replace("_part-mag", "")
                .replace("_part-phase", "_rec-phase")
            )
        )
    code = run.main(
        [str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    )
    assert code == run.EXIT_NO_INPUT
    assert "no qMRI inputs for sub-01" in caplog.text
    assert not (tmp_path / "out").exists()


class _FailForSubjectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)


class _FailForSubjectOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class FailForSubject02(SimpleInterface):
    """Copies its input, except for sub-02, where it fails as a broken step would."""

    input_spec = _FailForSubjectInputSpec
    output_spec = _FailForSubjectOutputSpec

    def _run_interface(self, runtime):
        if "sub-02" in os.path.basename(self.inputs.in_file):
            raise RuntimeError("this step fails for sub-02")
        image = nib.load(self.inputs.in_file)
        self._results["out_file"] = str(
            write_nifti(os.path.join(runtime.cwd, "copy.nii"), image.get_fdata(), image.affine)
        )
        return runtime


def _build_failing(context):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name="sometimes_fails_wf")
    outputnode = pe.Node(IdentityInterface(fields=["out_file"]), name="outputnode")
    step = pe.Node(FailForSubject02(in_file=context.inputs.gre[0].magnitude[0]), name="step")
    workflow.connect(step, "out_file", outputnode, "out_file")
    return workflow


@pytest.fixture
def sometimes_failing_family():
    family = registry.register(
        registry.MapFamily(
            key="sometimesfails",
            name="sometimes fails",
            needs=(GRE,),
            describe=lambda inputs: "a copy",
            build=_build_failing,
            runtime_metadata=False,
            outputs=lambda inputs: [
                registry.Output(
                    field="out_file", suffix="S0map", desc="copy", source_files=(inputs.gre[0].magnitude[0],)
                )
            ],
        )
    )
    yield family
    registry.unregister(family.key)


@pytest.mark.parametrize("nprocs", ["1", "2"])
def test_a_failing_subject_publishes_nothing_and_the_others_everything(
    tmp_path, caplog, nprocs, sometimes_failing_family
):
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work"), "--nprocs", nprocs]
    )
    assert code == run.EXIT_FAILURE
    assert not (out / "sub-02").exists()
    assert not (out / STAGING_FOLDER).exists(), "the failed subject's staged files were left behind"
    for subject in ("01", "03"):
        anat = out / f"sub-{subject}" / "anat"
        assert (anat / f"sub-{subject}_desc-copy_S0map.nii.gz").is_file()
        assert (anat / f"sub-{subject}_R2starmap.nii.gz").is_file()
    assert "sub-02: FAILED in sometimes_fails_wf.step" in caplog.text
    logs = list((out / "logs").glob("qmri-workflows_*.log"))
    assert len(logs) == 1 and "sub-02: FAILED" in logs[0].read_text()
