"""The derivatives writer of a subject: one sink per registry output, one commit at the end."""

from __future__ import annotations


def output_field(family_key, field):
    """Name of the derivatives workflow's ``inputnode`` field fed by ``family_key``'s ``field``."""
    return f"{family_key}__{field}"


def init_ds_subject_wf(*, family_outputs, output_dir, staging_dir, static_metadata=None, name="ds_wf"):
    """Write every output of a subject's map families, then publish them together.

    Each :class:`~qmri_workflows.workflows.registry.Output` gets its own sink, named after its
    first source file (subject and session entities) as NiPreps' ``DerivativesDataSink`` does.
    All sinks write into the subject's staging folder; a single commit node moves every file into
    ``output_dir`` once all were written, so a subject's derivatives appear together or not at all.

    Parameters
    ----------
    family_outputs : list of (MapFamily, list of Output)
        The families that run for the subject, with the outputs each writes.
    output_dir : str
        Root of the derivatives dataset.
    staging_dir : str
        The subject's hidden staging folder inside ``output_dir``
        (:func:`qmri_workflows.io.staging.staging_directory`).
    static_metadata : dict, optional
        Sidecar fields of every output known when the graph is built (``MagneticFieldStrength``...);
        an output's own ``metadata`` wins over them, and both win over the run-time ``metadata``.
    name : str
        Workflow name.

    Inputs
    ------
    ``<family key>__<field>`` for each output field, and ``<family key>__metadata`` for each family
    with run-time metadata (see :func:`output_field`).

    Outputs
    -------
    out_files
        Published derivative files (NIfTI and JSON).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from ..interfaces.bids import DerivativesDataSink
    from ..interfaces.utility import CommitDerivatives, MergeMetadata, PickItem

    workflow = pe.Workflow(name=name)
    fields = []
    for family, outputs in family_outputs:
        for output in outputs:
            if output_field(family.key, output.field) not in fields:
                fields.append(output_field(family.key, output.field))
        if family.runtime_metadata:
            fields.append(output_field(family.key, "metadata"))
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")

    sinks = []
    for family, outputs in family_outputs:
        for output in outputs:
            label = f"{family.key}_{output.suffix}" + (f"_{output.desc}" if output.desc else "")
            if output.index is not None:
                label += f"_{output.index}"
            sink = pe.Node(
                DerivativesDataSink(
                    base_directory=str(staging_dir),
                    suffix=output.suffix,
                    source_files=[str(path) for path in output.source_files],
                ),
                name=f"ds_{label}",
                # Writing a file is cheap: a batch plugin should not queue a job for it. A sink
                # must run again whenever its staged file was published by an earlier run.
                run_without_submitting=True,
                overwrite=True,
            )
            if output.desc:
                sink.inputs.desc = output.desc
            if output.datatype:
                sink.inputs.datatype = output.datatype
            static = {**(static_metadata or {}), **output.metadata}
            if family.runtime_metadata:
                merge = pe.Node(MergeMetadata(update=static), name=f"metadata_{label}", run_without_submitting=True)
                workflow.connect(inputnode, output_field(family.key, "metadata"), merge, "base")
                workflow.connect(merge, "out_dict", sink, "metadata")
            else:
                sink.inputs.metadata = static
            source = output_field(family.key, output.field)
            if output.index is None:
                workflow.connect(inputnode, source, sink, "in_file")
            else:
                pick = pe.Node(PickItem(index=output.index), name=f"pick_{label}", run_without_submitting=True)
                workflow.connect([
                    (inputnode, pick, [(source, "inlist")]),
                    (pick, sink, [("out", "in_file")]),
                ])  # fmt: skip
            sinks.append(sink)

    gather = pe.Node(niu.Merge(2 * len(sinks), ravel_inputs=True), name="gather", run_without_submitting=True)
    for position, sink in enumerate(sinks):
        workflow.connect([
            (sink, gather, [("out_file", f"in{2 * position + 1}"), ("out_meta", f"in{2 * position + 2}")]),
        ])  # fmt: skip
    commit = pe.Node(
        CommitDerivatives(staging_dir=str(staging_dir), output_dir=str(output_dir)),
        name="commit",
        run_without_submitting=True,
        overwrite=True,
    )
    workflow.connect([
        (gather, commit, [("out", "in_files")]),
        (commit, outputnode, [("out_files", "out_files")]),
    ])  # fmt: skip
    return workflow
