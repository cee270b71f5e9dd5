"""BIDS tables: TSV with a data dictionary, publication into a derivatives dataset, .bidsignore."""

import json
import math

import numpy as np
import pytest

from qmri_workflows.io.tables import ensure_bidsignore, publish_table, read_table, write_table


def test_round_trip_with_missing_values_and_dictionary(tmp_path):
    rows = [{"a": 1, "b": 0.123456789, "c": "x"}, {"a": np.int64(2), "b": math.nan, "c": None}, {"a": True}]
    path = write_table(tmp_path / "t.tsv", rows, ["a", "b", "c"], {k: {"Description": k} for k in "abc"})
    assert path.read_text() == "a\tb\tc\n1\t0.123457\tx\n2\tn/a\tn/a\ntrue\tn/a\tn/a\n"
    assert read_table(path)[1] == {"a": "2", "b": None, "c": None}
    assert json.loads((tmp_path / "t.json").read_text())["b"] == {"Description": "b"}
    with pytest.raises(ValueError, match="lacks the columns"):
        write_table(tmp_path / "u.tsv", rows, ["a", "b", "c"], {"a": {}})
    with pytest.raises(ValueError, match="not in"):
        write_table(tmp_path / "u.tsv", [{"z": 1}], ["a"])
    with pytest.raises(ValueError, match="tabs or newlines"):
        write_table(tmp_path / "u.tsv", [{"a": "x\ty"}], ["a"])
    (tmp_path / "bad.tsv").write_text("a\tb\n1\n")
    with pytest.raises(ValueError, match="bad.tsv, line 2: 1 cells for 2 columns"):
        read_table(tmp_path / "bad.tsv")


def test_publish_table_merges_dictionary_and_metadata(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}')
    source = write_table(tmp_path / "regions.tsv", [{"m": 1.5}], ["m"], {"m": {"Description": "mean"}})
    target = publish_table(out, source, subject="01", suffix="stats", desc="regions", metadata={"Sources": ["s"]})
    assert target == out / "sub-01" / "anat" / "sub-01_desc-regions_stats.tsv"
    assert target.read_text() == source.read_text()
    assert json.loads(target.with_suffix(".json").read_text()) == {"Sources": ["s"], "m": {"Description": "mean"}}


def test_bidsignore_keeps_lines_and_adds_once(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra/\n")
    ensure_bidsignore(tmp_path)
    ensure_bidsignore(tmp_path)
    assert (tmp_path / ".bidsignore").read_text().splitlines() == ["extra/", "*_stats.tsv", "*_stats.json", "group"]
