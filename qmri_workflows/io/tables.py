"""Tabular BIDS-derivative outputs: a ``.tsv`` with its ``.json`` data dictionary.

BIDS tabular files are tab-separated with a header row; missing values are ``n/a``. The sidecar
describes every column (``Description``, ``Units`` and ``Levels`` where they apply), as BIDS asks
of ``participants.tsv`` and phenotype files.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .derivatives import _atomic_target, bids_path, check_output_root, write_json

__all__ = [
    "write_table",
    "read_table",
    "read_label_table",
    "format_cell",
    "publish_table",
    "ensure_bidsignore",
    "TABLE_PATTERNS",
]

#: Files of the derivatives that BIDS does not name yet: the analysis tables and the group level.
TABLE_PATTERNS = ("*_stats.tsv", "*_stats.json", "group")


def format_cell(value):
    """Text of one TSV cell: ``n/a`` for None/NaN, up to 6 significant digits for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "n/a"
        return f"{float(value):.6g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value)
    if any(c in text for c in "\t\r\n"):
        raise ValueError(f"a TSV cell cannot hold tabs or newlines: {text!r}")
    return text


def write_table(path, rows, columns, dictionary=None):
    """Write ``rows`` as a BIDS TSV (atomically) and, when given, its JSON data dictionary.

    Parameters
    ----------
    path : str or Path
        Target ``.tsv``.
    rows : iterable of dict
        One dict per row; missing keys are written as ``n/a``.
    columns : sequence of str
        Column order.
    dictionary : dict of str -> dict, optional
        Column descriptions (keys: column names); written next to the table as ``.json``. Every
        column must be described.

    Returns
    -------
    Path
        The ``.tsv`` written.
    """
    path = Path(path)
    if path.suffix != ".tsv":
        raise ValueError(f"a table must be written to a .tsv file, got {path}")
    columns = list(columns)
    lines = ["\t".join(columns)]
    for row in rows:
        unknown = set(row) - set(columns)
        if unknown:
            raise ValueError(f"row has columns {sorted(unknown)} that are not in {columns}")
        lines.append("\t".join(format_cell(row.get(column)) for column in columns))
    with _atomic_target(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if dictionary is not None:
        missing = [column for column in columns if column not in dictionary]
        if missing:
            raise ValueError(f"the data dictionary of {path.name} lacks the columns {missing}")
        write_json(path.with_suffix(".json"), {column: dictionary[column] for column in columns})
    return path


def read_table(path):
    """Read a BIDS TSV into a list of dicts (strings; ``n/a`` becomes None).

    Raises
    ------
    ValueError
        If a row has more or fewer cells than the header; the message names the file and line.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty; a BIDS table needs a header row") from None
        rows = []
        for number, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {number}: {len(cells)} cells for {len(header)} columns; "
                    "separate columns with single tabs"
                )
            rows.append({key: (None if value == "n/a" else value) for key, value in zip(header, cells)})
    return rows


def read_label_table(path):
    """``{index: name}`` of a BIDS ``_dseg.tsv``.

    Raises
    ------
    ValueError
        If the table lacks the ``index`` or ``name`` column; the message names the file.
    """
    rows = read_table(path)
    if rows and not {"index", "name"} <= set(rows[0]):
        raise ValueError(f"{path} needs the columns 'index' and 'name' (BIDS dseg look-up table)")
    return {int(row["index"]): row["name"] for row in rows}


def publish_table(out_root, in_file, *, subject, suffix, metadata, session=None, datatype=None, **entities):
    """Put a ``.tsv`` (and its data dictionary, the ``.json`` beside it) into a derivatives dataset.

    Parameters
    ----------
    out_root : str or Path
        Root of the derivatives dataset.
    in_file : str or Path
        The table; a ``.json`` of the same stem, when present, is its data dictionary.
    subject, session, suffix, **entities
        File-name entities (:func:`~qmri_workflows.io.derivatives.bids_path`).
    metadata : dict
        Fields added to the dictionary (``Sources``, ``Description`` ...); column descriptions win.
    datatype : str, optional
        ``anat`` by default.

    Returns
    -------
    Path
        The published table; its sidecar is the same path with ``.json``.
    """
    import shutil

    in_file = Path(in_file)
    if in_file.suffix != ".tsv":
        raise ValueError(f"publish_table takes a .tsv file, got {in_file}")
    root = check_output_root(out_root)
    target = root / bids_path(
        subject=subject, session=session, suffix=suffix, datatype=datatype or "anat", extension=".tsv", **entities
    )
    with _atomic_target(target) as temporary:
        shutil.copyfile(in_file, temporary)
    dictionary = {}
    beside = in_file.with_suffix(".json")
    if beside.is_file():
        import json

        dictionary = json.loads(beside.read_text(encoding="utf-8"))
    write_json(target.with_suffix(".json"), {**dict(metadata or {}), **dictionary})
    return target


def ensure_bidsignore(root, patterns=TABLE_PATTERNS):
    """Add ``patterns`` to ``root/.bidsignore`` (kept lines stay; nothing is duplicated).

    The BIDS validator reports files outside the specification as errors; statistics tables and the
    group folder are not in it yet.
    """
    path = Path(root) / ".bidsignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    missing = [pattern for pattern in patterns if pattern not in lines]
    if missing:
        with _atomic_target(path) as temporary:
            temporary.write_text("\n".join(lines + missing) + "\n", encoding="utf-8")
    return path
