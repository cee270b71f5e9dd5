"""Workflows that write derivatives (NiPreps' ``init_ds_*_wf`` pattern)."""

from __future__ import annotations


def _sink(name, *, staging_dir, raw_root, subject, session, source_files, **fields):
    from nipype.pipeline import engine as pe

    from ..interfaces.bids import DerivativesDataSink

    sink = DerivativesDataSink(
        base_directory=str(staging_dir),
        raw_root=str(raw_root),
        subject=subject,
        source_files=list(source_files),
        **fields,
    )
    if session:
        sink.inputs.session = session
    # Writing a file is cheap; a batch plugin should not queue a job for it, and a sink must
    # run again whenever its staged file was published by an earlier run.
    return pe.Node(sink, name=name, run_without_submitting=True, overwrite=True)


def init_ds_r2star_wf(
    *,
    output_dir,
    staging_dir,
    raw_root,
    subject,
    session=None,
    source_files,
    s0_labels=None,
    s0_metadata,
    s0_source_files,
    static_metadata=None,
    name="ds_r2star_wf",
):
    """Write the R2* workflow's maps and the brain mask, then publish them together.

    Parameters
    ----------
    output_dir : str
        Root of the derivatives dataset.
    staging_dir : str
        Hidden folder inside ``output_dir`` where the files are written first
        (:func:`qmri_workflows.io.staging.staging_directory`).
    raw_root : str
        Root of the raw dataset (for ``Sources`` as BIDS URIs).
    subject, session : str
        Labels without prefixes.
    source_files : list of str
        Raw magnitude files the maps come from.
    s0_labels : list of str, optional
        ``desc`` label of each S0 map (``flip1``, ``flip2``, ... in ascending flip angle; BIDS
        allows no ``flip`` entity on derivative maps); None for a single flip angle.
    s0_metadata : list of dict
        Sidecar fields of each S0 map's own acquisition (``FlipAngle``,
        ``RepetitionTimeExcitation``, ``EchoTime``), in the order of the S0 maps.
    s0_source_files : list of list of str
        Raw magnitude files of each S0 map.
    static_metadata : dict, optional
        Sidecar fields known when the workflow is built (e.g. ``MagneticFieldStrength``).

    Inputs
    ------
    r2star_file, t2star_file, s0_files, mask_file, metadata

    Outputs
    -------
    out_files
        Published derivative files (NIfTI and JSON).
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from ..interfaces.utility import CommitDerivatives, MergeMetadata

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["r2star_file", "t2star_file", "s0_files", "mask_file", "metadata"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files"]), name="outputnode")
    common = dict(
        staging_dir=staging_dir,
        raw_root=raw_root,
        subject=subject,
        session=session,
        source_files=source_files,
    )
    static = pe.Node(niu.IdentityInterface(fields=["metadata"]), name="static")
    static.inputs.metadata = dict(static_metadata or {})
    merge_metadata = pe.Node(MergeMetadata(), name="merge_metadata", run_without_submitting=True)
    merge_s0_metadata = pe.MapNode(
        MergeMetadata(), name="merge_s0_metadata", iterfield=["update"],
        run_without_submitting=True,
    )  # fmt: skip
    merge_s0_metadata.inputs.update = [dict(entry) for entry in s0_metadata]

    ds_r2star = _sink("ds_r2star", suffix="R2starmap", **common)
    ds_t2star = _sink("ds_t2star", suffix="T2starmap", **common)
    ds_mask = _sink("ds_mask", suffix="mask", desc="brain", **common)
    # One S0 map per flip angle, each with its own acquisition's metadata and raw files.
    s0_fields = ["in_file", "metadata", "source_files"] + (["desc"] if s0_labels else [])
    ds_s0 = pe.MapNode(
        _sink("ds_s0", suffix="S0map", **common).interface, name="ds_s0", iterfield=s0_fields,
        run_without_submitting=True, overwrite=True,
    )  # fmt: skip
    ds_s0.inputs.source_files = [list(files) for files in s0_source_files]
    if s0_labels:
        ds_s0.inputs.desc = list(s0_labels)

    gather = pe.Node(niu.Merge(8, ravel_inputs=True), name="gather", run_without_submitting=True)
    commit = pe.Node(
        CommitDerivatives(staging_dir=str(staging_dir), output_dir=str(output_dir)),
        name="commit",
        run_without_submitting=True,
        overwrite=True,
    )
    workflow.connect([
        (inputnode, merge_metadata, [("metadata", "base")]),
        (static, merge_metadata, [("metadata", "update")]),
        (merge_metadata, ds_r2star, [("out_dict", "metadata")]),
        (merge_metadata, ds_t2star, [("out_dict", "metadata")]),
        (merge_metadata, merge_s0_metadata, [("out_dict", "base")]),
        (merge_s0_metadata, ds_s0, [("out_dict", "metadata")]),
        (static, ds_mask, [("metadata", "metadata")]),
        (inputnode, ds_r2star, [("r2star_file", "in_file")]),
        (inputnode, ds_t2star, [("t2star_file", "in_file")]),
        (inputnode, ds_s0, [("s0_files", "in_file")]),
        (inputnode, ds_mask, [("mask_file", "in_file")]),
        (ds_r2star, gather, [("out_file", "in1"), ("out_meta", "in2")]),
        (ds_t2star, gather, [("out_file", "in3"), ("out_meta", "in4")]),
        (ds_s0, gather, [("out_file", "in5"), ("out_meta", "in6")]),
        (ds_mask, gather, [("out_file", "in7"), ("out_meta", "in8")]),
        (gather, commit, [("out", "in_files")]),
        (commit, outputnode, [("out_files", "out_files")]),
    ])  # fmt: skip
    return workflow
