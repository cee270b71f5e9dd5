"""Proton density in percent water from the R1 family's M0, and its registry entry ("pd").

The R1 family (DESPOT1 on the T2*-decay-corrected ESTATICS intercepts, B1 corrected) gives the
apparent M0; this family removes the receive sensitivity (RB1COR head/body pair when the subject has
one, else the 1/PD-R1 relation of brain tissue, or nothing with ``--no-receive-correction``) and
calibrates on CSF (100 %) or white matter (69 %) with ``--pd-calibration``. The sidecar of
``PDmap`` says which receive correction and which reference were used.
"""

from __future__ import annotations

CALIBRATION_CHOICES = ("csf", "wm")


def init_pd_wf(*, reference="csf", receive_correction=True, receive_pair=False, mem_gb=1.0, name="pd_wf"):
    """Build a workflow that turns M0 and R1 into PD (percent water).

    Parameters
    ----------
    reference : {"csf", "wm"}
        Calibration reference: CSF = 100 % or white matter = 69 %.
    receive_correction : bool
        Remove the receive sensitivity (from the pair when ``receive_pair``, else estimated from
        the 1/PD-R1 relation).
    receive_pair : bool
        Whether ``inputnode.head_file``/``body_file`` (the RB1COR pair) will be set.
    mem_gb : float
        Memory estimate of each node.
    name : str
        Workflow name.

    Returns
    -------
    nipype.pipeline.engine.Workflow
        ``inputnode``: ``m0_file``, ``r1_file``, ``mask_file``, ``head_file``, ``body_file``;
        ``outputnode``: ``pd_file`` (percent water, 0 outside the brain mask), ``metadata``.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.pd import CalibratePD, ReceiveSensitivity

    if reference not in CALIBRATION_CHOICES:
        raise ValueError(f"reference must be one of {CALIBRATION_CHOICES}, got {reference!r}")
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["m0_file", "r1_file", "mask_file", "head_file", "body_file"]), name="inputnode"
    )
    outputnode = pe.Node(IdentityInterface(fields=["pd_file", "metadata"]), name="outputnode")
    calibrate = pe.Node(
        CalibratePD(reference=reference, receive_correction=receive_correction), name="calibrate_pd", mem_gb=mem_gb
    )
    workflow.connect([
        (inputnode, calibrate, [("m0_file", "m0_file"), ("r1_file", "r1_file"), ("mask_file", "mask_file")]),
        (calibrate, outputnode, [("pd_file", "pd_file"), ("metadata", "metadata")]),
    ])  # fmt: skip
    if receive_correction and receive_pair:
        receive = pe.Node(ReceiveSensitivity(), name="receive_sensitivity", mem_gb=mem_gb)
        workflow.connect([
            (inputnode, receive, [("head_file", "head_file"), ("body_file", "body_file"),
                                  ("m0_file", "reference_file"), ("mask_file", "mask_file")]),
            (receive, calibrate, [("receive_file", "receive_file")]),
        ])  # fmt: skip
    return workflow


def _receive_used(inputs, options):
    if options["pd_no_receive_correction"]:
        return "none"
    return "rb1cor" if inputs.receive is not None else "r1_relation"


def _describe_pd(inputs, options):
    used = _receive_used(inputs, options)
    if used == "none":
        return "M0 of the R1 fit; no receive-field correction (--no-receive-correction)"
    receive = (
        "the RB1COR head/body pair" if used == "rb1cor" else "the 1/PD-R1 relation of brain tissue (no RB1COR pair)"
    )
    return f"M0 of the R1 fit; receive field from {receive}"


def _build_pd(context):
    inputs, options = context.inputs, context.options
    used = _receive_used(inputs, options)
    workflow = init_pd_wf(
        reference=options["pd_calibration"],
        receive_correction=used != "none",
        receive_pair=used == "rb1cor",
    )
    if used == "rb1cor":
        workflow.inputs.inputnode.head_file = inputs.receive.head_file
        workflow.inputs.inputnode.body_file = inputs.receive.body_file
    return workflow


def _pd_outputs(inputs, options=None):
    from .registry import Output

    sources = tuple(series.magnitude[0] for series in inputs.gre)
    # The RB1COR pair is a source only when it is used (not with --no-receive-correction).
    if inputs.receive is not None and (options is None or _receive_used(inputs, options) == "rb1cor"):
        sources += (inputs.receive.head_file, inputs.receive.body_file)
    return [
        Output(
            field="pd_file",
            suffix="PDmap",
            source_files=sources,
            metadata={"SkullStripped": True},  # Units come with the run: percent, or arbitrary if uncalibrated
            quantitative=True,
        )
    ]


def _registry_entries():
    from ..io.query import GRE, RECEIVE
    from .registry import MapFamily, Option

    pd = MapFamily(
        key="pd",
        name="PD",
        needs=(GRE,),
        reads=(RECEIVE,),
        depends=("brainmask", "r1"),
        consumes={
            "m0_file": ("r1", "m0_file"),
            "r1_file": ("r1", "r1_file"),
            "mask_file": ("brainmask", "mask_file"),
        },
        describe=_describe_pd,
        build=_build_pd,
        outputs=_pd_outputs,
        outputs_options=True,
        describe_options=True,
        options=(
            Option(
                ("--pd-calibration",),
                "pd_calibration",
                {
                    "choices": CALIBRATION_CHOICES,
                    "default": "csf",
                    "help": "PD calibration reference: CSF = 100 %% water (default) or white matter = 69 %% "
                    "(biased in MS, where normal-appearing white matter holds more water)",
                },
            ),
            Option(
                ("--no-receive-correction",),
                "pd_no_receive_correction",
                {
                    "action": "store_true",
                    "help": "do not correct PD for the receive-coil sensitivity (by default: from the "
                    "RB1COR head/body pair, or estimated from the 1/PD-R1 relation without one)",
                },
            ),
        ),
    )
    return (pd,)


PD_FAMILY = _registry_entries()[0]

MAP_FAMILIES = (PD_FAMILY,)
