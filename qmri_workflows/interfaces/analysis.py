"""Nipype interface of the per-subject analysis: regional statistics and the lesion table.

Both tables are written as BIDS tabular files (``.tsv`` + ``.json`` data dictionary) in the node's
folder; the derivatives sink publishes them (:func:`qmri_workflows.io.tables.publish_table`).
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.lesions import LOCAL_REFERENCE_MM, RELATIVE_CONTRAST_MAPS, analyse_lesions
from ..core.regions import analysis_regions, regional_statistics, regions_from_label_names
from ..io.images import load_volume, read_image
from ..io.tables import read_label_table, write_table

__all__ = ["SubjectAnalysis", "REGION_COLUMNS", "region_dictionary", "lesion_dictionary", "read_label_table"]

REGION_COLUMNS = (
    "region",
    "map",
    "erosion_mm",
    "region_volume_mm3",
    "voxels",
    "mean",
    "median",
    "sd",
    "volume_mm3",
    "content",
)

_REGION_DESCRIPTIONS = {
    "region": {
        "Description": "Region of the package (qmri_workflows.core.regions): csf, cortex, white_matter, "
        "caudate, putamen, pallidum, thalamus, lesion, deep_grey (the four nuclei), nawm (white matter minus "
        "lesions and a perilesional margin); without a segmentation csf, grey_matter, white_matter"
    },
    "map": {"Description": "Quantitative map (BIDS suffix, with desc when it has one)"},
    "erosion_mm": {"Description": "Margin removed from the region before the statistics", "Units": "mm"},
    "region_volume_mm3": {"Description": "Volume of the whole region (before erosion)", "Units": "mm^3"},
    "voxels": {"Description": "Voxels with a finite value used for the statistics"},
    "mean": {"Description": "Mean of the map over the voxels (concentration)", "Units": "unit of the map"},
    "median": {"Description": "Median of the map over the voxels", "Units": "unit of the map"},
    "sd": {"Description": "Standard deviation (ddof = 1)", "Units": "unit of the map"},
    "volume_mm3": {"Description": "voxels x voxel volume", "Units": "mm^3"},
    "content": {
        "Description": "Sum of the map's values x voxel volume = mean x volume_mm3 (content, e.g. the R2* mass)",
        "Units": "unit of the map x mm^3",
    },
}


def region_dictionary():
    """Data dictionary of the regional table."""
    return {column: _REGION_DESCRIPTIONS[column] for column in REGION_COLUMNS}


_LESION_FIXED = {
    "lesion": {"Description": "Lesion number (connected lesion voxels, 6-connectivity, largest first)"},
    "voxels": {"Description": "Voxels of the lesion"},
    "volume_mm3": {"Description": "Volume of the lesion", "Units": "mm^3"},
    "centre_i": {"Description": "Centre of the lesion, first voxel index of the map grid"},
    "centre_j": {"Description": "Centre of the lesion, second voxel index"},
    "centre_k": {"Description": "Centre of the lesion, third voxel index"},
    "core_voxels": {"Description": "Voxels of the core (lesion minus rim; 0 when too small for core and rim)"},
    "rim_voxels": {"Description": "Voxels of the rim (lesion voxels within the rim width of its edge)"},
    "reference_voxels": {
        "Description": "Voxels of the lesion's reference: the NAWM within the reference reach of its edge "
        "(LesionReferenceMillimetres), or the whole NAWM when that holds fewer than 20 voxels"
    },
    "cortex_share": {"Description": "Share of cortex in the tissue around the lesion (CSF left out)"},
    "enhancing": {"Description": "Whether the lesion overlaps the gadolinium-enhancement mask (n/a: none given)"},
    "stage": {
        "Description": "Stage after Table 1 of the review (qmri_workflows.core.lesions)",
        "Levels": {
            "early active": "no susceptibility rise yet",
            "late active": "strong susceptibility rise",
            "chronic active": "paramagnetic rim (chi and R2* both rise at the edge, one significantly)",
            "chronic inactive": "moderate susceptibility rise, no rim, or not enhancing",
            "cortical": "in the cortex",
            "white matter lesion (stage undetermined)": "needs chi (QSM) or a gadolinium mask",
        },
    },
    "evidence": {"Description": "Features that led to the stage"},
}
_LESION_PER_MAP = {
    "mean": "Mean of {map} in the lesion",
    "core": "Mean of {map} in the core",
    "rim_mean": "Mean of {map} in the rim",
    "nawm": "Median of {map} in the lesion's reference NAWM (see reference_voxels)",
    "contrast": "Lesion mean minus NAWM median of {map}",
    "contrast_error": "Standard error of the contrast of {map} (robust SD of the reference NAWM, numbers of voxels)",
    "relative_contrast": "(lesion mean - NAWM median) / NAWM median of {map}",
    "rim_score": "Rim median minus the larger of core median and NAWM median of {map} (> 0: paramagnetic rim)",
    "rim": "Whether the rim score of {map} exceeds twice its standard error",
}


def lesion_dictionary(columns):
    """Data dictionary of a lesion table with ``columns``."""
    dictionary = {}
    for column in columns:
        if column in _LESION_FIXED:
            dictionary[column] = _LESION_FIXED[column]
            continue
        for key in sorted(_LESION_PER_MAP, key=len, reverse=True):
            if column.endswith("_" + key):
                name = column[: -len(key) - 1]
                entry = {"Description": _LESION_PER_MAP[key].format(map=name)}
                if key not in ("rim", "relative_contrast"):
                    entry["Units"] = f"unit of {name}"
                dictionary[column] = entry
                break
        else:
            raise ValueError(f"no description for lesion column {column!r}")
    return dictionary


class _SubjectAnalysisInputSpec(BaseInterfaceInputSpec):
    map_files = InputMultiObject(File(exists=True), mandatory=True, desc="quantitative maps, one grid")
    map_names = traits.List(Str, mandatory=True, desc="name of each map (BIDS suffix)")
    brain_mask_file = File(exists=True, desc="brain mask on the map grid")
    dseg_file = File(exists=True, desc="segmentation resampled onto the map grid")
    dseg_tsv = File(exists=True, desc="label table of the segmentation (index, name)")
    lesion_mask_file = File(exists=True, desc="lesion mask resampled onto the map grid")
    enhancing_mask_file = File(exists=True, desc="gadolinium-enhancement mask on the map grid")
    erosion_mm = traits.Float(0.0, usedefault=True, desc="margin removed from each region (mm)")
    nawm_margin_mm = traits.Float(2.0, usedefault=True, desc="perilesional margin left out of NAWM (mm)")
    rim_mm = traits.Float(1.0, usedefault=True, desc="lesion rim width (mm)")
    lesion_reference_mm = traits.Float(
        LOCAL_REFERENCE_MM,
        usedefault=True,
        desc="reach (mm from a lesion's edge) of the NAWM that is its reference; 0: the whole NAWM",
    )


class _SubjectAnalysisOutputSpec(TraitedSpec):
    regions_file = File(exists=True, desc="regional statistics (.tsv, dictionary beside it)")
    lesions_file = File(exists=True, desc="lesion table (.tsv, dictionary beside it)")
    metadata = traits.Dict(desc="sidecar fields: segmentation used, options")


class SubjectAnalysis(SimpleInterface):
    """Regional statistics of every map and the lesion table of one subject.

    Regions come from the segmentation when given (label names mapped by
    :func:`~qmri_workflows.core.regions.regions_from_label_names`), else from three tissue classes
    of the maps inside the brain mask. The lesion table is written when a lesion mask (or lesion
    labels in the segmentation) exists; it is empty (header only) otherwise.
    """

    input_spec = _SubjectAnalysisInputSpec
    output_spec = _SubjectAnalysisOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        if len(inputs.map_files) != len(inputs.map_names):
            raise ValueError(f"{len(inputs.map_files)} map files for {len(inputs.map_names)} map names")
        reference = read_image(inputs.map_files[0])
        voxel_size = tuple(float(v) for v in np.linalg.norm(reference.affine[:3, :3], axis=0))
        maps = {
            name: load_volume(path, dtype=np.float64, reference=reference)
            for name, path in zip(inputs.map_names, inputs.map_files)
        }
        brain = None
        if isdefined(inputs.brain_mask_file):
            brain = load_volume(inputs.brain_mask_file, reference=reference) > 0
        lesion = None
        if isdefined(inputs.lesion_mask_file):
            lesion = load_volume(inputs.lesion_mask_file, reference=reference) > 0
        metadata = {
            "ErosionMillimetres": inputs.erosion_mm,
            "NAWMMarginMillimetres": inputs.nawm_margin_mm,
            "LesionRimMillimetres": inputs.rim_mm,
            "LesionReferenceMillimetres": inputs.lesion_reference_mm,
            "Maps": list(inputs.map_names),
        }
        labels = regions = None
        if isdefined(inputs.dseg_file):
            if not isdefined(inputs.dseg_tsv):
                raise ValueError(f"the segmentation {inputs.dseg_file} needs its label table (_dseg.tsv)")
            labels = np.rint(load_volume(inputs.dseg_file, reference=reference)).astype(np.int32)
            regions, unmapped = regions_from_label_names(read_label_table(inputs.dseg_tsv))
            if not regions:
                raise ValueError(
                    f"none of the label names of {inputs.dseg_tsv} is a region the analysis knows "
                    f"(found {sorted(unmapped.values())[:5]}...); name them as FreeSurfer does "
                    "(Left-Thalamus, Left-Cerebral-White-Matter ...; docs: qmri_workflows.core.regions)"
                )
            metadata["Segmentation"] = f"labels of {os.path.basename(inputs.dseg_file)} (resampled onto the map grid)"
            metadata["LabelsNotInRegions"] = {str(k): v for k, v in unmapped.items()}
        masks, lesion, tissue_map = analysis_regions(
            maps,
            voxel_size,
            brain_mask=brain,
            labels=labels,
            regions=regions,
            lesion_mask=lesion,
            nawm_margin_mm=inputs.nawm_margin_mm,
        )
        if tissue_map is not None:
            metadata["Segmentation"] = (
                f"none given: three tissue classes of {tissue_map} in the brain mask (k-means); no deep grey nuclei"
            )
        white_matter = masks.get("white_matter")

        rows = regional_statistics(maps, masks, voxel_size, erosion_mm=inputs.erosion_mm)
        regions_file = os.path.join(runtime.cwd, "regions.tsv")
        write_table(regions_file, rows, REGION_COLUMNS, region_dictionary())

        lesion_rows = []
        if lesion is not None and lesion.any() and masks.get("nawm") is not None and masks["nawm"].any():
            enhancing = None
            if isdefined(inputs.enhancing_mask_file):
                enhancing = load_volume(inputs.enhancing_mask_file, reference=reference) > 0
            _, lesion_rows = analyse_lesions(
                maps,
                lesion,
                masks["nawm"],
                voxel_size,
                cortex=masks.get("cortex"),
                white_matter=white_matter,
                enhancing=enhancing,
                rim_mm=inputs.rim_mm,
                reference_mm=inputs.lesion_reference_mm,
            )
        columns = list(_LESION_FIXED)[:-2]
        for name in maps:
            columns += [f"{name}_{key}" for key in ("mean", "core", "rim_mean", "nawm", "contrast", "contrast_error")]
            if name in RELATIVE_CONTRAST_MAPS:
                columns.append(f"{name}_relative_contrast")
            if any(f"{name}_rim" in row for row in lesion_rows):
                columns += [f"{name}_rim_score", f"{name}_rim"]
        columns += ["stage", "evidence"]
        lesions_file = os.path.join(runtime.cwd, "lesions.tsv")
        write_table(lesions_file, lesion_rows, columns, lesion_dictionary(columns))
        metadata["LesionCount"] = len(lesion_rows)
        metadata["EnhancementMask"] = isdefined(inputs.enhancing_mask_file)
        metadata["LesionMask"] = (
            "none"
            if lesion is None
            else ("from the lesion mask" if isdefined(inputs.lesion_mask_file) else "lesion labels of the segmentation")
        )
        self._results.update(regions_file=regions_file, lesions_file=lesions_file, metadata=metadata)
        return runtime
