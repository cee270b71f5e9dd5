"""One HTML page per subject: ``OUTPUT_DIR/sub-<label>.html``, figures in ``OUTPUT_DIR/sub-<label>/figures/``.

A page holds, per session (or once without sessions):

* the outcome: published, failed (which steps, with the error of each and its crash file) or not
  processed (why);
* the plan: which maps the data supported, which were skipped and why;
* the masks over the anatomy (first-echo magnitude, the grid of the maps): the brain mask's outline,
  the lesions and the regions of the analysis;
* a mosaic of axial slices of every published map, windowed at the 2nd-98th percentiles inside the
  brain mask (signed maps symmetric about zero), with a colour bar in the map's unit;
* histograms of each quantitative map per region, over the masks the regional table was computed
  on (:func:`qmri_workflows.core.regions.analysis_regions`);
* the regional and lesion tables;
* the steps that ran and their durations, and the provenance: versions, command line, options,
  input files and each output's ``Sources``.

A failed subject publishes nothing (the App's rule) and no subject folder is created for it; the
page says what failed, and shows the maps whose steps finished before the failure, read from the
work directory (:func:`qmri_workflows.io.staging.unpublished_directory`) under a heading that says
they are not published, with their figures embedded in the page (``data:`` addresses of the PNG
files matplotlib writes), since the output holds no folder of that subject to put them in. Every
figure is drawn on its own: one that cannot be drawn is replaced by a note saying why, and the rest
of the page is written.

Text from files and messages is escaped with :func:`html.escape`, and image addresses are quoted.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

__all__ = [
    "RunInfo",
    "StepFailure",
    "SubjectOutcome",
    "REPORT_PATTERNS",
    "crash_messages",
    "package_versions",
    "report_path",
    "write_reports",
    "write_subject_report",
]

LOGGER = logging.getLogger("qmri_workflows")

#: Report files, which BIDS does not name: listed in the output's ``.bidsignore``.
REPORT_PATTERNS = ("sub-*.html", "sub-*/figures")
#: Regions left out of the histograms and the region overlay (unions and the lesion drawn apart).
_NOT_DRAWN = ("deep_grey",)
_PACKAGES = ("qmri-workflows", "numpy", "scipy", "nibabel", "nipype", "dipy", "pybids", "matplotlib")
_PUBLISHED, _FAILED, _NOT_PROCESSED = "published", "failed", "not processed"


@dataclass(frozen=True)
class StepFailure:
    """A processing step that failed: its name, the last line of its error and its crash file."""

    step: str
    message: str = ""
    crash_file: str = ""


@dataclass
class SubjectOutcome:
    """What the App did for one subject (and session).

    Attributes
    ----------
    subject, session : str, str or None
        Labels without ``sub-``/``ses-``.
    status : {"published", "failed", "not processed"}
    plans : sequence of qmri_workflows.workflows.registry.MapPlan
    reason : str
        Why a subject was not processed.
    failed_steps : sequence of StepFailure
    finished_steps : sequence of (str, float)
        Steps that ran, with their durations (s).
    inputs : qmri_workflows.io.query.SubjectInputs or None
    quantitative : sequence of str
        Names of the quantitative maps (``Output.map_name``) the plan computes.
    anatomy_file : str, optional
        Background of the overlays (the first-echo magnitude: the grid of the maps).
    nawm_margin_mm : float
        Option of the analysis, so the histograms use its regions.
    unpublished_dir : str, optional
        A failed subject's folder of derivatives that finished but were not published (the work
        directory's, laid out as a derivatives dataset).
    """

    subject: str
    session: str | None = None
    status: str = _PUBLISHED
    plans: tuple = ()
    reason: str = ""
    failed_steps: tuple = ()
    finished_steps: tuple = ()
    inputs: object = None
    quantitative: tuple = ()
    anatomy_file: str | None = None
    nawm_margin_mm: float = 2.0
    unpublished_dir: str | None = None


@dataclass
class RunInfo:
    """What the report says of the run as a whole (provenance)."""

    command: str
    bids_dir: str
    output_dir: str
    options: dict = field(default_factory=dict)
    derivatives: tuple = ()
    log_file: str | None = None
    work_dir: str | None = None


def package_versions():
    """``{distribution: version}`` of the package and the libraries behind the numbers, and Python."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def crash_messages(crash_dir, *, since=None):
    """Errors of Nipype's text crash files: ``{(subject label, step): (last error line, file)}``.

    ``subject label`` and ``step`` are as :class:`qmri_workflows.cli.logs.StepReporter` names them
    (``sub-01 ses-a``, ``r2star_wf.fit_r2star``); files older than ``since`` (epoch s) are skipped,
    so an earlier run's crashes in the same work directory do not count.
    """
    found = {}
    folder = Path(crash_dir)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("crash-*.txt"), key=lambda p: p.stat().st_mtime):
        if since is not None and path.stat().st_mtime < since:
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        node = re.search(r"^Node: (\S+)", text, flags=re.MULTILINE)
        if node is None:
            continue
        subject, step = _subject_and_step(node.group(1))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # The error's last line (``ValueError: ...``); Nipype adds none after the traceback.
        message = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)), lines[-1])
        found[(subject, step)] = (message, str(path))
    return found


def _subject_and_step(fullname):
    for part in fullname.split("."):
        if part.startswith("sub_") and part.endswith("_wf"):
            subject, _, session = part[len("sub_") : -len("_wf")].partition("_ses_")
            label = f"sub-{subject}" + (f" ses-{session}" if session else "")
            return label, fullname.split(".", 2)[-1]
    return "", fullname


def report_path(root, subject):
    """``root/sub-<subject>.html``."""
    return Path(root) / f"sub-{subject}.html"


def _prefix(subject, session):
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def _heading(subject, session):
    return f"sub-{subject}" + (f" ses-{session}" if session else "")


def _e(text):
    return html.escape(str(text), quote=True)


def write_reports(root, outcomes, run, *, figures=True, workers=1):
    """Write one page per subject of ``outcomes`` into ``root``; return the pages written.

    ``root/.bidsignore`` gains :data:`REPORT_PATTERNS` so the output stays a valid BIDS dataset. A
    page that cannot be written is logged and the others are still written. With ``workers`` above
    1, subjects are drawn in that many forked processes (drawing is about 2 s of CPU per subject).
    """
    from ..io.tables import ensure_bidsignore

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ensure_bidsignore(root, REPORT_PATTERNS)
    by_subject = {}
    for outcome in outcomes:
        by_subject.setdefault(outcome.subject, []).append(outcome)
    jobs = [(root, subject, subject_outcomes, run, figures) for subject, subject_outcomes in by_subject.items()]
    workers = min(workers, len(jobs))
    import threading

    # forking a process that runs other threads can copy a lock one of them holds: draw here then
    if workers > 1 and threading.active_count() == 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers start at once with everything imported (spawn would import it again);
        # matplotlib is imported here once rather than in every worker
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_timed_report, jobs))
    else:
        results = [_timed_report(job) for job in jobs]
    pages = []
    for (_, subject, *_), (page, seconds, error) in zip(jobs, results):
        if error is not None:  # the maps are published: a report bug must not hide them
            LOGGER.error("report of sub-%s could not be written: %s", subject, error)
            continue
        LOGGER.info("report: %s (%.1f s)", page, seconds)
        pages.append(page)
    return pages


def _timed_report(job):
    """``(page, seconds, None)`` or ``(None, seconds, error text with its traceback)``."""
    import traceback

    started = time.monotonic()
    try:
        page = write_subject_report(*job[:4], figures=job[4])
    except Exception:
        return None, time.monotonic() - started, traceback.format_exc()
    return page, time.monotonic() - started, None


def write_subject_report(root, subject, outcomes, run, *, figures=True):
    """Write the page of one subject (all its sessions); return its path.

    Parameters
    ----------
    root : str or Path
        Folder of the page: the output dataset (or, when a run published nothing, the work
        directory). Published maps are read from ``root/sub-<subject>/``.
    subject : str
        Label without ``sub-``.
    outcomes : sequence of SubjectOutcome
        One per session of the subject (one without sessions).
    run : RunInfo
    figures : bool
        Draw the figures (False: tables and text only).
    """
    root = Path(root)
    figure_dir = root / f"sub-{subject}" / "figures"
    if figures and any(outcome.status == _PUBLISHED for outcome in outcomes):
        # figures of an earlier run would not match the maps of this one
        shutil.rmtree(figure_dir, ignore_errors=True)
    sections = [_session_section(root, outcome, run, figure_dir if figures else None) for outcome in outcomes]
    title = f"qmri-workflows report: sub-{subject}"
    statuses = [outcome.status for outcome in outcomes]
    page = _PAGE.format(
        title=_e(title),
        style=_STYLE,
        generated=_e(time.strftime("%Y-%m-%d %H:%M:%S")),
        summary="".join(
            f'<li class="{_status_class(o.status)}">{_e(_heading(o.subject, o.session))}: {_e(_status_text(o))}</li>'
            for o in outcomes
        ),
        overall=_e("FAILED" if _FAILED in statuses else statuses[0] if len(set(statuses)) == 1 else "mixed"),
        sections="\n".join(sections),
        provenance=_provenance(run, outcomes),
    )
    path = report_path(root, subject)
    path.write_text(page, encoding="utf-8")
    return path


def _status_class(status):
    return {"published": "ok", "failed": "failed"}.get(status, "skipped")


def _status_text(outcome):
    if outcome.status == _PUBLISHED:
        made = [plan.name for plan in outcome.plans if plan.run]
        return "published: " + ", ".join(made) if made else "published"
    if outcome.status == _FAILED:
        steps = ", ".join(failure.step for failure in outcome.failed_steps) or "(see the log)"
        return f"FAILED in {steps}; nothing of it was published"
    return f"not processed: {outcome.reason}"


def _session_section(root, outcome, run, figure_dir):
    anchor = _prefix(outcome.subject, outcome.session)
    parts = [f'<section id="{_e(anchor)}"><h2>{_e(_heading(outcome.subject, outcome.session))}</h2>']
    parts.append(f'<p class="status {_status_class(outcome.status)}">{_e(_status_text(outcome))}</p>')
    if outcome.failed_steps:
        parts.append(_failures(outcome))
    parts.append(_plan_table(outcome))
    if outcome.status == _PUBLISHED:
        parts.append(_published_content(root, outcome, figure_dir))
    elif outcome.status == _FAILED:
        folder = root / f"sub-{outcome.subject}"
        earlier = " The files in its folder are from an earlier run." if folder.is_dir() else ""
        parts.append(
            "<p>A subject whose step failed publishes none of its maps: its derivatives are written to "
            "the output whole or not at all. The steps that finished kept their results in the work directory"
            + (f" ({_e(run.work_dir)})" if run.work_dir else "")
            + f"; run the same command again after fixing the cause to resume.{_e(earlier)}</p>"
        )
        parts.append(_unpublished_content(outcome, figure_dir is not None))
    parts.append(_steps(outcome))
    parts.append("</section>")
    return "\n".join(parts)


def _unpublished_content(outcome, figures):
    """The maps of a failed subject whose steps finished, from the work directory, labelled as such."""
    import tempfile

    unpublished = Path(outcome.unpublished_dir) if outcome.unpublished_dir else None
    if unpublished is None or not any(unpublished.glob("sub-*/**/*.nii*")):
        return (
            '<h3 class="unpublished">Maps that finished before the failure</h3><p>None: no map of this subject '
            "was finished and written before the failure (or the run stopped at the first crash).</p>"
        )
    heading = (
        '<h3 class="unpublished">Maps that finished before the failure: NOT PUBLISHED</h3>'
        '<p class="unpublished">These maps are <strong>not</strong> in the output dataset. They are the results '
        "of the steps that finished before the failure, kept in the work directory "
        f"(<code>{_e(unpublished)}</code>) so that they can be looked at: the maps that depend on the "
        "failed step are missing, a map that a later step would have refined (R1 refitted with the R2 "
        "map, say) may be its first estimate, and the folder is replaced when the subject is run again.</p>"
    )
    if not figures:
        return heading + _published_content(unpublished, outcome, None)
    with tempfile.TemporaryDirectory(prefix="qmri-report-") as scratch:
        # drawn in a scratch folder and embedded: the output holds no folder of a failed subject
        content = _published_content(unpublished, outcome, Path(scratch) / "figures", embed=True)
    return heading + '<div class="unpublished">' + content + "</div>"


def _failures(outcome):
    rows = "".join(
        f"<tr><td>{_e(f.step)}</td><td><code>{_e(f.message or '(no crash file found; see the log)')}</code></td>"
        f"<td>{_e(f.crash_file)}</td></tr>"
        for f in outcome.failed_steps
    )
    return (
        '<h3 class="failed">What failed</h3><table class="failures"><thead><tr><th>step</th><th>error</th>'
        f"<th>crash file</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _plan_table(outcome):
    if not outcome.plans:
        return "<p>No plan: the subject's data could not be read.</p>"
    failed_keys = {f.step.split("_wf.", 1)[0] for f in outcome.failed_steps if "_wf." in f.step}
    rows = []
    for plan in outcome.plans:
        if not plan.run:
            result, css = "skipped", "skipped"
        elif plan.key in failed_keys:
            result, css = "FAILED", "failed"
        elif outcome.status == _PUBLISHED:
            result, css = "published", "ok"
        else:
            result, css = "not published", "skipped"
        rows.append(
            f'<tr class="{css}"><td>{_e(plan.name)}</td><td>{"yes" if plan.run else "no"}</td>'
            f"<td>{_e(plan.reason)}</td><td>{_e(result)}</td></tr>"
        )
    return (
        "<h3>Plan</h3><table><thead><tr><th>map</th><th>computed</th><th>from (or why not)</th>"
        f"<th>outcome</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _steps(outcome):
    if not outcome.finished_steps:
        return ""
    rows = "".join(f"<tr><td>{_e(step)}</td><td>{seconds:.1f}</td></tr>" for step, seconds in outcome.finished_steps)
    return (
        f"<details><summary>Steps that ran ({len(outcome.finished_steps)})</summary><table><thead><tr>"
        f"<th>step</th><th>seconds</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )


# ---- published content -------------------------------------------------------------------------


def _parse_name(path):
    """``(map name, suffix)`` of a derivative: ``desc-stderr_R2starmap`` -> ``R2starmap_desc-stderr``."""
    stem = path.name.removesuffix(".nii.gz").removesuffix(".nii")
    suffix = stem.rsplit("_", 1)[-1]
    desc = re.search(r"_desc-([a-zA-Z0-9]+)_", stem + "_")
    return (suffix if desc is None else f"{suffix}_desc-{desc.group(1)}"), suffix


def _sidecar(path):
    sidecar = Path(str(path).removesuffix(".gz").removesuffix(".nii") + ".json")
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


class _Figures:
    """Draws figures into the subject's folder; a figure that fails becomes a note on the page."""

    def __init__(self, folder, prefix, *, embed=False):
        self.folder, self.prefix, self.notes, self.embed = folder, prefix, [], embed

    def draw(self, what, name, function, *args, **kwargs):
        """Call ``function(*args, path, **kwargs)``; return the ``<img>`` (or a note) as HTML.

        With ``embed`` the image is the PNG file's bytes in a ``data:`` address (the file is
        matplotlib's; only its transport changes), else the file's path relative to the page.
        """
        if self.folder is None:
            return ""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}_{name}.png"
        try:
            function(*args, path, **kwargs)
        except Exception as error:  # a figure must not cost the page: say what went wrong instead
            LOGGER.warning("report: the figure '%s' could not be drawn: %s", what, error)
            return f'<p class="note">The figure "{_e(what)}" could not be drawn: {_e(error)}</p>'
        if self.embed:
            import base64

            source = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        else:
            source = quote(path.relative_to(self.folder.parent.parent).as_posix())
        return f'<figure><img src="{_e(source)}" alt="{_e(what)}"><figcaption>{_e(what)}</figcaption></figure>'


def _load(path):
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return image, data


def _published_content(root, outcome, figure_dir, *, embed=False):
    from .figures import (
        HISTOGRAM_PERCENTILES,
        map_mosaic,
        mosaic_slices,
        overlay_mosaic,
        region_histograms,
        robust_window,
        to_ras,
    )

    folder = root / f"sub-{outcome.subject}"
    if outcome.session:
        folder = folder / f"ses-{outcome.session}"
    images = sorted(folder.glob("*/*.nii*"))
    masks = [path for path in images if _parse_name(path)[1] == "mask"]
    brain_file = next((path for path in masks if "_desc-brain_" in path.name), None)
    maps = [path for path in images if _parse_name(path)[1] != "mask"]
    if brain_file is None or not maps:
        return "<p>No brain mask or no map was found in the subject's folder.</p>"
    reference, brain = _load(brain_file)
    brain = brain > 0
    shape = brain.shape
    draw = _Figures(figure_dir, _prefix(outcome.subject, outcome.session), embed=embed)

    loaded, skipped = {}, []
    for path in maps:
        name, _ = _parse_name(path)
        image, data = _load(path)
        if data.shape != shape:
            skipped.append(f"{path.name} (shape {data.shape}, not the mask's {shape})")
            continue
        loaded[name] = (path, data, _sidecar(path))
    quantitative = [name for name in outcome.quantitative if name in loaded]
    others = [name for name in loaded if name not in quantitative]

    # The regions of the analysis (the table's masks), for the overlay and the histograms.
    regions_table = next(folder.glob("anat/*_desc-regions_stats.tsv"), None)
    lesions_table = next(folder.glob("anat/*_desc-lesions_stats.tsv"), None)
    region_masks, lesion, region_note = None, None, ""
    derivatives = getattr(outcome.inputs, "derivatives", {}) or {}
    if regions_table is not None or "dseg" in derivatives:
        try:
            region_masks, lesion, region_note = _regions(
                reference, brain, {name: loaded[name][1] for name in quantitative}, derivatives, outcome
            )
        except Exception as error:  # the page goes on without histograms
            region_note = f"regions unavailable: {error}"

    def ras(data):
        return to_ras(data, reference.affine)[0]

    ras_voxel = to_ras(brain, reference.affine)[1]
    brain_ras = ras(brain)
    slices = mosaic_slices(brain_ras)
    parts = ['<h3 id="{}">Masks over the anatomy</h3>'.format(_e(draw.prefix + "-masks"))]
    anatomy, anatomy_name = _anatomy(outcome, loaded, shape)
    parts.append(
        f"<p>Background: {_e(anatomy_name)}. Axial slices k (voxel index after reorientation to RAS), "
        "neurological convention (the subject's left on the left).</p>"
    )
    if anatomy is not None:
        anatomy_ras = ras(anatomy)
        lesion_ras = None if lesion is None else ras(lesion)
        parts.append(
            draw.draw(
                "brain mask (outline) and lesions over the anatomy",
                "desc-masks_overlay",
                lambda path: overlay_mosaic(
                    anatomy_ras, path, slices=slices, voxel_size=ras_voxel, brain_mask=brain_ras, lesion_mask=lesion_ras
                ),
            )
        )
        shown = {k: ras(v) for k, v in (region_masks or {}).items() if k not in (*_NOT_DRAWN, "nawm", "lesion")}
        if shown:
            parts.append(
                draw.draw(
                    "regions of the analysis over the anatomy",
                    "desc-regions_overlay",
                    lambda path: overlay_mosaic(
                        anatomy_ras, path, slices=slices, voxel_size=ras_voxel, regions=shown, lesion_mask=lesion_ras
                    ),
                )
            )
    if region_note:
        parts.append(f"<p>{_e(region_note)}</p>")

    def map_block(name):
        path, data, sidecar = loaded[name]
        units = sidecar.get("Units", "")
        window = robust_window(data, brain)
        label = f"{name} ({units})" if units else name
        block = [f'<div class="map" id="{_e(draw.prefix + "-" + name)}"><h4>{_e(label)}</h4>']
        if window is None:
            block.append("<p>No finite value inside the brain mask: nothing to show.</p></div>")
            return "".join(block)
        block.append(
            f"<p>{_e(path.name)}; window {window.low:.4g} to {window.high:.4g} {_e(units)} "
            f"(2nd-98th percentiles inside the brain mask{', symmetric about 0' if window.low == -window.high else ''})"
            "</p>"
        )
        # quantitative maps are shown in the brain (chi is 0, not NaN, outside its own mask)
        data_ras = ras(np.where(brain, data, np.nan) if name in quantitative else data)
        block.append(
            draw.draw(
                f"{label}: axial slices",
                f"map-{name}_mosaic",
                lambda target: map_mosaic(
                    data_ras, target, slices=slices, window=window, voxel_size=ras_voxel, label=units or name
                ),
            )
        )
        if region_masks and name in quantitative:
            histogram_masks = {k: v for k, v in region_masks.items() if k not in _NOT_DRAWN}
            inside = data[brain & np.isfinite(data)]
            value_range = tuple(float(v) for v in np.percentile(inside, HISTOGRAM_PERCENTILES))
            block.append(
                draw.draw(
                    f"{label}: histogram per region",
                    f"map-{name}_histogram",
                    lambda target: region_histograms(
                        data, histogram_masks, target, value_range=value_range, label=label
                    ),
                )
            )
        block.append("</div>")
        return "".join(block)

    parts.append('<h3>Quantitative maps</h3><p class="maplist">' + _e(", ".join(quantitative) or "none") + "</p>")
    parts += [map_block(name) for name in quantitative]
    if others:
        parts.append(
            "<details open><summary>Other outputs (uncertainties, intercepts, field maps)</summary>"
            + "".join(map_block(name) for name in others)
            + "</details>"
        )
    if skipped:
        parts.append("<p>Not shown: " + _e("; ".join(skipped)) + "</p>")
    parts.append(_table_section("Regional statistics", regions_table, root))
    parts.append(_table_section("Lesions", lesions_table, root))
    parts.append(_sources(loaded, root))
    return "\n".join(part for part in parts if part)


def _anatomy(outcome, loaded, shape):
    """The overlays' background: the first-echo magnitude on the maps' grid, else an S0 map."""
    if outcome.anatomy_file:
        try:
            _, data = _load(outcome.anatomy_file)
        except Exception:  # unreadable: fall back on S0
            data = None
        if data is not None and data.ndim == 4:
            data = data[..., 0]
        if data is not None and data.shape == shape:
            return data, f"first-echo magnitude ({Path(outcome.anatomy_file).name})"
    for name, (path, data, _) in loaded.items():
        if name.startswith("S0map") or name.startswith("M0map"):
            return data, path.name
    return None, "none (no first-echo magnitude or S0 map on the maps' grid)"


def _regions(reference, brain, maps, derivatives, outcome):
    """The analysis's region masks on the maps' grid, the lesion mask and a sentence on their origin."""
    from ..core.regions import analysis_regions, regions_from_label_names
    from ..io.resample import load_on_grid
    from ..io.tables import read_label_table

    voxel_size = tuple(float(v) for v in np.sqrt((reference.affine[:3, :3] ** 2).sum(axis=0)))
    labels = regions = lesion = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage warnings were given when the analysis ran
        dseg = derivatives.get("dseg")
        if dseg is not None and dseg.tsv:
            labels = np.rint(load_on_grid(dseg.path, reference, kind="majority")).astype(np.int32)
            regions, _ = regions_from_label_names(read_label_table(dseg.tsv))
        lesion_file = derivatives.get("lesion_mask")
        if lesion_file is not None:
            lesion = load_on_grid(lesion_file.path, reference, kind="majority") > 0
    masks, lesion, tissue_map = analysis_regions(
        maps,
        voxel_size,
        brain_mask=brain,
        labels=labels,
        regions=regions or None,
        lesion_mask=lesion,
        nawm_margin_mm=outcome.nawm_margin_mm,
    )
    if tissue_map is None:
        note = f"Regions: the segmentation {Path(dseg.path).name} (resampled onto the maps' grid)."
    else:
        note = f"Regions: no segmentation given; three tissue classes of {tissue_map} in the brain mask."
    if lesion is not None:
        note += f" Lesions: {int(np.count_nonzero(lesion))} voxels."
    return masks, lesion, note


def _table_section(title, path, root):
    if path is None:
        return ""
    from ..io.tables import read_table

    rows = read_table(path)
    relative = path.relative_to(root).as_posix()
    if not rows:
        return f"<h3>{_e(title)}</h3><p>{_e(relative)}: no rows.</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(_cell(row[c]) for c in columns) + "</tr>" for row in rows)
    return (
        f"<h3>{_e(title)}</h3><p>{_e(relative)} ({len(rows)} rows; columns described in its .json)</p>"
        f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def _cell(value):
    text = "n/a" if value is None else value
    return f'<td class="text">{_e(text)}</td>' if len(text) > 40 else f"<td>{_e(text)}</td>"


def _sources(loaded, root):
    rows = []
    for name, (path, _, sidecar) in loaded.items():
        sources = sidecar.get("Sources") or []
        rows.append(
            f"<tr><td>{_e(path.relative_to(root).as_posix())}</td><td>{_e(name)}</td>"
            f"<td>{'<br>'.join(_e(s) for s in sources) or 'n/a'}</td></tr>"
        )
    return (
        "<details><summary>Sources of each output (sidecar <code>Sources</code>)</summary><table><thead><tr>"
        f"<th>file</th><th>map</th><th>sources</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
    )


# ---- provenance --------------------------------------------------------------------------------


def _input_files(inputs, bids_dir):
    files = []
    for series in (*getattr(inputs, "gre", ()), *getattr(inputs, "bssfp", ())):
        files += [*series.magnitude, *(series.phase or ())]
    afi = getattr(inputs, "afi", None)
    if afi is not None:
        files += [afi.tr1_file, afi.tr2_file]
    dam = getattr(inputs, "dam", None)
    if dam is not None:
        files += [dam.flip1_file, dam.flip2_file]
    tfl = getattr(inputs, "tfl", None)
    if tfl is not None:
        files += [path for path in (tfl.famp_file, tfl.anat_file) if path]
    receive = getattr(inputs, "receive", None)
    if receive is not None:
        files += [receive.head_file, receive.body_file]
    for derivative in (getattr(inputs, "derivatives", None) or {}).values():
        files += [derivative.path] + ([derivative.tsv] if derivative.tsv else [])
    shown = []
    for path in files:
        try:
            shown.append(Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix())
        except ValueError:
            shown.append(str(path))
    return shown


def _provenance(run, outcomes):
    versions = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in package_versions().items())
    options = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in sorted(run.options.items()))
    parts = [
        '<section id="provenance"><h2>Provenance</h2>',
        f"<table><thead><tr><th>software</th><th>version</th></tr></thead><tbody>{versions}</tbody></table>",
        f"<h3>Command line</h3><pre>{_e(run.command)}</pre>",
        f"<p>Input dataset: {_e(run.bids_dir)}<br>Output dataset: {_e(run.output_dir)}",
    ]
    if run.derivatives:
        parts.append("<br>Derivatives read: " + _e(", ".join(str(d) for d in run.derivatives)))
    if run.log_file:
        parts.append(f"<br>Log file: {_e(run.log_file)}")
    parts.append("</p>")
    parts.append(
        f"<details><summary>Options</summary><table><thead><tr><th>option</th><th>value</th></tr></thead>"
        f"<tbody>{options}</tbody></table></details>"
    )
    for outcome in outcomes:
        if outcome.inputs is None:
            continue
        files = "".join(f"<li>{_e(f)}</li>" for f in _input_files(outcome.inputs, run.bids_dir))
        parts.append(
            f"<details><summary>Inputs of {_e(_heading(outcome.subject, outcome.session))}</summary>"
            f"<pre>{_e(outcome.inputs.describe())}</pre><ul>{files}</ul></details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #aaa; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
.scroll { overflow-x: auto; max-height: 30em; overflow-y: auto; }
table.data td { white-space: nowrap; } table.data td.text { white-space: normal; min-width: 30em; }
.ok { color: #176b1e; } .failed { color: #b00020; font-weight: bold; } .skipped { color: #777; }
tr.failed td { background: #fde7ea; } tr.skipped td { color: #666; }
p.status { font-size: 1.1em; } p.note { color: #b00020; }
h3.unpublished, p.unpublished { color: #8a4b00; }
div.unpublished { border-left: 6px solid #e0a040; padding-left: 0.8em; }
figure { margin: 0.3em 0; } img { max-width: 100%; } figcaption { font-size: 0.8em; color: #555; }
pre { background: #f5f5f5; padding: 0.5em; white-space: pre-wrap; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<p>Written {generated} by qmri-workflows. Overall: <strong>{overall}</strong></p>
<ul class="summary">{summary}</ul>
{sections}
{provenance}
</body>
</html>
"""
