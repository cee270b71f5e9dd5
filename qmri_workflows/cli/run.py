"""The BIDS-App command line: ``qmri-workflows BIDS_DIR OUTPUT_DIR participant``.

Every subject that can be processed is; the others are reported with the reason. Exit codes follow
the BIDS-Apps draft where it has one:

====  ====================================================================
0     every selected subject got its maps
1     a processing step failed for some subject (crash files named in the log)
16    the input is not a valid BIDS dataset (validator errors, unreadable files)
17    unknown analysis level
18    the participant/session filters selected nothing
64    command-line usage error (including a malformed --plugin-config)
65    some subject's input is unusable, or a --derivatives path is not a derivatives dataset
66    input dataset missing, or the selected subjects hold no qMRI data
73    output or work directory cannot be created, is in the input dataset other than under its
      derivatives/<name>, holds the input (output only), or is in use
130   interrupted (Ctrl-C)
====  ====================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
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
EXIT_INTERRUPTED = 130

ANALYSIS_LEVELS = ("participant", "group")
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
        return label[len(prefix) :] if label.startswith(prefix) else label

    return strip


def build_parser():
    """Return the argument parser of ``qmri-workflows``."""
    parser = _ArgumentParser(
        prog="qmri-workflows",
        description="Quantitative MRI maps (R2*/T2*, B1+, R1/T1, PD, MTsat, R2/T2, QSM), regional and lesion "
        "statistics and a report per subject, from a raw BIDS dataset, written as BIDS derivatives.",
    )
    parser.add_argument("bids_dir", type=Path, help="root of the raw BIDS dataset (read only)")
    parser.add_argument(
        "output_dir",
        type=Path,
        help="where the derivatives dataset is written: outside BIDS_DIR, or BIDS_DIR/derivatives/<name>",
    )
    parser.add_argument(
        "analysis_level",
        help="processing stage: 'participant' (each subject separately) or 'group' (the subjects' tables "
        "joined with participants.tsv, summaries and plots, in OUTPUT_DIR/group; run after participant)",
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
    perf.add_argument(
        "--nprocs",
        "--n-cpus",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="processes to run in parallel (default: all cores)",
    )
    perf.add_argument(
        "--omp-nthreads",
        type=_positive_int,
        default=None,
        help="threads one fitting step may use (default: --nprocs, at most 8)",
    )
    perf.add_argument(
        "--mem-gb", "--mem_gb", type=_positive_float, default=None, help="memory limit (GB) for the MultiProc scheduler"
    )
    perf.add_argument(
        "--plugin",
        default=None,
        help="Nipype execution plugin (Linear, MultiProc, SLURM, SGE, PBS, ...); "
        "default MultiProc, or Linear with --nprocs 1",
    )
    perf.add_argument(
        "--plugin-config",
        type=Path,
        default=None,
        help="YAML or JSON file with 'plugin' and 'plugin_args' (overrides --plugin)",
    )

    config = parser.add_argument_group("Workflow configuration")
    from ..workflows.registry import registered_families

    # Each map family brings its own options (qmri_workflows.workflows.registry).
    for family in registered_families():
        for option in family.options:
            config.add_argument(*option.flags, dest=option.dest, **option.kwargs)

    other = parser.add_argument_group("Other options")
    other.add_argument(
        "-w", "--work-dir", type=Path, default=None,
        help="Nipype working directory, outside BIDS_DIR or BIDS_DIR/derivatives/<name> (default: "
        "OUTPUT_DIR/../qmri_work, or ./qmri_work when that is in BIDS_DIR)",
    )  # fmt: skip
    other.add_argument("--stop-on-first-crash", action="store_true", help="stop at the first failing step")
    verbosity = other.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more messages: -v adds each Nipype node's, -vv debugging output",
    )
    verbosity.add_argument(
        "-q", "--quiet", action="count", default=0, help="fewer messages: -q warnings and errors only, -qq errors only"
    )
    return parser


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def load_plugin_config(path):
    """Read a plugin configuration (YAML or JSON) with keys ``plugin`` and ``plugin_args``."""
    import yaml

    text = Path(path).read_text()
    try:
        config = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"{path} is not valid {'JSON' if Path(path).suffix == '.json' else 'YAML'}: {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(config, dict) or "plugin" not in config:
        raise ValueError(f"{path}: expected a mapping with a 'plugin' key (and 'plugin_args')")
    plugin_args = config.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise ValueError(f"{path}: 'plugin_args' must be a mapping, got {plugin_args!r}")
    return str(config["plugin"]), dict(plugin_args)


def batch_resources(workflow, plugin):
    """Pass each node's ``mem_gb``/``n_procs`` to a batch scheduler.

    Nipype's batch plugins do not forward them, so a SLURM/SGE/PBS job would get the queue's
    default memory. Nodes that run inside the submitting process are left alone, except under
    the graph plugins (SLURMGraph, SGEGraph), which submit every node as a job.
    """
    submits_every_node = plugin.endswith("Graph")
    for node in workflow._get_all_nodes():
        if node.run_without_submitting and not submits_every_node:
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


def run_validator(bids_dir, *, files_per_group=3):
    """Run the BIDS validator on ``bids_dir`` and group its errors.

    Returns
    -------
    list of str or None
        One line per kind of error (code and, where the validator names one, the key), with how
        many files it concerns and at most ``files_per_group`` of them; empty when the dataset is
        valid; None when no validator is installed.
    """
    return _finish_validator(_start_validator(bids_dir), files_per_group=files_per_group)


def _start_validator(bids_dir):
    """Start the validator (a process of its own) on ``bids_dir``; None when none is installed.

    Its report goes to a temporary file, not a pipe, so it never waits for this process to read.
    """
    import subprocess
    import tempfile

    executable = shutil.which("bids-validator-deno")
    if executable is None:
        candidate = Path(sys.executable).parent / "bids-validator-deno"
        executable = str(candidate) if candidate.exists() else None
    if executable is None:
        return None
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen([executable, str(bids_dir), "--json"], stdout=stdout, stderr=stderr, text=True)
    process.report_files = (stdout, stderr)
    return process


def _finish_validator(process, *, files_per_group=3):
    """Wait for a validator from :func:`_start_validator` and group its errors (see :func:`run_validator`)."""
    if process is None:
        return None
    stdout, stderr = process.report_files
    with stdout, stderr:
        process.wait()
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    try:
        report = json.loads(output)
    except json.JSONDecodeError:
        return [f"the BIDS validator failed to run: {errors.strip() or output[:500]}"]
    return group_validator_errors(report, files_per_group=files_per_group)


def group_validator_errors(report, *, files_per_group=3):
    """Lines of :func:`run_validator` from the validator's JSON report."""
    descriptions = report.get("issues", {}).get("codeMessages", {})
    groups = {}
    for issue in report.get("issues", {}).get("issues", []):
        if issue.get("severity") != "error":
            continue
        key = (issue.get("code", "ERROR"), issue.get("subCode"))
        groups.setdefault(key, []).append(issue)
    lines = []
    for (code, sub_code), issues in groups.items():
        description = (descriptions.get(code) or issues[0].get("issueMessage") or "").strip().splitlines()
        what = f"{code}" + (f" '{sub_code}'" if sub_code else "")
        if description:
            what += f" ({description[0].rstrip('.')})"
        locations = list(dict.fromkeys(issue.get("location", "") for issue in issues if issue.get("location")))
        shown = ", ".join(location.lstrip("/") for location in locations[:files_per_group])
        more = f" and {len(locations) - files_per_group} more" if len(locations) > files_per_group else ""
        lines.append(f"{what}: {len(locations)} file(s): {shown}{more}" if locations else what)
    return lines


#: Derivative files listed in the output's ``.bidsignore``: the noise maps (BIDS has no suffix for
#: them) and the bSSFP off-resonance map (a ``fieldmap``; without QSM no ``magnitude``, which the
#: validator asks for, stands beside it).
BIDSIGNORE_PATTERNS = ("*_desc-noise_sigmamap.*", "*_desc-bssfpnoise_sigmamap.*", "*_desc-offresonance_fieldmap.*")


def write_description(output_dir, bids_dir, argv):
    """Write the derivatives' ``dataset_description.json`` (always, even if processing fails)."""
    from ..io.derivatives import write_dataset_description
    from ..io.tables import ensure_bidsignore

    command = "qmri-workflows " + " ".join(shlex.quote(a) for a in argv)
    ensure_bidsignore(output_dir)
    ensure_bidsignore(output_dir, BIDSIGNORE_PATTERNS)
    return write_dataset_description(
        output_dir,
        name="qmri-workflows quantitative maps",
        dataset_type="derivative",
        generated_by=[
            {
                "Name": "qmri-workflows",
                "Version": __version__,
                "CodeURL": "https://github.com/qmri-workflows/qmri-workflows",
                "CommandLine": command,
            }
        ],  # fmt: skip
        extra={"DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()}},
    )


def main(argv=None):
    """Run the BIDS App; returns the exit code (the console script exits with it)."""
    from .logs import configure_console

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    args = build_parser().parse_args(argv)
    configure_console(args.verbose, args.quiet)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        LOGGER.error(
            "interrupted: subjects that had not finished published nothing; run the same command again to resume"
        )
        return EXIT_INTERRUPTED


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
    if args.plugin_config:
        try:
            plugin, plugin_args = load_plugin_config(args.plugin_config)
        except OSError as error:
            raise ValueError(f"cannot read the plugin configuration: {error}") from error
    else:
        plugin = args.plugin or ("Linear" if args.nprocs == 1 else "MultiProc")
        plugin_args = {}
    if plugin in ("Linear", "MultiProc"):  # known without importing Nipype (half a second)
        return plugin, plugin_args
    from nipype.pipeline import plugins

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
        generated_by[0].get("Name", "another tool")
        if content.get("DatasetType") == "derivative"
        else "a scanner (raw data)"
    )


def _default_work_dir(output_dir, bids_dir):
    """``qmri_work/<output name>-<digest>`` beside the output: private to this input and output.

    Runs on other datasets or into other outputs never share it (they would mix their
    intermediate files); re-running the same command finds it again and resumes.
    """
    import hashlib

    digest = hashlib.sha256(f"{bids_dir}\n{output_dir}".encode()).hexdigest()[:10]
    for parent in (output_dir.parent, Path.cwd()):
        candidate = (parent / "qmri_work" / f"{output_dir.name}-{digest}").resolve()
        if not _inside(candidate, bids_dir):
            return candidate
    return None


@contextlib.contextmanager
def _work_dir_lock(work_dir):
    """Hold an exclusive lock on ``work_dir`` for the run; ``BlockingIOError`` if another run has it."""
    import fcntl

    with open(work_dir / ".qmri-workflows.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise BlockingIOError(owner) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _label(subject, session):
    return f"sub-{subject}" + (f" ses-{session}" if session else "")


def _check_call(args):
    """Checks that need no file written; returns (exit code or None, settings)."""
    if args.analysis_level not in ANALYSIS_LEVELS:
        LOGGER.error("unknown analysis level %r; choose from %s", args.analysis_level, ", ".join(ANALYSIS_LEVELS))
        return EXIT_UNKNOWN_LEVEL, None
    try:
        plugin, plugin_args = _plugin_settings(args)
    except ValueError as error:
        LOGGER.error("%s", error)
        return EXIT_USAGE, None
    bids_dir = args.bids_dir.resolve()
    if not (bids_dir / "dataset_description.json").is_file():
        LOGGER.error("%s is not a BIDS dataset (no dataset_description.json); give the dataset root", bids_dir)
        return EXIT_NO_INPUT, None
    from ..io.derivatives import check_output_root

    output_dir = args.output_dir.resolve()
    try:
        check_output_root(output_dir, bids_dir=bids_dir)
    except ValueError as error:
        LOGGER.error("%s", error)
        return EXIT_CANNOT_CREATE, None
    foreign = _foreign_dataset(output_dir)
    if foreign:
        LOGGER.error(
            "output directory %s already holds %s; choose an empty folder or an earlier qmri-workflows output",
            output_dir,
            foreign,
        )
        return EXIT_CANNOT_CREATE, None
    work_dir = args.work_dir.resolve() if args.work_dir else _default_work_dir(output_dir, bids_dir)
    if work_dir is None:
        LOGGER.error(
            "the work directory would lie inside the input dataset %s; choose one outside it with -w", bids_dir
        )
        return EXIT_CANNOT_CREATE, None
    try:
        check_output_root(work_dir, bids_dir=bids_dir, work=True)
    except ValueError as error:
        LOGGER.error("%s (-w)", error)
        return EXIT_CANNOT_CREATE, None
    if _inside(work_dir, output_dir):
        LOGGER.error(
            "the work directory %s lies inside the output %s, which must hold derivatives only; choose another with -w",
            work_dir,
            output_dir,
        )
        return EXIT_CANNOT_CREATE, None
    return None, (plugin, plugin_args, bids_dir, output_dir, work_dir)


def _run_group(args, bids_dir, output_dir):
    from .group import run_group

    try:
        run_group(bids_dir, output_dir, participant_labels=args.participant_label)
    except FileNotFoundError as error:
        LOGGER.error("%s", error)
        return EXIT_NO_INPUT
    except ValueError as error:
        LOGGER.error("%s", error)
        return EXIT_DATA
    return 0


def _run(args, argv):
    # Everything that can be checked without touching a file comes first, so a mistake in the
    # call costs nothing and leaves nothing behind.
    code, settings = _check_call(args)
    if code is not None:
        return code
    plugin, plugin_args, bids_dir, output_dir, work_dir = settings
    if args.analysis_level == "group":
        return _run_group(args, bids_dir, output_dir)
    # The validator and the indexing take seconds: say at once that the App is at work.
    LOGGER.info("qmri-workflows %s: checking %s", __version__, bids_dir)
    from ..io.query import BIDSInputError, collect_inputs, open_derivatives, open_layout, select_participants
    from ..workflows.registry import has_maps_to_compute, plan_families, registered_families

    # The validator runs in a process of its own (about a second): pybids indexes meanwhile, and
    # the validator's verdict still comes first.
    validator = None if args.skip_bids_validation else _start_validator(bids_dir)
    try:
        layout, layout_error = open_layout(bids_dir), None
    except BIDSInputError as error:
        layout, layout_error = None, error
    except BaseException:  # Ctrl-C or a pybids crash: leave no validator behind
        if validator is not None:
            validator.kill()
        raise
    if not args.skip_bids_validation:
        report = _finish_validator(validator)
        if report is None:
            LOGGER.warning(
                "BIDS validator not installed (pip install 'qmri-workflows[validator]'); continuing without validation"
            )
        elif report:
            LOGGER.error(
                "the BIDS validator found errors in %s:\n  %s\nFix them, or pass "
                "--skip-bids-validation to proceed at your own risk.",
                bids_dir,
                "\n  ".join(report),
            )
            return EXIT_INVALID_BIDS

    if layout_error is not None:
        LOGGER.error("%s", layout_error)
        return EXIT_INVALID_BIDS
    try:
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

    # Check every subject before processing any: one run reports every problem to fix, and the
    # subjects that can be processed are (BIDS-Apps practice), whatever the others have.
    families = registered_families()
    subjects, plans, unusable, without_data, collected = [], {}, {}, {}, {}
    for subject, session in selection:
        label = _label(subject, session)
        try:
            inputs = collect_inputs(
                layout, subject, session, derivatives=derivatives, tb1tfl_prep_angle=args.tb1tfl_prep_angle
            )
        except BIDSInputError as error:
            unusable[label] = str(error)
            continue
        collected[(subject, session)] = inputs
        for problem in inputs.problems:
            LOGGER.warning("%s: %s unusable: %s", label, problem.collection, problem.message)
        subject_plans = plan_families(
            inputs, families, {option.dest: getattr(args, option.dest) for f in families for option in f.options}
        )
        plans[(subject, session)] = subject_plans
        if has_maps_to_compute(subject_plans):
            subjects.append(inputs)
            continue
        broken = [problem for problem in inputs.problems if not problem.missing]
        if broken:  # each problem was just logged with its file and fix: name it only
            unusable[label] = "unusable " + ", ".join(problem.collection for problem in broken) + " (see above)"
        elif not inputs.problems:  # too little data (one echo, say)
            # the maps' reasons; a helper's (no B1+ data) only when no map says why
            idle = [plan for plan in subject_plans if not plan.run]
            idle = [plan for plan in idle if not plan.auxiliary] or idle
            unusable[label] = "; ".join(dict.fromkeys(plan.reason for plan in idle))
        else:
            without_data[label] = "; ".join(problem.message for problem in inputs.problems)
    for label, reason in {**unusable, **without_data}.items():
        LOGGER.error("%s cannot be processed: %s", label, reason)
    if not subjects:
        LOGGER.error("no selected subject has data for any map this version computes")
        return EXIT_DATA if unusable else EXIT_NO_INPUT

    # The output gets files only when a subject is published: a run that publishes nothing leaves
    # a new output folder as it found it (absent, and so are the parents made for it: the input's
    # derivatives/ folder, say), and its log in the work directory.
    new_folders = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        folder = work_dir if output_dir.is_dir() else output_dir
        LOGGER.error(
            "cannot create %s: %s%s",
            folder,
            getattr(error, "strerror", None) or error,
            "; choose another work directory with -w" if folder == work_dir else "",
        )
        return EXIT_CANNOT_CREATE
    try:
        lock = _work_dir_lock(work_dir)
        lock.__enter__()
    except BlockingIOError as error:
        LOGGER.error(
            "the work directory %s is in use by %s; wait for that run to end, or give this "
            "run its own work directory with -w",
            work_dir,
            error,
        )
        return EXIT_CANNOT_CREATE
    from .logs import StepReporter, attach_log_file, detach_log_file

    log_file = attach_log_file(work_dir)
    published = False
    failed = None
    reporter = StepReporter()
    started = time.time()
    try:
        LOGGER.info(
            "processing %d subject(s) of %s into %s (work directory %s)", len(subjects), bids_dir, output_dir, work_dir
        )
        if plugin in GRAPH_PLUGINS:
            # The jobs publish after this process has returned.
            write_description(output_dir, bids_dir, argv)
        failed = _execute(args, subjects, plans, output_dir, work_dir, plugin, plugin_args, reporter=reporter)
        if failed is None:
            return 0  # submitted to a batch scheduler as a graph: the outcome is not known here
        return _summarise(subjects, plans, failed, unusable, without_data)
    finally:
        published = any(output_dir.glob("sub-*"))
        if published and plugin not in GRAPH_PLUGINS:
            write_description(output_dir, bids_dir, argv)
        if failed is not None:  # the run ended (an interrupt or a crash of the App itself writes none)
            # A run that published nothing leaves a new output as it found it: its pages go
            # beside its log, in the work directory.
            try:
                _write_reports(
                    output_dir if published else work_dir / "reports",
                    args,
                    argv,
                    work_dir=work_dir,
                    selection=selection,
                    collected=collected,
                    plans=plans,
                    failed=failed,
                    not_processed={**unusable, **without_data},
                    reporter=reporter,
                    crash_since=started,
                    log_file=(output_dir / "logs" / log_file.name) if published else log_file,
                )
            except Exception as error:  # the maps are published: a report bug must not change the outcome
                LOGGER.error("the visual report could not be written: %s", error, exc_info=True)
        detach_log_file(log_file)
        lock.__exit__(None, None, None)
        if published or plugin in GRAPH_PLUGINS:
            (output_dir / "logs").mkdir(exist_ok=True)
            log_file = Path(shutil.copy2(log_file, output_dir / "logs" / log_file.name))
        elif new_folders:
            shutil.rmtree(output_dir, ignore_errors=True)
            # another run may be filling a parent by now: only empty ones go
            with contextlib.suppress(OSError):
                for folder in new_folders[1:]:
                    folder.rmdir()
        LOGGER.info("log file: %s", log_file)


def _summarise(subjects, plans, failed, unusable, without_data):
    """Log what each subject got and return the exit code of the run."""
    LOGGER.info("summary:")
    for inputs in subjects:
        label = _label(inputs.subject, inputs.session)
        subject_plans = plans[(inputs.subject, inputs.session)]
        skipped = "; ".join(f"{plan.name} ({plan.reason})" for plan in subject_plans if not plan.run)
        if label in failed:
            LOGGER.error("  %s: FAILED in %s; nothing published", label, ", ".join(failed[label]))
        else:
            LOGGER.info(
                "  %s: %s written%s",
                label,
                ", ".join(plan.name for plan in subject_plans if plan.run),
                f"; skipped: {skipped}" if skipped else "",
            )
    for label, reason in {**unusable, **without_data}.items():
        LOGGER.error("  %s: not processed: %s", label, reason)
    if failed:
        return EXIT_FAILURE
    if unusable:
        return EXIT_DATA
    return EXIT_NO_INPUT if without_data else 0


def _write_reports(
    root, args, argv, *, work_dir, selection, collected, plans, failed, not_processed, reporter, crash_since, log_file
):
    """The visual report: one page per selected subject (:mod:`qmri_workflows.reports.subject`)."""
    from ..io.staging import unpublished_directory
    from ..reports.subject import RunInfo, StepFailure, SubjectOutcome, crash_messages, write_reports
    from ..workflows.base import map_grid_file
    from ..workflows.registry import quantitative_outputs, registered_families

    families = {family.key: family for family in registered_families()}
    crashes = crash_messages(work_dir / "crash", since=crash_since)
    outcomes = []
    for subject, session in selection:
        label = _label(subject, session)
        inputs = collected.get((subject, session))
        subject_plans = tuple(plans.get((subject, session), ()))
        if label in not_processed:
            status = "not processed"
        elif label in failed or "run" in failed:
            status = "failed"
        else:
            status = "published"
        failures = tuple(
            StepFailure(step, *crashes.get((label, step), ("", "")))
            for step in failed.get(label, failed.get("run", ()))
        )
        quantitative = []
        if inputs is not None and status in ("published", "failed"):
            for plan in subject_plans:
                if plan.run and plan.key in families:
                    quantitative += [output.map_name for output in quantitative_outputs(families[plan.key], inputs)]
        anatomy = None
        if inputs is not None and (inputs.gre or inputs.bssfp):
            anatomy = str(map_grid_file(inputs))
        outcomes.append(
            SubjectOutcome(
                subject=subject,
                session=session,
                status=status,
                plans=subject_plans,
                reason=not_processed.get(label, ""),
                failed_steps=failures,
                finished_steps=tuple(reporter.finished.get(label, ())),
                inputs=inputs,
                quantitative=tuple(quantitative),
                anatomy_file=anatomy,
                nawm_margin_mm=getattr(args, "nawm_margin_mm", 2.0),
                unpublished_dir=str(unpublished_directory(work_dir, subject, session)) if status == "failed" else None,
            )
        )
    run = RunInfo(
        command="qmri-workflows " + " ".join(shlex.quote(a) for a in argv),
        bids_dir=str(args.bids_dir.resolve()),
        output_dir=str(args.output_dir.resolve()),
        options={key: value for key, value in sorted(vars(args).items()) if key not in ("bids_dir", "output_dir")},
        derivatives=tuple(str(path) for path in args.derivatives),
        log_file=str(log_file),
        work_dir=str(work_dir),
    )
    write_reports(root, outcomes, run, workers=args.nprocs)


def _used_collections():
    from ..workflows.registry import registered_families

    return {collection for family in registered_families() for collection in (*family.needs, *family.reads)}


def _existing_outputs(output_dir, inputs):
    folder = output_dir / f"sub-{inputs.subject}"
    if inputs.session:
        folder = folder / f"ses-{inputs.session}"
    if not folder.is_dir():
        return []
    # the report's figures (sub-XX/figures) are redrawn by every run: they are not derivatives
    return sorted(
        path for path in folder.rglob("*") if path.is_file() and path.relative_to(folder).parts[0] != "figures"
    )


def _clean_staging(output_dir, subjects):
    """Remove what failed subjects left staged: the output holds whole subjects only."""
    from ..io.staging import STAGING_FOLDER, staging_directory

    for inputs in subjects:
        shutil.rmtree(staging_directory(output_dir, inputs.subject, inputs.session), ignore_errors=True)
    with contextlib.suppress(OSError):
        (output_dir / STAGING_FOLDER).rmdir()


def _keep_unpublished(output_dir, work_dir, subjects, failed):
    """Move what failed subjects left staged into the work directory (their reports show it, as not
    published); the output holds whole subjects only. A subject that succeeded loses what an
    earlier failed run kept for it."""
    from ..io.staging import keep_unpublished, unpublished_directory

    for inputs in subjects:
        if _label(inputs.subject, inputs.session) in failed or "run" in failed:
            keep_unpublished(output_dir, work_dir, inputs.subject, inputs.session)
        else:
            shutil.rmtree(unpublished_directory(work_dir, inputs.subject, inputs.session), ignore_errors=True)


def _execute(args, subjects, plans, output_dir, work_dir, plugin, plugin_args, *, reporter=None):
    """Build and run the graph; return ``{subject label: [failed steps]}`` (None for graph plugins).

    ``reporter`` (a :class:`~qmri_workflows.cli.logs.StepReporter`, new by default) keeps the steps
    that ran and failed.
    """
    from nipype import config as nipype_config

    from ..io.query import AFI, BSSFP, DAM, GRE, RECEIVE, TFL
    from ..workflows.base import default_options, init_qmri_wf
    from .logs import StepReporter, configure_nipype

    configure_nipype()
    nipype_config.update_config({
        "execution": {
            "crashdump_dir": str(work_dir / "crash"),
            "crashfile_format": "txt",
            "hash_method": "timestamp",
            "stop_on_first_crash": args.stop_on_first_crash,
            "remove_unnecessary_outputs": False,
        },
        "monitoring": {"enabled": False},
    })  # fmt: skip
    options = {dest: getattr(args, dest) for dest in default_options()}
    workflow, _ = init_qmri_wf(
        subjects=subjects,
        output_dir=str(output_dir),
        work_dir=str(work_dir),
        options=options,
        omp_nthreads=args.omp_nthreads or min(args.nprocs, 8),
    )
    if plugin in ("MultiProc", "LegacyMultiProc", "Linear"):
        # A pass over the graph costs well under a millisecond: look often (see
        # workflows.base.POLL_SECONDS); batch plugins query their scheduler at each pass.
        workflow.config["execution"]["poll_sleep_duration"] = 0.01
    used = _used_collections()
    for inputs in subjects:
        label = _label(inputs.subject, inputs.session)
        LOGGER.info("%s plan:\n  %s", label, "\n  ".join(str(plan) for plan in plans[(inputs.subject, inputs.session)]))
        unused = [
            collection
            for collection in (GRE, BSSFP, AFI, DAM, TFL, RECEIVE)
            if inputs.has(collection) and collection not in used
        ]
        if unused:
            LOGGER.info("%s: %s data present; no map of this version uses them yet", label, ", ".join(unused))
        existing = _existing_outputs(output_dir, inputs)
        if existing:
            LOGGER.warning(
                "%s: %d file(s) from an earlier run will be replaced when this run publishes (%s ...)",
                label,
                len(existing),
                existing[0].name,
            )

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
    reporter = StepReporter() if reporter is None else reporter
    if plugin not in GRAPH_PLUGINS:
        plugin_args.setdefault("status_callback", reporter)

    runner = _plugin_instance(plugin, plugin_args)
    try:
        workflow.run(plugin=runner)
    except KeyboardInterrupt:
        # Ending the workers breaks the futures Nipype still waits on; their callbacks' errors
        # are expected now and would only bury the one line the user needs.
        logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL)
        _stop_workers(runner)
        _clean_staging(output_dir, subjects)
        raise
    except Exception as error:  # nipype raises RuntimeError listing the crashed nodes
        LOGGER.error("processing failed: %s\nCrash files are in %s", str(error).splitlines()[0], work_dir / "crash")
        if not reporter.failed:
            reporter.failed["run"] = ["(see the crash files)"]
    finally:
        _stop_workers(runner)
    if plugin in GRAPH_PLUGINS:
        LOGGER.info(
            "the whole graph was submitted to the scheduler as dependent jobs; each "
            "subject's derivatives appear in %s when its last job finishes",
            output_dir,
        )
        return None
    _keep_unpublished(output_dir, work_dir, subjects, reporter.failed)
    return reporter.failed


def _plugin_instance(plugin, plugin_args):
    """The Nipype plugin object; MultiProc workers leave Ctrl-C to the main process."""
    from nipype.pipeline import plugins

    if plugin == "MultiProc":
        return _QuietMultiProcPlugin(plugin_args=plugin_args)
    return getattr(plugins, f"{plugin}Plugin")(plugin_args=plugin_args)


def _ignore_interrupt(cwd):
    import signal

    from nipype.pipeline.plugins.multiproc import process_initializer

    # The main process handles Ctrl-C and ends the workers: no traceback from each of them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    process_initializer(cwd)


def _quiet_multiproc_class():
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import numpy as np
    from nipype.pipeline.plugins import MultiProcPlugin

    class QuietMultiProcPlugin(MultiProcPlugin):
        """Nipype's MultiProc whose worker processes ignore SIGINT and whose scheduler sleeps while
        only the workers can make progress."""

        def __init__(self, plugin_args=None):
            super().__init__(plugin_args=plugin_args)
            self.pool.shutdown(wait=True)
            self.pool = ProcessPoolExecutor(
                max_workers=self.processors, initializer=_ignore_interrupt, initargs=(self._cwd,)
            )

        def _send_procs_to_workers(self, updatehash=False, graph=None):
            super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
            # Nipype's scheduler passes over the graph every poll_sleep_duration (10 ms here, so that
            # chains of quick local nodes go fast); each pass costs about a millisecond of CPU, which
            # over a minute-long fit took 5 s from the workers. When nothing ready can start (no job
            # ready, or no free processor), only a worker finishing changes that: wait for it.
            if not self._task_obj:
                return
            ready = np.flatnonzero(~self.proc_done & (self.depidx.sum(axis=0) == 0).__array__())
            _, free_processors, _ = self._check_resources(self.pending_tasks)
            if len(ready) == 0 or free_processors == 0:
                wait(list(self._task_obj.values()), timeout=1.0, return_when=FIRST_COMPLETED)

    return QuietMultiProcPlugin


def _QuietMultiProcPlugin(plugin_args):  # noqa: N802 - stands for the class, built on first use
    return _quiet_multiproc_class()(plugin_args=plugin_args)


def _stop_workers(runner):
    pool = getattr(runner, "pool", None)
    if pool is None:
        return
    # After a shutdown the executor forgets its processes (None).
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    sys.exit(main())
