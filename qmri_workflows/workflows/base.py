"""Top-level workflows: one per subject (and session), built from the map registry."""

from __future__ import annotations

from pathlib import Path

from .registry import (
    BuildContext,
    MapPlan,
    has_maps_to_compute,
    plan_families,
    quantitative_outputs,
    registered_families,
    superseded_sources,
)

__all__ = [
    "MapPlan",
    "default_options",
    "echo_counts",
    "estimate_fit_mem_gb",
    "flatten_echoes",
    "init_qmri_wf",
    "init_single_subject_wf",
    "map_grid_file",
]


def echo_counts(gre_series):
    """Number of echoes of the series for a plan line: ``"8"``, or ``"7 to 8"`` when they differ."""
    counts = sorted({len(series.magnitude) for series in gre_series})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"


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
    import nibabel as nib
    import numpy as np

    n_voxels = int(np.prod(nib.load(reference_file).shape[:3]))
    stack = n_voxels * n_volumes * 4
    outputs = n_voxels * (n_volumes + 4) * 8
    return round(max(0.5, 1.2 * (stack + outputs) / 1e9 + 0.3), 2)


def map_grid_file(inputs):
    """The raw image whose grid every map of the subject is computed on.

    The first magnitude echo of the multi-echo GRE (lowest flip angle), or of the bSSFP when the
    subject has no GRE.
    """
    if inputs.gre:
        return inputs.gre[0].magnitude[0]
    if inputs.bssfp:
        return inputs.bssfp[0].magnitude[0]
    raise ValueError(f"sub-{inputs.subject} has no GRE or bSSFP image to define the map grid")


def default_options(families=None):
    """``{dest: default}`` of every option of the registered map families."""
    families = registered_families() if families is None else families
    return {option.dest: option.kwargs.get("default") for family in families for option in family.options}


def init_single_subject_wf(*, inputs, output_dir, options=None, omp_nthreads=1, families=None, name=None):
    """Build the workflow of one subject (and session) from the map registry.

    Every family whose needs the subject's data meet is built (dependencies first) and connected to
    the families it consumes; files given with ``--derivatives`` that a family asks for are
    resampled onto the map grid first; all outputs go to one derivatives writer that publishes
    the subject's files together (:func:`qmri_workflows.workflows.outputs.init_ds_subject_wf`).

    Parameters
    ----------
    inputs : qmri_workflows.io.query.SubjectInputs
        What the query layer found for this subject.
    output_dir : str
        Root of the derivatives dataset.
    options : dict, optional
        Values of the families' options by ``dest`` (``r2star_method``, ``n_coils`` ...); missing
        ones take their defaults (:func:`default_options`).
    omp_nthreads : int
        Threads a single voxel-wise node may use.
    families : list of MapFamily, optional
        In dependency order; every registered family by default.
    name : str, optional
        Defaults to ``sub_<label>[_ses_<label>]_wf``.

    Returns
    -------
    workflow : nipype Workflow, or None when no map can be computed
    plans : list of MapPlan
    """
    from ..io.staging import staging_directory
    from .engine import QMRIWorkflow
    from .outputs import init_ds_subject_wf, output_field

    families = registered_families() if families is None else list(families)
    plans = plan_families(inputs, families, options)
    running = [family for family, plan in zip(families, plans) if plan.run]
    if not has_maps_to_compute(plans):
        return None, plans
    # Nodes run in their own folders: a relative path would point somewhere else there.
    output_dir = Path(output_dir).absolute()
    context = BuildContext(
        inputs=inputs,
        options={**default_options(families), **(options or {})},
        omp_nthreads=omp_nthreads,
        running=frozenset(family.key for family in running),
    )

    label = f"sub_{inputs.subject}" + (f"_ses_{inputs.session}" if inputs.session else "")
    workflow = QMRIWorkflow(name=name or f"{label}_wf")
    _quick_polling(workflow)
    built = {}
    replaced = superseded_sources(running)

    def source(dependency, field, consumer):
        """The workflow and field that give ``field`` of ``dependency`` (refined when superseded)."""
        refiner, refined_field = replaced.get((dependency, field), (None, None))
        if refiner is not None and refiner != consumer and refiner in built:
            return built[refiner], refined_field
        return built[dependency], field

    for family in running:
        family_wf = family.build(context)
        if family_wf.name in {other.name for other in built.values()} or family_wf.name == "ds_wf":
            raise ValueError(
                f"map family {family.key!r} builds a workflow named {family_wf.name!r}, "
                "which another family (or the derivatives writer) already uses"
            )
        workflow.add_nodes([family_wf])
        for field, (dependency, dependency_field) in family.consumes.items():
            if dependency not in built and dependency in family.uses:
                continue  # an optional provider that does not run for this subject
            provider, provider_field = source(dependency, dependency_field, family.key)
            workflow.connect(provider, f"outputnode.{provider_field}", family_wf, f"inputnode.{field}")
        if family.consumes_maps:
            _connect_maps(
                workflow,
                family_wf,
                [other for other in running if other.key in built],
                inputs,
                lambda key, field, consumer=family.key: source(key, field, consumer),
            )
        for field, (collection, interpolation) in family.derived_inputs.items():
            derived = inputs.derivatives.get(collection)
            if derived is None or (family.uses_derived is not None and not family.uses_derived(inputs)):
                continue
            workflow.connect(
                _resample_node(
                    derived.path, map_grid_file(inputs), interpolation, name=f"resample_{family.key}_{field}"
                ),
                "out_file",
                family_wf,
                f"inputnode.{field}",
            )
        built[family.key] = family_wf

    static_metadata = {}
    if inputs.field_strength:
        static_metadata["MagneticFieldStrength"] = inputs.field_strength
    family_outputs = [
        (
            family,
            _with_options(
                family.outputs(inputs, context.options) if family.outputs_options else family.outputs(inputs),
                family,
                context.options,
            ),
        )
        for family in running
    ]
    ds_wf = init_ds_subject_wf(
        family_outputs=family_outputs,
        output_dir=str(output_dir),
        staging_dir=str(staging_directory(output_dir, inputs.subject, inputs.session)),
        static_metadata=static_metadata,
    )
    for family, outputs in family_outputs:
        fields = dict.fromkeys(output.field for output in outputs)
        if family.runtime_metadata:
            fields["metadata"] = None
        for field in fields:
            provider, provider_field = source(family.key, field, None)
            workflow.connect(
                provider, f"outputnode.{provider_field}", ds_wf, f"inputnode.{output_field(family.key, field)}"
            )
    return workflow, plans


def _connect_maps(workflow, family_wf, producers, inputs, source):
    """Feed every quantitative output of ``producers`` to ``family_wf``'s ``map_files`` / ``map_names``.

    ``source(family key, field) -> (workflow, field)`` gives where each output comes from (the
    refining family's field when one supersedes it).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    sources = [(family, output) for family in producers for output in quantitative_outputs(family, inputs)]
    merge = pe.Node(niu.Merge(len(sources)), name=f"maps_for_{family_wf.name}", run_without_submitting=True)
    for position, (family, output) in enumerate(sources, start=1):
        producer_wf, field = source(family.key, output.field)
        workflow.connect(producer_wf, f"outputnode.{field}", merge, f"in{position}")
    workflow.connect(merge, "out", family_wf, "inputnode.map_files")
    family_wf.inputs.inputnode.map_names = [output.map_name for _, output in sources]


POLL_SECONDS = 0.1
"""Pause of Nipype's scheduler between passes over the graph, for these workflows.

Each pass starts only the nodes whose inputs were ready when it began, so a chain of quick nodes
(identity, sink, commit) costs one pause per link: Nipype's default of 2 s made a small subject
take tens of seconds. A batch plugin queries its scheduler at every pass, so the pause is not
made shorter still; the BIDS App chooses per plugin.
"""


def _quick_polling(workflow):
    workflow.config["execution"]["poll_sleep_duration"] = POLL_SECONDS


def _with_options(outputs, family, options):
    """Record the family's option values in its sidecars, so two runs can be told apart."""
    import dataclasses

    if not family.options:
        return outputs
    parameters = {option.dest: options[option.dest] for option in family.options}
    return [
        dataclasses.replace(output, metadata={"EstimationParameters": parameters, **output.metadata})
        for output in outputs
    ]


def _resample_node(in_file, reference_file, interpolation, *, name):
    from nipype.pipeline import engine as pe

    from ..interfaces.resample import ResampleToReference

    return pe.Node(
        ResampleToReference(in_file=str(in_file), reference_file=str(reference_file), kind=interpolation), name=name
    )


def init_qmri_wf(*, subjects, output_dir, work_dir=None, options=None, omp_nthreads=1, name="qmri_wf"):
    """Gather the workflows of several subjects into one graph.

    Parameters
    ----------
    subjects : list of qmri_workflows.io.query.SubjectInputs
    output_dir : str
        Derivatives root.
    work_dir : str, optional
        Nipype's working directory.
    options : dict, optional
        Options of the map families (see :func:`init_single_subject_wf`).
    omp_nthreads : int
        Threads a single voxel-wise node may use.

    Returns
    -------
    workflow : nipype Workflow
    plans : dict
        ``{(subject, session): [MapPlan, ...]}`` for every subject, including those skipped.
    """
    from .engine import QMRIWorkflow

    families = registered_families()
    workflow = QMRIWorkflow(name=name, base_dir=work_dir)
    _quick_polling(workflow)
    plans = {}
    for inputs in subjects:
        subject_wf, subject_plans = init_single_subject_wf(
            inputs=inputs,
            output_dir=output_dir,
            options=options,
            omp_nthreads=omp_nthreads,
            families=families,
        )
        plans[(inputs.subject, inputs.session)] = subject_plans
        if subject_wf is not None:
            workflow.add_nodes([subject_wf])
    return workflow, plans
