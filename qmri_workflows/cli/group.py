"""Group level: the subjects' tables joined with ``participants.tsv``, summaries and plots.

``qmri-workflows BIDS_DIR OUTPUT_DIR group`` reads every ``sub-*/[ses-*/]anat/*_desc-regions_stats.tsv``
and ``*_desc-lesions_stats.tsv`` that the participant level wrote into OUTPUT_DIR and writes, into
``OUTPUT_DIR/group/``:

* ``group_desc-regions_stats.tsv`` (+ ``.json``): every subject's regional rows with the columns of
  ``participants.tsv`` (``group``, ``age`` ...) in front;
* ``group_desc-regionsummary_stats.tsv`` (+ ``.json``): per participant group, region and map, the
  number of subjects and the mean and SD over subjects of the concentration (regional mean), the
  content and the volume;
* ``group_desc-lesions_stats.tsv`` (+ ``.json``): every subject's lesions with the participant columns;
* ``group_map-<map>_regions.svg`` and ``.png``: per map, concentration and content side by side, one
  point per subject and a bar per participant group and region (patients vs controls).

The participant grouping column is ``group`` when ``participants.tsv`` has it; subjects missing from
``participants.tsv`` are kept with ``n/a``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from ..io.tables import ensure_bidsignore, read_table, write_table

__all__ = ["run_group", "GROUP_FOLDER"]

GROUP_FOLDER = "group"
LOGGER = logging.getLogger("qmri_workflows")
_SUBJECT = re.compile(r"^(sub-[a-zA-Z0-9]+)(?:_(ses-[a-zA-Z0-9]+))?_")
_NUMERIC = ("erosion_mm", "region_volume_mm3", "voxels", "mean", "median", "sd", "volume_mm3", "content")


def _participants(bids_dir):
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return [], {}, {}
    rows = read_table(path)
    dictionary = {}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        dictionary = json.loads(sidecar.read_text(encoding="utf-8"))
    columns = list(rows[0]) if rows else ["participant_id"]
    if "participant_id" not in columns:
        raise ValueError(f"{path} has no participant_id column (BIDS requires it first)")
    return columns, {row["participant_id"]: row for row in rows}, dictionary


def _subject_tables(output_dir, kind, participant_labels=None):
    found = []
    for path in sorted(Path(output_dir).glob(f"sub-*/**/anat/*_desc-{kind}_stats.tsv")):
        match = _SUBJECT.match(path.name)
        if not match:
            continue
        subject, session = match.group(1), match.group(2)
        if participant_labels and subject[4:] not in participant_labels:
            continue
        found.append((subject, session, path))
    return found


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _joined(tables, participant_columns, participants):
    rows, dictionary = [], {}
    table_columns = []
    for subject, session, path in tables:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            dictionary.update(
                {k: v for k, v in json.loads(sidecar.read_text(encoding="utf-8")).items() if isinstance(v, dict)}
            )
        info = participants.get(subject, {})
        for row in read_table(path):
            for column in row:
                if column not in table_columns:
                    table_columns.append(column)
            joined = {column: info.get(column) for column in participant_columns}
            joined["participant_id"] = subject
            joined["session_id"] = session
            joined.update(row)
            rows.append(joined)
    columns = list(participant_columns) + ["session_id"] + table_columns
    return rows, columns, dictionary


def _summary(rows, group_column):
    groups = {}
    for row in rows:
        key = (row.get(group_column) or "n/a", row["region"], row["map"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (group, region, name), members in sorted(groups.items()):
        entry = {"group": group, "region": region, "map": name, "n": len(members)}
        for column, label in (("mean", "concentration"), ("content", "content"), ("volume_mm3", "volume_mm3")):
            values = [_number(member[column]) for member in members]
            values = [v for v in values if math.isfinite(v)]
            mean = sum(values) / len(values) if values else math.nan
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            entry[f"{label}_mean"] = mean
            entry[f"{label}_sd"] = sd
        summary.append(entry)
    return summary


_SUMMARY_DICTIONARY = {
    "group": {"Description": "Participant group (participants.tsv 'group'; n/a when absent)"},
    "region": {"Description": "Region (see group_desc-regions_stats.json)"},
    "map": {"Description": "Quantitative map"},
    "n": {"Description": "Subjects in the group with this region and map"},
    "concentration_mean": {"Description": "Mean over subjects of the regional mean", "Units": "unit of the map"},
    "concentration_sd": {"Description": "SD over subjects of the regional mean", "Units": "unit of the map"},
    "content_mean": {"Description": "Mean over subjects of the regional content", "Units": "unit of the map x mm^3"},
    "content_sd": {"Description": "SD over subjects of the regional content", "Units": "unit of the map x mm^3"},
    "volume_mm3_mean": {"Description": "Mean over subjects of the region's analysed volume", "Units": "mm^3"},
    "volume_mm3_sd": {"Description": "SD over subjects of the region's analysed volume", "Units": "mm^3"},
}


def _plot(rows, group_column, name, folder):
    """Concentration and content per region for one map, one point per subject; SVG and PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    selected = [row for row in rows if row["map"] == name]
    regions = list(dict.fromkeys(row["region"] for row in selected))
    groups = sorted({row.get(group_column) or "n/a" for row in selected})
    width = 0.8 / max(len(groups), 1)
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(regions) + 2), 4.5), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for panel, (column, title) in zip(
        axes, (("mean", "concentration (regional mean)"), ("content", "content (sum x voxel volume)"))
    ):
        for g, group in enumerate(groups):
            offsets = [i - 0.4 + width * (g + 0.5) for i in range(len(regions))]
            values = [
                [
                    _number(row[column])
                    for row in selected
                    if row["region"] == region and (row.get(group_column) or "n/a") == group
                ]
                for region in regions
            ]
            means = [sum(v) / len(v) if v else math.nan for v in values]
            panel.bar(offsets, means, width=width * 0.9, color=colours(g), alpha=0.4, label=group)
            for x, points in zip(offsets, values):
                panel.plot([x] * len(points), points, "o", color=colours(g), markersize=4)
        panel.set_xticks(range(len(regions)))
        panel.set_xticklabels(regions, rotation=45, ha="right")
        panel.set_title(f"{name}: {title}")
        panel.axhline(0, color="grey", linewidth=0.5)
        if column == "content":
            # contents span orders of magnitude (cortex vs a nucleus); chi contents may be negative
            contents = [abs(_number(row["content"])) for row in selected]
            contents = [v for v in contents if math.isfinite(v) and v > 0]
            if contents:
                panel.set_yscale("symlog", linthresh=min(contents) / 2)
    axes[0].legend(title=group_column)
    written = []
    for extension in ("svg", "png"):
        path = folder / f"group_map-{name}_regions.{extension}"
        figure.savefig(path, dpi=100)
        written.append(path)
    plt.close(figure)
    return written


def run_group(bids_dir, output_dir, *, participant_labels=None):
    """Write the group tables and plots (module notes).

    Parameters
    ----------
    bids_dir : str or Path
        The raw dataset (for ``participants.tsv``).
    output_dir : str or Path
        The derivatives the participant level wrote.
    participant_labels : sequence of str, optional
        Only these subjects (labels without ``sub-``).

    Returns
    -------
    list of Path
        Files written.

    Raises
    ------
    FileNotFoundError
        When no subject table exists (the participant level has not run).
    """
    output_dir = Path(output_dir)
    region_tables = _subject_tables(output_dir, "regions", participant_labels)
    if not region_tables:
        raise FileNotFoundError(
            f"no sub-*/anat/*_desc-regions_stats.tsv in {output_dir}: run the participant level first "
            "(qmri-workflows BIDS_DIR OUTPUT_DIR participant)"
        )
    participant_columns, participants, participant_dictionary = _participants(bids_dir)
    if not participant_columns:
        participant_columns = ["participant_id"]
    group_column = "group" if "group" in participant_columns else "participant_id"
    folder = output_dir / GROUP_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    ensure_bidsignore(output_dir)
    written = []

    rows, columns, dictionary = _joined(region_tables, participant_columns, participants)
    base = {
        column: participant_dictionary.get(column, {"Description": f"participants.tsv column {column}"})
        for column in participant_columns
    }
    base["participant_id"] = {"Description": "Subject label"}
    base["session_id"] = {"Description": "Session label (n/a without sessions)"}
    written.append(write_table(folder / "group_desc-regions_stats.tsv", rows, columns, {**dictionary, **base}))
    summary = _summary(rows, group_column)
    written.append(
        write_table(
            folder / "group_desc-regionsummary_stats.tsv", summary, list(_SUMMARY_DICTIONARY), _SUMMARY_DICTIONARY
        )
    )
    lesion_tables = _subject_tables(output_dir, "lesions", participant_labels)
    lesion_rows, lesion_columns, lesion_dictionary = _joined(lesion_tables, participant_columns, participants)
    written.append(
        write_table(folder / "group_desc-lesions_stats.tsv", lesion_rows, lesion_columns, {**lesion_dictionary, **base})
    )
    for name in dict.fromkeys(row["map"] for row in rows):
        written += _plot(rows, group_column, name, folder)
    LOGGER.info("group level: %d subjects, %d files in %s", len(region_tables), len(written), folder)
    return written
