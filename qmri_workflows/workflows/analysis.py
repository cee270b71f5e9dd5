"""Per-subject analysis family: regional statistics and the lesion table of every quantitative map.

The family names no other family: it reads every registry output flagged ``quantitative``
(:attr:`~qmri_workflows.workflows.registry.MapFamily.consumes_maps`), so R2* and chi today, and R1,
PD or R2 when their families flag their maps, flow in without a change here. The segmentation
(``anat/*_dseg`` + ``_dseg.tsv``), the lesion mask (``anat/*_label-lesion_mask``) and a
gadolinium-enhancement mask (``anat/*_label-enhancing_mask``) come from ``--derivatives``,
resampled onto the map grid (majority of labels); without a segmentation, three tissue classes of
the maps stand in (:func:`qmri_workflows.core.regions.tissue_classes_from_maps`) and the tables say
so.

Outputs (per subject, ``anat``): ``desc-regions_stats.tsv`` and ``desc-lesions_stats.tsv``, each with
its ``.json`` data dictionary.
"""

from __future__ import annotations

__all__ = ["init_analysis_wf", "MAP_FAMILIES"]


def init_analysis_wf(
    *, erosion_mm=0.0, nawm_margin_mm=2.0, rim_mm=1.0, lesion_reference_mm=None, dseg_tsv=None, name="analysis_wf"
):
    """Regional and lesion statistics of the subject's maps.

    Parameters
    ----------
    erosion_mm, nawm_margin_mm, rim_mm : float
        See :class:`~qmri_workflows.interfaces.analysis.SubjectAnalysis`.
    lesion_reference_mm : float, optional
        Reach of each lesion's local NAWM reference (default: the interface's,
        :data:`~qmri_workflows.core.lesions.LOCAL_REFERENCE_MM`).
    dseg_tsv : str, optional
        Label table of the segmentation given with ``--derivatives``.
    name : str

    Inputs
    ------
    map_files, map_names
        Quantitative maps and their names (set by the subject workflow).
    mask_file
        Brain mask.
    dseg_file, lesion_mask_file, enhancing_mask_file
        Segmentation, lesion mask and gadolinium-enhancement mask on the map grid (optional).

    Outputs
    -------
    regions_file, lesions_file, metadata
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from ..interfaces.analysis import SubjectAnalysis

    workflow = pe.Workflow(name=name)
    fields = ["map_files", "map_names", "mask_file", "dseg_file", "lesion_mask_file", "enhancing_mask_file"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["regions_file", "lesions_file", "metadata"]), name="outputnode")
    analysis = pe.Node(
        SubjectAnalysis(erosion_mm=erosion_mm, nawm_margin_mm=nawm_margin_mm, rim_mm=rim_mm), name="analysis"
    )
    if lesion_reference_mm is not None:
        analysis.inputs.lesion_reference_mm = lesion_reference_mm
    if dseg_tsv:
        analysis.inputs.dseg_tsv = str(dseg_tsv)
    workflow.connect([
        (inputnode, analysis, [
            ("map_files", "map_files"),
            ("map_names", "map_names"),
            ("mask_file", "brain_mask_file"),
            ("dseg_file", "dseg_file"),
            ("lesion_mask_file", "lesion_mask_file"),
            ("enhancing_mask_file", "enhancing_mask_file"),
        ]),
        (analysis, outputnode, [
            ("regions_file", "regions_file"),
            ("lesions_file", "lesions_file"),
            ("metadata", "metadata"),
        ]),
    ])  # fmt: skip
    return workflow


def _build(context):
    from ..io.query import DSEG

    options = context.options
    dseg = context.inputs.derivatives.get(DSEG)
    return init_analysis_wf(
        erosion_mm=options["analysis_erosion_mm"],
        nawm_margin_mm=options["nawm_margin_mm"],
        rim_mm=options["lesion_rim_mm"],
        lesion_reference_mm=options["lesion_reference_mm"],
        dseg_tsv=dseg.tsv if dseg is not None else None,
    )


def _describe(inputs):
    from ..io.query import DSEG, ENHANCING_MASK, LESION_MASK

    segmentation = "segmentation from --derivatives" if inputs.derivatives.get(DSEG) else "tissue classes of the maps"
    lesions = ", lesion mask" if inputs.derivatives.get(LESION_MASK) else ""
    lesions += ", gadolinium-enhancement mask" if inputs.derivatives.get(ENHANCING_MASK) else ""
    return f"regional statistics of every map ({segmentation}{lesions})"


def _sources(inputs):
    from .base import map_grid_file

    return (map_grid_file(inputs),)


def _outputs(inputs):
    from .registry import Output

    sources = _sources(inputs)
    descriptions = {
        "regions": "Regional statistics of every quantitative map (concentration and content)",
        "lesions": "Lesion-wise features and stages",
    }
    return [
        Output(field=f"{desc}_file", suffix="stats", desc=desc, source_files=sources, metadata={"Description": text})
        for desc, text in descriptions.items()
    ]


def _millimetres(text):
    import argparse

    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 mm or more, got {text}")
    return value


def _registry_entries():
    from ..io.query import DSEG, ENHANCING_MASK, LESION_MASK
    from .registry import MapFamily, Option

    analysis = MapFamily(
        key="analysis",
        name="regional and lesion statistics",
        depends=("brainmask",),
        consumes={"mask_file": ("brainmask", "mask_file")},
        consumes_maps=True,
        derived_inputs={
            "dseg_file": (DSEG, "majority"),
            "lesion_mask_file": (LESION_MASK, "majority"),
            "enhancing_mask_file": (ENHANCING_MASK, "majority"),
        },
        describe=_describe,
        build=_build,
        outputs=_outputs,
        auxiliary=True,
        options=(
            Option(
                ("--analysis-erosion-mm",),
                "analysis_erosion_mm",
                {
                    "type": _millimetres,
                    "default": 0.0,
                    "metavar": "MM",
                    "help": "margin removed from every region before its statistics, against partial "
                    "volume (default 0: whole regions)",
                },
            ),
            Option(
                ("--nawm-margin-mm",),
                "nawm_margin_mm",
                {
                    "type": _millimetres,
                    "default": 2.0,
                    "metavar": "MM",
                    "help": "perilesional white matter left out of normal-appearing white matter (default 2)",
                },
            ),
            Option(
                ("--lesion-rim-mm",),
                "lesion_rim_mm",
                {
                    "type": _millimetres,
                    "default": 1.0,
                    "metavar": "MM",
                    "help": "width of the lesion rim for the paramagnetic-rim score (default 1; at least one voxel)",
                },
            ),
            Option(
                ("--lesion-reference-mm",),
                "lesion_reference_mm",
                {
                    "type": _millimetres,
                    # core.lesions.LOCAL_REFERENCE_MM, not imported: --help stays free of scipy
                    "default": 6.0,
                    "metavar": "MM",
                    "help": "each lesion is compared with the normal-appearing white matter within this distance "
                    "of its edge (default 6; 0: the whole normal-appearing white matter)",
                },
            ),
        ),
    )
    return (analysis,)


MAP_FAMILIES = _registry_entries()
