"""Group level: the subject tables joined with participants.tsv, summaries and plots."""

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from qmri_workflows.cli import run
from qmri_workflows.io.tables import read_table

pytest.importorskip("nilearn")

EXAMPLE = Path(__file__).resolve().parents[2] / "bids_example"


@pytest.fixture(scope="module", params=["phantom", "shipped example"])
def group_outputs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    if request.param == "phantom":
        raw, out, _ = request.getfixturevalue("phantom_participant_outputs")
    else:
        raw, out = EXAMPLE, root / "out"
        arguments = ["--derivatives", str(EXAMPLE / "derivatives" / "phantom"), "-w", str(root / "work")]
        assert run.main([str(raw), str(out), "participant", "--skip-bids-validation", *arguments]) == 0
    assert run.main([str(raw), str(out), "group"]) == 0
    return raw, out


def test_group_tables_match_the_participant_tables(group_outputs):
    raw, out = group_outputs
    participants = {row["participant_id"]: row for row in read_table(raw / "participants.tsv")}
    assert {row["group"] for row in participants.values()} == {"patient", "control"}
    group = read_table(out / "group" / "group_desc-regions_stats.tsv")
    for subject, info in participants.items():
        subject_rows = read_table(out / subject / "anat" / f"{subject}_desc-regions_stats.tsv")
        joined = [row for row in group if row["participant_id"] == subject]
        assert len(joined) == len(subject_rows) > 0
        for mine, theirs in zip(joined, subject_rows):
            assert mine["group"] == info["group"] and mine["age"] == info["age"]
            assert {key: mine[key] for key in theirs} == theirs
    # one subject per group: the summary's means are that subject's numbers, SD n/a
    summary = read_table(out / "group" / "group_desc-regionsummary_stats.tsv")
    by_key = {(row["group"], row["region"], row["map"]): row for row in summary}
    for row in group:
        entry = by_key[(row["group"], row["region"], row["map"])]
        assert entry["n"] == "1" and entry["concentration_sd"] is None
        if row["mean"] is not None:
            assert float(entry["concentration_mean"]) == pytest.approx(float(row["mean"]), rel=1e-5)
            assert float(entry["content_mean"]) == pytest.approx(float(row["content"]), rel=1e-5)
    dictionary = json.loads((out / "group" / "group_desc-regions_stats.json").read_text())
    assert dictionary["group"]["Levels"]["patient"] and dictionary["content"]["Units"]
    lesions = read_table(out / "group" / "group_desc-lesions_stats.tsv")
    assert lesions and {row["group"] for row in lesions} == {"patient"}
    # tables and the group folder are not in the BIDS specification yet: .bidsignore lists them
    errors = run.run_validator(out)
    if errors is not None:
        assert errors == []


def test_group_plots_per_map(group_outputs):
    _, out = group_outputs
    for name in ("R2starmap", "Chimap"):
        svg = out / "group" / f"group_map-{name}_regions.svg"
        root = ElementTree.parse(svg).getroot()
        assert root.tag.endswith("svg")
        text = svg.read_text()
        assert "concentration" in text and "content" in text and "patient" in text
        assert (out / "group" / f"group_map-{name}_regions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_before_participant_says_what_to_do(tmp_path, caplog):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    assert run.main([str(raw), str(tmp_path / "out"), "group"]) == run.EXIT_NO_INPUT
    assert "run the participant level first" in caplog.text
