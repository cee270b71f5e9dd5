"""The shipped example run through the App with one extra step that fails for sub-02, for the report tests.

sub-01 gets every map and a full report; sub-02 fails in that step, publishes nothing, and its page
must say so. The step's error message holds HTML markup, which the page must show as text.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "bids_example"
FAILING_KEY = "reportprobe"
FAILING_STEP = f"{FAILING_KEY}_wf.probe"
#: The error of the failing step: markup the report must escape.
FAILING_MESSAGE = "probe failed for sub-02: <b>not bold</b> & <script>document.title='x'</script>"


class _ProbeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)


class _ProbeOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class FailForSubject02(SimpleInterface):
    """Copies its input, except for sub-02, where it raises :data:`FAILING_MESSAGE`."""

    input_spec = _ProbeInputSpec
    output_spec = _ProbeOutputSpec

    def _run_interface(self, runtime):
        if "sub-02" in os.path.basename(self.inputs.in_file):
            raise RuntimeError(FAILING_MESSAGE)
        image = nib.load(self.inputs.in_file)
        out_file = os.path.join(runtime.cwd, "copy.nii.gz")
        nib.save(nib.Nifti1Image(image.get_fdata(dtype="float32"), image.affine), out_file)
        self._results["out_file"] = out_file
        return runtime


def failing_family(key=FAILING_KEY, name="report probe", *, desc="probe"):
    """A map family (not registered) whose one step, ``<key>_wf.probe``, copies the first echo and
    fails for sub-02 (:class:`FailForSubject02`); its copy is published as ``desc-<desc>_S0map``."""
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from qmri_workflows.io.query import GRE
    from qmri_workflows.workflows import registry

    def build(context):
        workflow = pe.Workflow(name=f"{key}_wf")
        outputnode = pe.Node(IdentityInterface(fields=["out_file"]), name="outputnode")
        probe = pe.Node(FailForSubject02(in_file=context.inputs.gre[0].magnitude[0]), name="probe")
        workflow.connect(probe, "out_file", outputnode, "out_file")
        return workflow

    return registry.MapFamily(
        key=key,
        name=name,
        needs=(GRE,),
        describe=lambda inputs: "a copy of the first echo",
        build=build,
        runtime_metadata=False,
        outputs=lambda inputs: [
            registry.Output(field="out_file", suffix="S0map", desc=desc, source_files=(inputs.gre[0].magnitude[0],))
        ],
    )


def run_example_with_a_failure(root):
    """Run the participant level on the shipped example into ``root/out``; return that folder."""
    from qmri_workflows.cli import run
    from qmri_workflows.workflows import registry

    root = Path(root)
    out = root / "out"
    family = registry.register(failing_family())
    try:
        code = run.main(
            [
                str(EXAMPLE),
                str(out),
                "participant",
                "--derivatives",
                str(EXAMPLE / "derivatives" / "phantom"),
                "--skip-bids-validation",
                "-w",
                str(root / "work"),
                "--nprocs",
                "2",
            ]
        )
    finally:
        registry.unregister(family.key)
    assert code == run.EXIT_FAILURE
    return out
