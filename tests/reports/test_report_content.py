"""The visual report without a browser: the page's HTML, its figures, a failed subject's page."""

import json
import struct
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.io.tables import read_table
from qmri_workflows.reports import figures
from qmri_workflows.reports.subject import REPORT_PATTERNS, crash_messages
from tests.report_dataset import FAILING_MESSAGE, FAILING_STEP


class _Page(HTMLParser):
    """Images, headings, tables (rows of cell texts) and the whole text of a page."""

    def __init__(self, text):
        super().__init__()
        self.images, self.headings, self.tables, self.text = [], [], [], []
        self._heading = None
        self._row = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag in ("h2", "h3", "h4"):
            self._heading = []
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "script":
            raise AssertionError("the page holds a <script> element")

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        for part in (self._heading, self._cell):
            if part is not None:
                part.append(data)


def _page(path):
    return _Page(Path(path).read_text(encoding="utf-8"))


def _png_size(path):
    header = Path(path).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def _quantitative_maps(out, subject):
    rows = read_table(out / subject / "anat" / f"{subject}_desc-regions_stats.tsv")
    return list(dict.fromkeys(row["map"] for row in rows))


def test_published_page_shows_every_map_with_its_figures(example_with_failure):
    out = example_with_failure
    page = _page(out / "sub-01.html")
    maps = _quantitative_maps(out, "sub-01")
    assert set(maps) == {"R2starmap", "R1map", "PDmap", "Chimap", "R2map"}
    sources = [image["src"] for image in page.images]
    for source in sources:
        assert not source.startswith(("/", "http")), source
        width, height = _png_size(out / source)
        assert width > 100 and height > 50
    for name in maps:
        units = json.loads((out / "sub-01" / "anat" / f"sub-01_{name}.json").read_text())["Units"]
        assert f"{name} ({units})" in page.headings
        assert f"sub-01/figures/sub-01_map-{name}_mosaic.png" in sources
        assert f"sub-01/figures/sub-01_map-{name}_histogram.png" in sources
    assert "sub-01/figures/sub-01_desc-masks_overlay.png" in sources
    assert "sub-01/figures/sub-01_desc-regions_overlay.png" in sources
    # every figure of the folder is on the page, and nothing else is in it
    assert sorted(p.relative_to(out).as_posix() for p in (out / "sub-01" / "figures").iterdir()) == sorted(sources)


def test_published_page_tables_plan_and_provenance(example_with_failure):
    out = example_with_failure
    page = _page(out / "sub-01.html")
    text = " ".join(page.text)
    regions = read_table(out / "sub-01" / "anat" / "sub-01_desc-regions_stats.tsv")
    lesions = read_table(out / "sub-01" / "anat" / "sub-01_desc-lesions_stats.tsv")
    tables = {tuple(table[0]): table[1:] for table in page.tables if table}
    region_table = tables[tuple(regions[0])]
    assert [row[:2] for row in region_table] == [[row["region"], row["map"]] for row in regions]
    assert [cells[5] for cells in region_table] == [row["mean"] or "n/a" for row in regions]
    lesion_table = tables[tuple(lesions[0])]
    assert len(lesions) > 0 and len(lesion_table) == len(lesions)
    assert [cells[-2] for cells in lesion_table] == [row["stage"] for row in lesions]
    plan = tables[("map", "computed", "from (or why not)", "outcome")]
    assert {row[0]: row[3] for row in plan}["R2*"] == "published"
    assert {row[0] for row in plan} >= {"brain mask", "R2*", "R1", "PD", "QSM", "R2", "report probe"}
    versions = {row[0]: row[1] for row in tables[("software", "version")]}
    for package in ("numpy", "nipype", "dipy", "matplotlib"):
        assert versions[package] == metadata.version(package)
    assert "--derivatives" in text and "sub-01/anat/sub-01_echo-1_flip-1_part-mag_VFA.nii.gz" in text


def test_failed_subject_page_says_what_failed(example_with_failure):
    out = example_with_failure
    assert not (out / "sub-02").exists(), "a failed subject publishes nothing, figures included"
    raw = (out / "sub-02.html").read_text(encoding="utf-8")
    page = _Page(raw)  # raises on a <script> element: the error's markup must arrive as text
    text = " ".join(page.text)
    assert "FAILED" in text and FAILING_STEP in text
    assert FAILING_MESSAGE in text, "the step's error is shown, as text"
    assert "<b>not bold</b>" not in raw
    plan = {tuple(table[0]): table[1:] for table in page.tables if table}[
        ("map", "computed", "from (or why not)", "outcome")
    ]
    outcomes = {row[0]: row[3] for row in plan}
    assert outcomes["report probe"] == "FAILED" and outcomes["R2*"] == "not published"


def test_failed_subject_page_shows_the_maps_that_finished_as_not_published(example_with_failure):
    """Issue 12: "written even when a step failed": the maps whose steps finished before the failure
    are on the page, read from the work directory, under a heading that says they are not published,
    their figures embedded (the output has no folder of the failed subject)."""
    import base64

    out = example_with_failure
    unpublished = out.parent / "work" / "unpublished" / "sub-02"
    anat = unpublished / "sub-02" / "anat"
    assert (anat / "sub-02_R2starmap.nii.gz").is_file() and (anat / "sub-02_R1map.nii.gz").is_file()
    assert not list(unpublished.rglob("*desc-probe*")), "the failed step's output cannot have been written"
    assert not (out / ".qmri-staging").exists()

    page = _page(out / "sub-02.html")
    text = " ".join(page.text)
    assert "Maps that finished before the failure: NOT PUBLISHED" in page.headings
    assert "in the output dataset" in text and str(unpublished) in text
    for name in ("R2starmap", "R1map", "PDmap", "Chimap", "R2map"):
        units = json.loads((anat / f"sub-02_{name}.json").read_text())["Units"]
        assert f"{name} ({units})" in page.headings
        assert f"{name} ({units}): axial slices" in [image["alt"] for image in page.images]
    assert len(page.images) > 10
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix), image["src"][:60]
        png = base64.b64decode(image["src"][len(prefix) :])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width > 100 and height > 50
    # the subject's own tables, computed before the failure, are there too
    assert "Regional statistics" in page.headings


def test_a_later_successful_run_drops_the_unpublished_maps(tmp_path):
    """What a failed run kept in the work directory goes when the subject succeeds."""
    from qmri_workflows.cli.run import _keep_unpublished
    from qmri_workflows.io.staging import staging_directory, unpublished_directory

    class Inputs:
        subject, session = "01", None

    staged = staging_directory(tmp_path / "out", "01") / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"map")
    _keep_unpublished(tmp_path / "out", tmp_path / "work", [Inputs()], {"sub-01": ["r1_wf.fit_r1"]})
    kept = unpublished_directory(tmp_path / "work", "01")
    assert (kept / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").read_bytes() == b"map"
    assert not (tmp_path / "out" / ".qmri-staging").exists()
    _keep_unpublished(tmp_path / "out", tmp_path / "work", [Inputs()], {})
    assert not kept.exists()


def test_output_with_reports_is_still_valid_bids(example_with_failure):
    out = example_with_failure
    assert set(REPORT_PATTERNS) <= set((out / ".bidsignore").read_text().splitlines())
    errors = run.run_validator(out)
    if errors is None:
        pytest.skip("bids-validator-deno is not installed")
    assert errors == []


def test_signed_maps_get_a_symmetric_diverging_window():
    rng = np.random.default_rng(0)
    values = rng.normal(0.01, 0.02, size=(10, 10, 10))
    mask = np.zeros(values.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    values[~mask] = 100.0  # outside the mask: must not move the window
    window = figures.robust_window(values, mask)
    low, high = np.percentile(values[mask], figures.WINDOW_PERCENTILES)
    assert window.colormap == "RdBu_r" and window.high == pytest.approx(max(-low, high)) == -window.low
    positive = figures.robust_window(np.abs(values) + 1, mask)
    assert positive.colormap == "gray"
    assert positive.low == pytest.approx(np.percentile(np.abs(values[mask]) + 1, 2))
    assert figures.robust_window(np.full(values.shape, np.nan), mask) is None


def test_slices_lie_in_the_mask_and_volumes_turn_to_ras():
    mask = np.zeros((6, 7, 20), bool)
    mask[:, :, 5:15] = True
    slices = figures.mosaic_slices(mask)
    assert len(slices) == figures.SLICES and all(5 <= k < 15 for k in slices)
    data = np.arange(6 * 7 * 20, dtype=float).reshape(6, 7, 20)
    # a left-posterior-inferior volume with axes stored (y, x, z) and 1 x 2 x 3 mm voxels
    affine = np.array([[0, -2.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    import nibabel as nib

    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    ras, voxel_size = figures.to_ras(data, affine)
    np.testing.assert_array_equal(ras, canonical.get_fdata())
    assert voxel_size == pytest.approx(canonical.header.get_zooms())
    tiled = figures.montage(ras, [0, 1])
    assert tiled.shape == (ras.shape[1], 2 * ras.shape[0] + 1) and np.isnan(tiled[:, ras.shape[0]]).all()


def test_crash_files_give_the_failed_step_and_its_error(tmp_path):
    crash = tmp_path / "crash-20260101-000000-me-fit-1.txt"
    crash.write_text(
        "Node: qmri_wf.sub_07_ses_b_wf.r2star_wf.fit\nWorking directory: /w\n\nNode inputs:\n\nx = 1\n"
        "Traceback (most recent call last):\n  File 'a.py', line 1\nValueError: the fit failed\n"
    )
    (tmp_path / "notes.txt").write_text("Node: qmri_wf.sub_01_wf.x\n")
    assert crash_messages(tmp_path) == {("sub-07 ses-b", "r2star_wf.fit"): ("ValueError: the fit failed", str(crash))}
    assert crash_messages(tmp_path, since=crash.stat().st_mtime + 10) == {}


def test_sessions_are_sections_of_one_page(tmp_path, caplog):
    from tests.bids_factory import make_megre_dataset

    raw = make_megre_dataset(tmp_path / "raw", sessions=("a", "b"), n_echoes=4)
    out = tmp_path / "out"
    command = [str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "work")]
    assert run.main([*command, "--skip-bids-validation"]) == 0
    assert "could not be" not in caplog.text, "a figure or the page failed"
    assert sorted(p.name for p in out.glob("sub-*.html")) == ["sub-01.html"]
    page = _page(out / "sub-01.html")
    assert {"sub-01 ses-a", "sub-01 ses-b"} <= set(page.headings)
    sources = {image["src"] for image in page.images}
    for session in ("a", "b"):
        assert f"sub-01/figures/sub-01_ses-{session}_map-R2starmap_mosaic.png" in sources
        assert f"sub-01/figures/sub-01_ses-{session}_desc-masks_overlay.png" in sources
    assert all((out / source).is_file() for source in sources)
    errors = run.run_validator(out)
    assert errors in (None, [])
