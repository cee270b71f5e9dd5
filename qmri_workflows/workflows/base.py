"""Top-level workflows: one per subject (and session), gathered into one graph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MIN_ECHOES_R2STAR = 2


@dataclass(frozen=True)
class MapPlan:
    """Whether a map can be computed for a subject, and why (not)."""

    name: str
    run: bool
    reason: str


def plan_maps(inputs):
    """Decide which maps the data of one subject supports.

    Parameters
    ----------
    inputs : qmri_workflows.io.query.SubjectInputs

    Returns
    -------
    list of MapPlan
    """
    plans = []
    if not inputs.gre:
        plans.append(MapPlan("R2*", False, "no multi-echo GRE (VFA or MEGRE) found"))
    else:
        n_echoes = max(len(series.magnitude) for series in inputs.gre)
        if n_echoes < MIN_ECHOES_R2STAR:
            plans.append(
                MapPlan("R2*", False, f"{n_echoes} echo(es); R2* needs at least {MIN_ECHOES_R2STAR}")
            )
        else:
            plans.append(
                MapPlan(
                    "R2*",
                    True,
                    f"{inputs.gre_suffix}: {len(inputs.gre)} flip angle(s) x {n_echoes} echoes",
                )
            )
    # Maps that later releases estimate; say so rather than skip silently.
    not_yet = [
        ("R1/PD", bool(inputs.gre and len(inputs.gre) >= 2), "variable flip angle SPGR"),
        ("R2", bool(inputs.bssfp), "phase-cycled bSSFP"),
        ("B1+", inputs.afi is not None, "AFI"),
        ("QSM", any(series.phase for series in inputs.gre), "multi-echo GRE phase"),
    ]
    for name, has_data, source in not_yet:
        if has_data:
            plans.append(MapPlan(name, False, f"{source} found, but this version does not fit {name} yet"))
    return plans


def flatten_echoes(gre_series):
    """One entry per magnitude echo of every GRE series: ``(files, echo_times, flip_angles)``.

    This is the flat form :class:`~qmri_workflows.interfaces.r2star.FitR2star` takes; a flip angle
    of 0 marks one the sidecar does not record (a plain MEGRE may omit it).
    """
    files, echo_times, flip_angles = [], [], []
    for series in gre_series:
        files += list(series.magnitude)
        echo_times += list(series.echo_times)
        flip = series.flip_angle if series.flip_angle is not None else 0.0
        flip_angles += [float(flip)] * len(series.magnitude)
    return files, echo_times, flip_angles


def estimate_fit_mem_gb(reference_file, n_volumes):
    """Memory (GB) a voxel-wise fit needs for ``n_volumes`` images on the grid of ``reference_file``.

    The stacked float32 data, the float64 working copies of one chunk and the outputs; measured
    peaks (benchmarks/bench_pipeline.py) stay below this.
    """
    n_voxels = int(np.prod(nib.load(reference_file).shape[:3]))
    stack = n_voxels * n_volumes * 4
    outputs = n_voxels * (n_volumes + 4) * 8
    return round(max(0.5, 1.2 * (stack + outputs) / 1e9 + 0.3), 2)


def init_single_subject_wf(
    *,
    inputs,
    output_dir,
    raw_root,
    r2star_method="wls",
    n_coils=1,
    omp_nthreads=1,
    name=None,
):
    """Build the workflow of one subject (and session).

    Parameters
    ----------
    inputs : qmri_workflows.io.query.SubjectInputs
        What the query layer found for this subject.
    output_dir : str
        Root of the derivatives dataset.
    raw_root : str
        Root of the raw BIDS dataset.
    r2star_method : {"wls", "nls"}
        R2* estimator.
    n_coils : int
        Receive channels combined by root-sum-of-squares in the magnitude images.
    omp_nthreads : int
        Threads a single voxel-wise fitting node may use.
    name : str, optional
        Defaults to ``sub_<label>[_ses_<label>]_wf``.

    Returns
    -------
    workflow : nipype Workflow, or None when no map can be computed
    plans : list of MapPlan
    """
    from nipype.pipeline import engine as pe

    from ..io.staging import staging_directory
    from .outputs import init_ds_r2star_wf
    from .r2star import init_brain_mask_wf, init_r2star_wf

    plans = plan_maps(inputs)
    if not any(plan.run for plan in plans):
        return None, plans
    # Nodes run in their own folders: relative paths would point somewhere else there.
    output_dir, raw_root = Path(output_dir).absolute(), Path(raw_root).absolute()

    label = f"sub_{inputs.subject}" + (f"_ses_{inputs.session}" if inputs.session else "")
    workflow = pe.Workflow(name=name or f"{label}_wf")

    magnitude_files, echo_times, flip_angles = flatten_echoes(inputs.gre)
    first_echoes = [series.magnitude[0] for series in inputs.gre]
    fit_mem_gb = estimate_fit_mem_gb(first_echoes[0], len(magnitude_files))

    brain_mask_wf = init_brain_mask_wf(
        mem_gb=estimate_fit_mem_gb(first_echoes[0], len(first_echoes))
    )
    brain_mask_wf.inputs.inputnode.in_files = first_echoes

    r2star_wf = init_r2star_wf(
        method=r2star_method, n_coils=n_coils, mem_gb=fit_mem_gb, omp_nthreads=omp_nthreads
    )
    r2star_wf.inputs.inputnode.magnitude_files = magnitude_files
    r2star_wf.inputs.inputnode.echo_times = echo_times
    r2star_wf.inputs.inputnode.flip_angles = flip_angles

    # The maps are fitted inside the brain mask only.
    static_metadata = {"SkullStripped": True}
    if inputs.field_strength:
        static_metadata["MagneticFieldStrength"] = inputs.field_strength
    s0_labels = None
    if inputs.gre_suffix == "VFA" and len(inputs.gre) > 1:
        s0_labels = [f"flip{i + 1}" for i in range(len(inputs.gre))]
    # The query layer sorts the series by flip angle, as the fit orders its S0 maps.
    s0_metadata = []
    for series in inputs.gre:
        acquisition = {"EchoTime": list(series.echo_times)}
        if series.flip_angle:
            acquisition["FlipAngle"] = series.flip_angle
        if series.repetition_time:
            acquisition["RepetitionTimeExcitation"] = series.repetition_time
        s0_metadata.append(acquisition)
    ds_r2star_wf = init_ds_r2star_wf(
        output_dir=str(output_dir),
        staging_dir=str(staging_directory(output_dir, inputs.subject, inputs.session)),
        raw_root=str(raw_root),
        subject=inputs.subject,
        session=inputs.session,
        source_files=magnitude_files,
        s0_labels=s0_labels,
        s0_metadata=s0_metadata,
        s0_source_files=[series.magnitude for series in inputs.gre],
        static_metadata=static_metadata,
    )
    workflow.connect([
        (brain_mask_wf, r2star_wf, [("outputnode.mask_file", "inputnode.mask_file")]),
        (brain_mask_wf, ds_r2star_wf, [("outputnode.mask_file", "inputnode.mask_file")]),
        (r2star_wf, ds_r2star_wf, [
            ("outputnode.r2star_file", "inputnode.r2star_file"),
            ("outputnode.t2star_file", "inputnode.t2star_file"),
            ("outputnode.s0_files", "inputnode.s0_files"),
            ("outputnode.metadata", "inputnode.metadata"),
        ]),
    ])  # fmt: skip
    return workflow, plans


def init_qmri_wf(*, subjects, output_dir, raw_root, work_dir=None, r2star_method="wls", n_coils=1,
                 omp_nthreads=1, name="qmri_wf"):
    """Gather the workflows of several subjects into one graph.

    Parameters
    ----------
    subjects : list of qmri_workflows.io.query.SubjectInputs
    output_dir, raw_root : str
        Derivatives root and raw dataset root.
    work_dir : str, optional
        Nipype's working directory.

    Returns
    -------
    workflow : nipype Workflow
    plans : dict
        ``{(subject, session): [MapPlan, ...]}`` for every subject, including those skipped.
    """
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name=name, base_dir=work_dir)
    plans = {}
    for inputs in subjects:
        subject_wf, subject_plans = init_single_subject_wf(
            inputs=inputs,
            output_dir=output_dir,
            raw_root=raw_root,
            r2star_method=r2star_method,
            n_coils=n_coils,
            omp_nthreads=omp_nthreads,
        )
        plans[(inputs.subject, inputs.session)] = subject_plans
        if subject_wf is not None:
            workflow.add_nodes([subject_wf])
    return workflow, plans
