"""The BIDS-App command line: ``qmri-workflows BIDS_DIR OUTPUT_DIR participant``.

Exit codes follow the BIDS-Apps draft where it has one:

====  ====================================================================
0     success (maps the data cannot support are skipped with a message)
1     a processing step failed (see the crash files named in the log)
16    the input is not a valid BIDS dataset (BIDS validator errors)
17    unknown analysis level
18    the participant/session filters selected nothing
64    command-line usage error
65    input data unusable (a subject without usable GRE/bSSFP; a bad --derivatives path)
66    input dataset missing, or no subject has data for any map
73    the output directory cannot be created or lies inside the input dataset
====  ====================================================================
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .. import __version__

EXIT_FAILURE = 1
EXIT_INVALID_BIDS = 16
EXIT_UNKNOWN_LEVEL = 17
EXIT_NO_SELECTION = 18
EXIT_USAGE = 64
EXIT_DATA = 65
EXIT_NO_INPUT = 66
EXIT_CANNOT_CREATE = 73

ANALYSIS_LEVELS = ("participant",)
# Plugins that submit the whole graph as dependent jobs and return before they run.
GRAPH_PLUGINS = ("SLURMGraph", "SGEGraph", "PBSGraph", "CondorDAGMan")
LOGGER = logging.getLogger("qmri_workflows")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors, which clashes with BIDS-App codes: use 64."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _strip_prefix(prefix):
    def strip(label):
        return label[len(prefix):] if label.startswith(prefix) else label

    return strip


def build_parser():
    """Return the argument parser of ``qmri-workflows``."""
    parser = _ArgumentParser(
        prog="qmri-workflows",
        description="Quantitative MRI maps (R2*, T2*; R1, PD, R2 and QSM in later releases) "
        "from a raw BIDS dataset, written as BIDS derivatives.",
    )
    parser.add_argument("bids_dir", type=Path, help="root of the raw BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives dataset is written")
    parser.add_argument(
        "analysis_level", help="processing stage: 'participant' (each subject separately)"
    )
    parser.add_argument("--version", action="version", version=f"qmri-workflows {__version__}")

    bids = parser.add_argument_group("BIDS filtering")
    bids.add_argument(
        "--participant-label", "--participant_label", nargs="+", type=_strip_prefix("sub-"),
        metavar="LABEL", help="subjects to process ('sub-' prefix optional; default: all)",
    )  # fmt: skip
    bids.add_argument(
        "--session-label", "--session_label", nargs="+", type=_strip_prefix("ses-"),
        metavar="LABEL", help="sessions to process ('ses-' prefix optional; default: all)",
    )  # fmt: skip
    bids.add_argument(
        "--derivatives", nargs="+", type=Path, default=[], metavar="PATH",
        help="BIDS derivatives datasets with precomputed inputs (TB1map, dseg + tsv, "
        "label-lesion mask, desc-brain mask) of the same subjects/sessions; read only",
    )  # fmt: skip
    bids.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", action="store_true",
        help="do not run the BIDS validator on the input dataset",
    )  # fmt: skip

    perf = parser.add_argument_group("Performance")
    perf.add_argument("--nprocs", "--n-cpus", type=_positive_int, default=os.cpu_count() or 1,
                      help="processes to run in parallel (default: all cores)")
    perf.add_argument("--omp-nthreads", type=_positive_int, default=None,
                      help="threads one fitting step may use (default: --nprocs, at most 8)")
    perf.add_argument("--mem-gb", "--mem_gb", type=_positive_float, default=None,
                      help="memory limit (GB) for the MultiProc scheduler")
    perf.add_argument("--plugin", default=None,
                      help="Nipype execution plugin (Linear, MultiProc, SLURM, SGE, PBS, ...); "
                      "default MultiProc, or Linear with --nprocs 1")
    perf.add_argument("--plugin-config", type=Path, default=None,
                      help="YAML or JSON file with 'plugin' and 'plugin_args' (overrides --plugin)")

    config = parser.add_argument_group("Workflow configuration")
    from ..workflows.registry import registered_families

    # Each map family brings its own options (qmri_workflows.workflows.registry).
    for family in registered_families():
        for option in family.options:
            config.add_argument(*option.flags, dest=option.dest, **option.kwargs)

    other = parser.add_argument_group("Other options")
    other.add_argument("-w", "--work-dir", type=Path, default=None,
                       help="Nipype working directory (default: OUTPUT_DIR/../qmri_work)")
    other.add_argument("--stop-on-first-crash", action="store_true",
                       help="stop at the first failing step")
    other.add_argument("-v", "--verbose", action="count", default=0, help="more log messages")
    return parser


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def load_plugin_config(path):
    """Read a plugin configuration (YAML or JSON) with keys ``plugin`` and ``plugin_args``."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        config = json.loads(text)
    else:
        import yaml

        config = yaml.safe_load(text)
    if not isinstance(config, dict) or "plugin" not in config:
        raise ValueError(f"{path}: expected a mapping with a 'plugin' key (and 'plugin_args')")
    return config["plugin"], dict(config.get("plugin_args") or {})


def batch_resources(workflow, plugin):
    """Pass each node's ``mem_gb``/``n_procs`` to a batch scheduler.

    Nipype's batch plugins do not forward them, so a SLURM/SGE/PBS job would get the queue's
    default memory. Nodes that run inside the submitting process are left alone.
    """
    for node in workflow._get_all_nodes():
        if node.run_without_submitting:
            continue
        mem_mb = int(node.mem_gb * 1024) + 256
        cpus = node.n_procs or 1
        # overwrite=False appends to the user's own arguments (partition, account, time limit).
        if plugin.startswith("SLURM"):
            node.plugin_args = {
                "sbatch_args": f"--mem={mem_mb}M --cpus-per-task={cpus}",
                "overwrite": False,
            }
        elif plugin.startswith("SGE"):
            node.plugin_args = {"qsub_args": f"-l h_vmem={mem_mb}M", "overwrite": False}
        elif plugin.startswith("PBS"):
            node.plugin_args = {"qsub_args": f"-l mem={mem_mb}mb,ncpus={cpus}", "overwrite": False}


def run_validator(bids_dir):
    """Run the BIDS validator on ``bids_dir``.

    Returns
    -------
    list of str or None
        One line per error; None when no validator is installed.
    """
    import shutil
    import subprocess

    executable = shutil.which("bids-validator-deno")
    if executable is None:
        candidate = Path(sys.executable).parent / "bids-validator-deno"
        executable = str(candidate) if candidate.exists() else None
    if executable is None:
        return None
    result = subprocess.run(
        [executable, str(bids_dir), "--json"], capture_output=True, text=True, check=False
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return [f"the BIDS validator failed to run: {result.stderr.strip() or result.stdout[:500]}"]
    issues = report.get("issues", {}).get("issues", [])
    errors = []
    for issue in issues:
        if issue.get("severity") == "error":
            where = issue.get("location", "")
            message = (issue.get("issueMessage") or "").strip().splitlines()
            errors.append(f"{issue.get('code', 'ERROR')}: {where} {message[0] if message else ''}".strip())
    return errors


def write_description(output_dir, bids_dir, argv):
    """Write the derivatives' ``dataset_description.json`` (always, even if processing fails)."""
    from ..io.derivatives import write_dataset_description

    command = "qmri-workflows " + " ".join(shlex.quote(a) for a in argv)
    return write_dataset_description(
        output_dir,
        name="qmri-workflows quantitative maps",
        dataset_type="derivative",
        generated_by=[{
            "Name": "qmri-workflows",
            "Version": __version__,
            "CodeURL": "https://github.com/qmri-workflows/qmri-workflows",
            "CommandLine": command,
        }],  # fmt: skip
        extra={"DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()}},
    )


def main(argv=None):
    """Run the BIDS App; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    if not LOGGER.handlers:
        # Our own handler only: Nipype already logs its nodes through its own handlers.
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [qmri-workflows] %(levelname)s: %(message)s")
        )
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return _run(args, argv)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _plugin_settings(args):
    """Plugin name and arguments from --plugin-config or --plugin; ValueError if unusable."""
    from nipype.pipeline import plugins

    if args.plugin_config:
        try:
            plugin, plugin_args = load_plugin_config(args.plugin_config)
        except OSError as error:
            raise ValueError(f"cannot read the plugin configuration: {error}") from error
    else:
        plugin = args.plugin or ("Linear" if args.nprocs == 1 else "MultiProc")
        plugin_args = {}
    if not hasattr(plugins, f"{plugin}Plugin"):
        known = sorted(name[: -len("Plugin")] for name in dir(plugins) if name.endswith("Plugin"))
        raise ValueError(f"unknown Nipype plugin {plugin!r}; choose from {', '.join(known)}")
    return plugin, plugin_args


def _foreign_dataset(folder):
    """Describe the dataset already in ``folder`` if another tool made it, else None."""
    description = Path(folder) / "dataset_description.json"
    if not description.is_file():
        return None
    try:
        content = json.loads(description.read_text())
    except (OSError, json.JSONDecodeError):
        return "a dataset whose dataset_description.json cannot be read"
    generated_by = content.get("GeneratedBy") or [{}]
    if content.get("DatasetType") == "derivative" and generated_by[0].get("Name") == "qmri-workflows":
        return None
    return f"the dataset {content.get('Name', '(unnamed)')!r} made by " + (
        generated_by[0].get("Name", "another tool") if content.get("DatasetType") == "derivative"
        else "a scanner (raw data)")


def _default_work_dir(output_dir, bids_dir):
    for candidate in (output_dir.parent / "qmri_work", Path.cwd() / "qmri_work"):
        if not _inside(candidate, bids_dir):
            return candidate.resolve()
    return None


def _run(args, argv):
    from ..io.query import (
        BSSFP,
        GRE,
        BIDSInputError,
        collect_inputs,
        open_derivatives,
        open_layout,
        select_participants,
    )

    # Everything that can be checked without touching a file comes first, so a mistake in the
    # call costs nothing and leaves nothing behind.
    if args.analysis_level not in ANALYSIS_LEVELS:
        LOGGER.error("unknown analysis level %r; choose from %s", args.analysis_level,
                     ", ".join(ANALYSIS_LEVELS))
        return EXIT_UNKNOWN_LEVEL
    try:
        plugin, plugin_args = _plugin_settings(args)
    except ValueError as error:
        LOGGER.error("%s", error)
        return EXIT_USAGE
    bids_dir = args.bids_dir.resolve()
    if not (bids_dir / "dataset_description.json").is_file():
        LOGGER.error("%s is not a BIDS dataset (no dataset_description.json); give the dataset root",
                     bids_dir)
        return EXIT_NO_INPUT
    output_dir = args.output_dir.resolve()
    if _inside(output_dir, bids_dir) or _inside(bids_dir, output_dir):
        LOGGER.error("output directory %s overlaps the input dataset %s; the input is never "
                     "written to: choose a folder outside it", output_dir, bids_dir)
        return EXIT_CANNOT_CREATE
    foreign = _foreign_dataset(output_dir)
    if foreign:
        LOGGER.error("output directory %s already holds %s; choose an empty folder or an earlier "
                     "qmri-workflows output", output_dir, foreign)
        return EXIT_CANNOT_CREATE
    work_dir = args.work_dir.resolve() if args.work_dir else _default_work_dir(output_dir, bids_dir)
    if work_dir is None or _inside(work_dir, bids_dir):
        LOGGER.error("the work directory would lie inside the input dataset %s; choose one "
                     "outside it with -w", bids_dir)
        return EXIT_CANNOT_CREATE

    if not args.skip_bids_validation:
        errors = run_validator(bids_dir)
        if errors is None:
            LOGGER.warning("BIDS validator not installed (pip install 'qmri-workflows[validator]'); "
                           "continuing without validation")
        elif errors:
            LOGGER.error("the BIDS validator found %d error(s) in %s:\n  %s\nFix them, or pass "
                         "--skip-bids-validation to proceed at your own risk.", len(errors),
                         bids_dir, "\n  ".join(errors[:20]))
            return EXIT_INVALID_BIDS

    try:
        layout = open_layout(bids_dir)
        selection = select_participants(layout, args.participant_label, args.session_label)
    except BIDSInputError as error:
        LOGGER.error("%s", error)
        return EXIT_NO_SELECTION
    if not selection:
        LOGGER.error("no subject in %s matches the filters", bids_dir)
        return EXIT_NO_SELECTION
    try:
        derivatives = open_derivatives(args.derivatives)
    except BIDSInputError as error:
        LOGGER.error("%s", error)
        return EXIT_DATA

    # Check every subject before processing any, so one run reports every problem to fix.
    subjects, problems = [], 0
    for subject, session in selection:
        try:
            inputs = collect_inputs(layout, subject, session, derivatives=derivatives)
        except BIDSInputError as error:
            LOGGER.error("%s", error)
            problems += 1
            continue
        label = f"sub-{subject}" + (f" ses-{session}" if session else "")
        for problem in inputs.problems:
            LOGGER.warning("%s: %s unusable: %s", label, problem.collection, problem.message)
        if inputs.has(GRE) or inputs.has(BSSFP):
            subjects.append(inputs)
        else:
            problems += 1
    if problems:
        LOGGER.error("%d of %d subject(s) cannot be processed (see above); fix the input or leave "
                     "them out with --participant-label", problems, len(selection))
        return EXIT_DATA

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        # Written before processing, so it is there even when a step fails.
        write_description(output_dir, bids_dir, argv)
    except (OSError, ValueError) as error:
        LOGGER.error("cannot create the output: %s", error)
        return EXIT_CANNOT_CREATE
    return _execute(args, subjects, output_dir, bids_dir, work_dir, plugin, plugin_args)


def _used_collections():
    from ..workflows.registry import registered_families

    return {collection for family in registered_families() for collection in family.needs}


def _execute(args, subjects, output_dir, bids_dir, work_dir, plugin, plugin_args):
    from nipype import config as nipype_config

    from ..workflows.base import init_qmri_wf

    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(work_dir / "crash"),
            "crashfile_format": "txt",
            "hash_method": "timestamp",
            "stop_on_first_crash": args.stop_on_first_crash,
            "remove_unnecessary_outputs": False,
            # Nodes last seconds to minutes; the default 2 s between scheduler polls would
            # dominate small datasets. Batch plugins keep their own (longer) polling.
            "poll_sleep_duration": 0.2,
        },
        "monitoring": {"enabled": False},
    })  # fmt: skip
    from ..workflows.base import default_options

    options = {dest: getattr(args, dest) for dest in default_options()}
    workflow, plans = init_qmri_wf(
        subjects=subjects,
        output_dir=str(output_dir),
        work_dir=str(work_dir),
        options=options,
        omp_nthreads=args.omp_nthreads or min(args.nprocs, 8),
    )
    from ..io.query import AFI, BSSFP, GRE, RECEIVE

    used = _used_collections()
    for subject in subjects:
        label = f"sub-{subject.subject}" + (f" ses-{subject.session}" if subject.session else "")
        LOGGER.info("%s plan:\n  %s", label, "\n  ".join(str(plan) for plan in plans[(subject.subject,
                                                                                          subject.session)]))
        unused = [collection for collection in (GRE, BSSFP, AFI, RECEIVE)
                  if subject.has(collection) and collection not in used]
        if unused:
            LOGGER.info("%s: %s data present; no map of this version uses them yet", label, ", ".join(unused))
    if not workflow._graph.nodes():
        LOGGER.error("no subject has data for any map this version computes")
        return EXIT_NO_INPUT

    if plugin in ("MultiProc", "LegacyMultiProc"):
        plugin_args.setdefault("n_procs", args.nprocs)
        if args.mem_gb:
            plugin_args.setdefault("memory_gb", args.mem_gb)
        plugin_args.setdefault("raise_insufficient", False)
    if plugin.startswith("SLURM"):
        # Nipype's SLURM plugins name jobs after $LOGNAME and fail without it (e.g. under cron).
        os.environ.setdefault("LOGNAME", getpass.getuser())
    if plugin in GRAPH_PLUGINS:
        # Nipype 1.11 sets this attribute only when it is passed, and fails without it.
        plugin_args.setdefault("dont_resubmit_completed_jobs", False)
    batch_resources(workflow, plugin)

    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as error:  # nipype raises RuntimeError listing the crashed nodes
        LOGGER.error("processing failed: %s\nCrash files are in %s", error, work_dir / "crash")
        return EXIT_FAILURE
    if plugin in GRAPH_PLUGINS:
        LOGGER.info("the whole graph was submitted to the scheduler as dependent jobs; each "
                    "subject's derivatives appear in %s when its last job finishes", output_dir)
    else:
        LOGGER.info("derivatives written to %s", output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
