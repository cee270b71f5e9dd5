"""Quantitative susceptibility mapping from multi-echo GRE phase, and its registry entry.

Outputs (``docs/architecture.rst``, "QSM outputs"): ``anat/..._Chimap`` (ppm), and in ``fmap`` the
total field ``desc-total_fieldmap`` and the background-removed local field ``desc-local_fieldmap``,
both in Hz (the BIDS ``fieldmap`` suffix requires Hz, rad/s or T), plus the QSM mask
``anat/..._desc-qsm_mask`` and, because BIDS wants a magnitude image next to a field map,
``fmap/..._magnitude`` (root-sum-of-squares over echoes: the data weights of the chain).
"""

from __future__ import annotations

UNWRAP_CHOICES = ("region_growing", "laplacian")
BACKGROUND_CHOICES = ("vsharp", "pdf", "lbv")
INVERSION_CHOICES = ("tv", "tkd", "l2", "ilsqr")
REFERENCE_CHOICES = ("brain", "csf")
FIT_CHOICES = ("linear", "complex")
FLIP_CHOICES = ("all", "best")
MIN_ECHOES_QSM = 2


def init_qsm_wf(
    *,
    field_strength,
    unwrap="region_growing",
    fit="linear",
    flip_angles_used="all",
    background="lbv",
    inversion="tv",
    reference="brain",
    dseg_tsv=None,
    magnitude_indices=None,
    mem_gb=None,
    omp_nthreads=1,
    name="qsm_wf",
):
    """Build a workflow that maps magnetic susceptibility from multi-echo GRE magnitude and phase.

    Steps, each a node that can be swapped by its option: total field (every echo's phase units
    checked, flip angles combined, echo-referenced unwrapping, field fit) -> QSM mask (brain mask
    minus unreliable edge voxels) -> background removal -> dipole inversion -> referencing.

    Parameters
    ----------
    field_strength : float
        MagneticFieldStrength (T).
    unwrap : {"region_growing", "laplacian"}
        Spatial unwrapper inside the echo-referenced unwrapping.
    fit : {"linear", "complex"}
        Total-field fit.
    flip_angles_used : {"all", "best"}
        With several flip angles: their magnitude-weighted complex average, or the one of most signal.
    background : {"vsharp", "pdf", "lbv"}
        Background field removal.
    inversion : {"tv", "tkd", "l2", "ilsqr"}
        Dipole inversion.
    reference : {"brain", "csf"}
        Region whose mean susceptibility is 0: CSF from ``dseg_file`` and ``dseg_tsv`` or, without
        them, estimated from ``r2star_file``
        (:func:`~qmri_workflows.core.qsm.estimate_csf_mask`).
    dseg_tsv : str, optional
        Label table of the segmentation given with ``--derivatives``.
    magnitude_indices : list of int, optional
        Positions in ``magnitude_files`` of the echoes that have a phase image, in the order of
        ``phase_files`` (the GRE series without phase are left out); default: all of them.
    mem_gb : dict, optional
        Memory (GB) of the nodes by step (``total_field``, ``mask``, ``background``,
        ``inversion``, ``reference``); :func:`estimate_qsm_mem_gb` gives them.
    omp_nthreads : int
        Threads of the FFT-heavy nodes.
    name : str
        Workflow name.

    Inputs
    ------
    magnitude_files, phase_files, phase_scales, echo_times, flip_angles
        One entry per echo of every flip angle.
    mask_file
        Brain mask.
    dseg_file
        Segmentation on the map grid (optional; for ``reference="csf"``).
    r2star_file
        R2* map (optional; for ``reference="csf"`` without ``dseg_file``).

    Outputs
    -------
    chi_file
        Susceptibility (ppm) referenced to ``reference``.
    local_field_file, total_field_file
        Local and total field (Hz).
    magnitude_file
        Root-sum-of-squares over echoes of the magnitude used (the data weights).
    qsm_mask_file
        The QSM mask.
    metadata
        Sidecar fields describing the chain.
    """
    from nipype.interfaces.utility import IdentityInterface, Merge
    from nipype.pipeline import engine as pe

    from ..interfaces.qsm import InvertDipole, QSMMask, ReferenceSusceptibility, RemoveBackground, TotalField

    mem_gb = {**dict.fromkeys(("total_field", "mask", "background", "inversion", "reference"), 1.0), **(mem_gb or {})}
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                "magnitude_files",
                "phase_files",
                "phase_scales",
                "echo_times",
                "flip_angles",
                "mask_file",
                "dseg_file",
                "r2star_file",
            ]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=["chi_file", "local_field_file", "total_field_file", "magnitude_file", "qsm_mask_file", "metadata"]
        ),
        name="outputnode",
    )
    total_field = pe.Node(
        TotalField(unwrap=unwrap, fit=fit, flip_angles_used=flip_angles_used, num_threads=omp_nthreads),
        name="total_field",
        mem_gb=mem_gb["total_field"],
        n_procs=omp_nthreads,
    )
    qsm_mask = pe.Node(QSMMask(), name="qsm_mask", mem_gb=mem_gb["mask"])
    # LBV solves by conjugate gradients on a sparse matrix: one thread.
    background_threads = 1 if background == "lbv" else omp_nthreads
    remove_background = pe.Node(
        RemoveBackground(method=background, num_threads=background_threads),
        name="remove_background",
        mem_gb=mem_gb["background"],
        n_procs=background_threads,
    )
    invert = pe.Node(
        InvertDipole(method=inversion, field_strength=field_strength, num_threads=omp_nthreads),
        name="invert_dipole",
        mem_gb=mem_gb["inversion"],
        n_procs=omp_nthreads,
    )
    reference_node = pe.Node(ReferenceSusceptibility(reference=reference), name="reference", mem_gb=mem_gb["reference"])
    if dseg_tsv:
        reference_node.inputs.dseg_tsv = str(dseg_tsv)
    step_metadata = pe.Node(Merge(4), name="step_metadata", run_without_submitting=True)
    if magnitude_indices is None:
        workflow.connect([(inputnode, total_field, [("magnitude_files", "magnitude_files")])])
    else:
        from nipype.interfaces.utility import Select

        select = pe.Node(
            Select(index=list(magnitude_indices)), name="magnitudes_with_phase", run_without_submitting=True
        )
        workflow.connect([
            (inputnode, select, [("magnitude_files", "inlist")]),
            (select, total_field, [("out", "magnitude_files")]),
        ])  # fmt: skip
    workflow.connect([
        (inputnode, total_field, [
            ("phase_files", "phase_files"),
            ("phase_scales", "phase_scales"), ("echo_times", "echo_times"),
            ("flip_angles", "flip_angles"), ("mask_file", "mask_file")]),
        (inputnode, qsm_mask, [("mask_file", "mask_file")]),
        (total_field, qsm_mask, [("magnitude_file", "magnitude_file"),
                                 ("field_sd_file", "field_sd_file")]),
        (total_field, remove_background, [("field_file", "field_file"),
                                          ("magnitude_file", "magnitude_file")]),
        (qsm_mask, remove_background, [("out_mask", "mask_file")]),
        (remove_background, invert, [("local_field_file", "local_field_file"),
                                     ("local_mask_file", "mask_file")]),
        (total_field, invert, [("magnitude_file", "magnitude_file"),
                               ("mean_echo_time", "mean_echo_time")]),
        (invert, reference_node, [("chi_file", "chi_file")]),
        (remove_background, reference_node, [("local_mask_file", "mask_file")]),
        (inputnode, reference_node, [("dseg_file", "dseg_file"), ("r2star_file", "r2star_file")]),
        (total_field, step_metadata, [("metadata", "in1")]),
        (qsm_mask, step_metadata, [("metadata", "in2")]),
        (remove_background, step_metadata, [("metadata", "in3")]),
        (invert, step_metadata, [("metadata", "in4")]),
        (step_metadata, reference_node, [("out", "step_metadata")]),
        (reference_node, outputnode, [("chi_file", "chi_file"), ("metadata", "metadata")]),
        (remove_background, outputnode, [("local_field_file", "local_field_file")]),
        (total_field, outputnode, [("field_file", "total_field_file"),
                                   ("magnitude_file", "magnitude_file")]),
        (qsm_mask, outputnode, [("out_mask", "qsm_mask_file")]),
    ])  # fmt: skip
    return workflow


BASE_GB = 0.25
"""Memory of a node's Python process before it loads data (interpreter, numpy, scipy, Nipype)."""

# Peak bytes per voxel of the image grid, measured on 191 x 227 x 201 voxels
# (benchmarks/bench_qsm_interfaces.py, VmHWM minus BASE_GB); the FFT steps work on the padded box
# around the brain, which is smaller than the grid for a head-sized field of view.
_BYTES_PER_VOXEL = {
    "mask": 16,
    "reference": 8,
    "background": {"vsharp": 20, "pdf": 45, "lbv": 130},
    "inversion": {"tv": 60, "tkd": 30, "l2": 30, "ilsqr": 180},
}


def estimate_qsm_mem_gb(reference_file, n_echoes, n_flip_angles=1, *, background="lbv", inversion="tv"):
    """Peak memory (GB) of each QSM node on the grid of ``reference_file``.

    The total field holds complex64 echo stacks (three while flip angles are averaged), float32
    phase and magnitude stacks and the unwrapping graph; the other steps a few volumes each.
    Per-voxel figures come from measured peaks (``benchmarks/bench_qsm_interfaces.py``), with 30 %
    margin.

    Returns
    -------
    dict
        ``{step: GB}`` for ``total_field``, ``mask``, ``background``, ``inversion``, ``reference``.
    """
    import nibabel as nib
    import numpy as np

    n_voxels = int(np.prod(nib.load(reference_file).shape[:3]))
    # Averaging flip angles keeps three more complex stacks, whatever their number.
    per_echo = 24 + (16 if n_flip_angles > 1 else 0)
    per_voxel = {
        "total_field": per_echo * n_echoes + 40,
        "mask": _BYTES_PER_VOXEL["mask"],
        "background": _BYTES_PER_VOXEL["background"][background],
        "inversion": _BYTES_PER_VOXEL["inversion"][inversion],
        "reference": _BYTES_PER_VOXEL["reference"],
    }
    return {step: round(BASE_GB + 1.3 * size * n_voxels / 1e9, 2) for step, size in per_voxel.items()}


# --------------------------------------------------------------------------------------------------
# registry entry
# --------------------------------------------------------------------------------------------------
def _flatten_with_phase(gre_series):
    magnitude, phase, scales, echo_times, flips = [], [], [], [], []
    for series in gre_series:
        magnitude += list(series.magnitude)
        phase += list(series.phase)
        scales += [float(series.phase_scale)] * len(series.phase)
        echo_times += list(series.echo_times)
        flips += [float(series.flip_angle or 0.0)] * len(series.magnitude)
    return magnitude, phase, scales, echo_times, flips


def _with_phase(inputs):
    """The GRE series (flip angles) that have a phase image per echo: QSM uses those only."""
    return [series for series in inputs.gre if series.phase]


def _check_qsm(inputs):
    if not _with_phase(inputs):
        return f"QSM needs the phase of every echo (part-phase images); {inputs.gre[0].magnitude[0]} has none" + (
            f" (nor {len(inputs.gre) - 1} other series)" if len(inputs.gre) > 1 else ""
        )
    n_echoes = min(len(series.echo_times) for series in _with_phase(inputs))
    if n_echoes < MIN_ECHOES_QSM:
        return f"{n_echoes} echo(es); QSM needs at least {MIN_ECHOES_QSM}"
    if not inputs.field_strength:
        return (
            "QSM needs MagneticFieldStrength (T) in the GRE sidecars to convert the field to "
            "ppm; add it to the sidecars"
        )
    return None


def _describe_qsm(inputs):
    from .base import echo_counts

    used = _with_phase(inputs)
    without = [series for series in inputs.gre if not series.phase]
    return (
        f"phase of {inputs.gre_suffix} {len(used)} flip angle(s) x {echo_counts(used)} echoes "
        f"at {inputs.field_strength:g} T"
        + (
            f" (not the {len(without)} flip angle(s) without phase images, e.g. {without[0].magnitude[0]})"
            if without
            else ""
        )
    )


def _magnitude_indices(inputs):
    """Positions of the echoes of the series with phase in the R2* family's flat magnitude list
    (every series' echoes in ``inputs.gre`` order, :func:`~qmri_workflows.workflows.base.flatten_echoes`);
    None when every series has phase."""
    if all(series.phase for series in inputs.gre):
        return None
    indices, start = [], 0
    for series in inputs.gre:
        if series.phase:
            indices += range(start, start + len(series.magnitude))
        start += len(series.magnitude)
    return indices


def _build_qsm(context):
    from ..io.query import DSEG

    inputs, options = context.inputs, context.options
    with_phase = _with_phase(inputs)
    magnitude, phase, scales, echo_times, flips = _flatten_with_phase(with_phase)
    dseg = inputs.derivatives.get(DSEG)
    workflow = init_qsm_wf(
        field_strength=inputs.field_strength,
        unwrap=options["qsm_unwrap"],
        fit=options["qsm_fit"],
        flip_angles_used=options["qsm_flip_angles"],
        background=options["qsm_background"],
        inversion=options["qsm_inversion"],
        reference=options["qsm_reference"],
        dseg_tsv=dseg.tsv if dseg is not None else None,
        magnitude_indices=_magnitude_indices(inputs),
        mem_gb=estimate_qsm_mem_gb(
            magnitude[0],
            max(len(s.magnitude) for s in with_phase),
            len(with_phase),
            background=options["qsm_background"],
            inversion=options["qsm_inversion"],
        ),
        omp_nthreads=context.omp_nthreads,
    )
    # magnitude_files come from the r2star family (denoised, in the same order as the phase)
    for field, value in (
        ("phase_files", phase),
        ("phase_scales", scales),
        ("echo_times", echo_times),
        ("flip_angles", flips),
    ):
        setattr(workflow.inputs.inputnode, field, value)
    return workflow


def _qsm_outputs(inputs):
    from .registry import Output

    magnitude, phase, *_ = _flatten_with_phase(_with_phase(inputs))
    sources = tuple(phase + magnitude)
    masked = {"SkullStripped": True}
    return [
        Output(
            field="chi_file",
            suffix="Chimap",
            source_files=sources,
            metadata={**masked, "Units": "ppm"},
            quantitative=True,
        ),
        Output(
            field="local_field_file",
            suffix="fieldmap",
            desc="local",
            datatype="fmap",
            source_files=sources,
            metadata={
                **masked,
                "Units": "Hz",
                "Description": (
                    "local (background-removed) field in Hz, 0 outside the QSM mask eroded by the "
                    "background removal; steps: QSMSteps up to BackgroundRemoval"
                ),
            },
        ),
        Output(
            field="total_field_file",
            suffix="fieldmap",
            desc="total",
            datatype="fmap",
            source_files=sources,
            metadata={
                **masked,
                "Units": "Hz",
                "Description": ("total field offset in Hz inside the brain mask; steps: QSMSteps up to TotalField"),
            },
        ),
        # BIDS wants a magnitude image next to a fieldmap; one without desc serves both fields.
        Output(
            field="magnitude_file",
            suffix="magnitude",
            datatype="fmap",
            source_files=sources,
            metadata={
                "SkullStripped": False,
                "Units": "arbitrary",
                "Description": (
                    "root-sum-of-squares over echoes of the GRE magnitude used for QSM (the data "
                    "weights of background removal and inversion)"
                ),
            },
        ),
        Output(
            field="qsm_mask_file",
            suffix="mask",
            desc="qsm",
            source_files=sources,
            metadata={"Description": "brain mask minus unreliable edge voxels (QSMSteps.Mask)"},
        ),
    ]


def _registry_entries():
    from ..io.query import DSEG, GRE
    from .registry import MapFamily, Option

    qsm = MapFamily(
        key="qsm",
        name="QSM",
        needs=(GRE,),
        # R2* serves the CSF reference estimated without a segmentation.
        depends=("brainmask", "r2star"),
        # the magnitudes R2* was fitted to: denoised unless --denoise none (the phase never is)
        consumes={
            "mask_file": ("brainmask", "mask_file"),
            "r2star_file": ("r2star", "r2star_file"),
            "magnitude_files": ("r2star", "magnitude_files"),
        },
        derived_inputs={"dseg_file": (DSEG, "majority")},
        check=_check_qsm,
        describe=_describe_qsm,
        build=_build_qsm,
        outputs=_qsm_outputs,
        options=(
            Option(
                ("--qsm-unwrap",),
                "qsm_unwrap",
                {
                    "choices": UNWRAP_CHOICES,
                    "default": "region_growing",
                    "help": "spatial unwrapper inside the echo-referenced unwrapping: quality-guided "
                    "region growing (default) or Laplacian",
                },
            ),
            Option(
                ("--qsm-field-fit",),
                "qsm_fit",
                {
                    "choices": FIT_CHOICES,
                    "default": "linear",
                    "help": "total-field fit: weighted linear fit of unwrapped phase (default) or "
                    "non-linear complex fit",
                },
            ),
            Option(
                ("--qsm-flip-angles",),
                "qsm_flip_angles",
                {
                    "choices": FLIP_CHOICES,
                    "default": "all",
                    "help": "with several flip angles: average them all (default) or use the one of most signal",
                },
            ),
            Option(
                ("--qsm-background",),
                "qsm_background",
                {
                    "choices": BACKGROUND_CHOICES,
                    "default": "lbv",
                    "help": "background field removal: LBV (default; on the fair phantom it keeps the long "
                    "wavelengths of the local field that V-SHARP's deconvolution loses), V-SHARP or PDF",
                },
            ),
            Option(
                ("--qsm-inversion",),
                "qsm_inversion",
                {
                    "choices": INVERSION_CHOICES,
                    "default": "tv",
                    "help": "dipole inversion: total variation by ADMM (tv, default), TKD, closed-form L2 or iLSQR",
                },
            ),
            Option(
                ("--qsm-reference",),
                "qsm_reference",
                {
                    "choices": REFERENCE_CHOICES,
                    "default": "brain",
                    "help": "susceptibility reference: whole-brain mean (default) or CSF, from a "
                    "segmentation given with --derivatives or else estimated (low R2* deep "
                    "in the brain)",
                },
            ),
        ),
    )
    return (qsm,)


MAP_FAMILIES = _registry_entries()
