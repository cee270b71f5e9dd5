"""MT saturation (MTsat, Helms 2008) from an MPM collection, and its registry entry ("mtsat").

Output (``docs/architecture.rst``, "MTsat"): ``anat/..._MTsat`` in percent units (p.u.), as the
hMRI toolbox writes it. Inputs: the PD- and T1-weighted (mt-off) contrasts' TE = 0 intercepts from
the R2* (ESTATICS) family, the MT-weighted (mt-on) echoes brought to TE = 0 with the same R2*, and the
transmit field the R1 family used (an AFI or double-angle pair, a pre-computed TB1map, or its estimate from the VFA
data), for Helms' empirical B1 correction; ``--no-b1-correction`` turns it off for MTsat as for R1.
"""

from __future__ import annotations


def init_mtsat_wf(
    *,
    mt_series,
    mt_off_repetition_time,
    b1_correction=True,
    b1_description=None,
    b1_note=None,
    mem_gb=1.0,
    name="mtsat_wf",
):
    """Build a workflow that maps MTsat.

    Parameters
    ----------
    mt_series : qmri_workflows.io.query.EchoSeries
        The MT-weighted (mt-on) contrast.
    mt_off_repetition_time : float
        TR (s) of the PD- and T1-weighted contrasts.
    b1_correction : bool
        Apply Helms' empirical B1 correction with ``inputnode.b1_file``.
    b1_description, b1_note : str, optional
        Where the B1+ map comes from / why there is none (sidecar).
    mem_gb : float
        Memory of the node (GB).
    name : str

    Returns
    -------
    nipype.pipeline.engine.Workflow
        ``inputnode``: ``mt_off_files``, ``mt_off_flip_angles``, ``mt_files``, ``r2star_file``,
        ``mask_file``, ``b1_file``; ``outputnode``: ``mtsat_file``, ``metadata``.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.mtsat import ComputeMTsat

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=["mt_off_files", "mt_off_flip_angles", "mt_files", "r2star_file", "mask_file", "b1_file"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(IdentityInterface(fields=["mtsat_file", "metadata"]), name="outputnode")
    compute = pe.Node(
        ComputeMTsat(
            mt_off_repetition_time=mt_off_repetition_time,
            mt_echo_times=list(mt_series.echo_times),
            mt_flip_angle=mt_series.flip_angle,
            mt_repetition_time=mt_series.repetition_time,
            b1_correction=b1_correction,
        ),
        name="compute_mtsat",
        mem_gb=mem_gb,
    )
    if b1_description:
        compute.inputs.b1_description = b1_description
    if b1_note:
        compute.inputs.b1_note = b1_note
    workflow.connect([
        (inputnode, compute, [("mt_off_files", "mt_off_files"), ("mt_off_flip_angles", "mt_off_flip_angles"),
                              ("mt_files", "mt_files"), ("r2star_file", "r2star_file"),
                              ("mask_file", "mask_file")]),
        (compute, outputnode, [("mtsat_file", "mtsat_file"), ("metadata", "metadata")]),
    ])  # fmt: skip
    if b1_correction:
        workflow.connect(inputnode, "b1_file", compute, "b1_file")
    return workflow


def _b1_choice(inputs, options, running):
    """(correct for B1, where the map comes from, why not): the map is the one the R1 fit used."""
    from .relaxometry import _b1_source, _no_b1_reason, _tb1map_origin

    if options["r1_no_b1_correction"]:
        return False, None, "turned off (--no-b1-correction)"
    source = _b1_source(inputs) if "b1" in running else None
    if source == "tb1map":
        return True, f"the TB1map {_tb1map_origin(inputs.derivatives['TB1map'])}", None
    if source == "afi":
        return True, "the AFI pair", None
    if source == "dam":
        return True, "the double-angle pair", None
    if source == "tfl":
        return True, "the Siemens tfl_b1map", None
    if options.get("r1_no_b1_estimate"):
        return False, None, f"{_no_b1_reason(inputs)}; --no-b1-estimate"
    return True, f"the smooth B1+ field estimated from the mt-off data ({_no_b1_reason(inputs)})", None


def _check_mtsat(inputs):
    from ..io.query import MT

    problem = inputs.problem(MT)
    if problem is not None:
        return f"MT-weighted (mt-on) images unusable: {problem.message}"
    if inputs.gre_suffix != "MPM" or not inputs.has(MT):
        return "no MT-weighted images (needs an MPM collection with an mt-on contrast, e.g. anat/*_acq-MTw_*_mt-on_MPM)"
    return None


def _describe_mtsat(inputs, options):
    from .relaxometry import _b1_source

    running = {"b1"} if _b1_source(inputs) else set()
    correct, source, note = _b1_choice(inputs, options, running)
    b1 = f"B1 corrected with {source}" if correct else f"no B1 correction ({note})"
    return (
        f"Helms 2008 from MTw (flip {inputs.mt.flip_angle:g} deg, TR {inputs.mt.repetition_time * 1e3:g} ms, "
        f"{len(inputs.mt.echo_times)} echo(es)) and the PDw/T1w contrasts; {b1}"
    )


def _build_mtsat(context):
    from .base import estimate_fit_mem_gb

    inputs, options = context.inputs, context.options
    correct, source, note = _b1_choice(inputs, options, context.running)
    multi_echo = "r2star" in context.running
    workflow = init_mtsat_wf(
        mt_series=inputs.mt,
        mt_off_repetition_time=inputs.gre[0].repetition_time,
        b1_correction=correct,
        b1_description=source,
        b1_note=note,
        mem_gb=estimate_fit_mem_gb(inputs.mt.magnitude[0], len(inputs.mt.magnitude) + 6),
    )
    if multi_echo:
        workflow.inputs.inputnode.mt_files = list(inputs.mt.magnitude)
    else:
        # single echo: the first echo of every contrast, whose T2* weighting then cancels only if the TEs match
        workflow.inputs.inputnode.mt_files = [inputs.mt.magnitude[0]]
        workflow.inputs.inputnode.mt_off_files = [series.magnitude[0] for series in inputs.gre]
        workflow.inputs.inputnode.mt_off_flip_angles = [float(series.flip_angle) for series in inputs.gre]
    return workflow


def _mtsat_outputs(inputs):
    from .registry import Output

    sources = tuple(inputs.mt.magnitude) + tuple(path for series in inputs.gre for path in series.magnitude)
    return [
        Output(
            field="mtsat_file",
            suffix="MTsat",
            source_files=sources,
            metadata={"SkullStripped": True, "Units": "p.u."},
            quantitative=True,
        )
    ]


def _registry_entries():
    from ..io.query import GRE, MT
    from .registry import MapFamily

    mtsat = MapFamily(
        key="mtsat",
        name="MTsat",
        needs=(GRE,),
        reads=(MT,),
        depends=("brainmask", "r1"),
        uses=("r2star",),
        consumes={
            "mask_file": ("brainmask", "mask_file"),
            "mt_off_files": ("r2star", "s0_files"),
            "mt_off_flip_angles": ("r2star", "flip_angles"),
            "r2star_file": ("r2star", "r2star_file"),
            "b1_file": ("r1", "b1_file"),
        },
        check=_check_mtsat,
        describe=_describe_mtsat,
        describe_options=True,
        build=_build_mtsat,
        outputs=_mtsat_outputs,
    )
    return (mtsat,)


MTSAT_FAMILY = _registry_entries()[0]

MAP_FAMILIES = (MTSAT_FAMILY,)
