"""Time the visual report adds to a run of the App (default: the shipped example, 2 subjects at 4 mm)::

    python benchmarks/bench_report.py [--bids-dir bids_example] [--workdir /tmp/qmri-bench-report]

Runs the participant level once (maps, tables and reports), then draws the reports again on the
published output, sequentially (wall and CPU time per subject, in this process) and with one worker
per core, as the App does. CPU time is the figure to compare across machines: the shared test
machines' wall times vary with their load. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _outcomes(bids_dir, out, derivatives):
    from qmri_workflows.io.query import collect_inputs, open_derivatives, open_layout, select_participants
    from qmri_workflows.reports.subject import SubjectOutcome
    from qmri_workflows.workflows.base import map_grid_file
    from qmri_workflows.workflows.registry import plan_families, quantitative_outputs, registered_families

    layout = open_layout(bids_dir)
    found = open_derivatives(derivatives)
    families = registered_families()
    outcomes = []
    for subject, session in select_participants(layout):
        inputs = collect_inputs(layout, subject, session, derivatives=found)
        plans = plan_families(inputs, families)
        maps = [o.map_name for f, p in zip(families, plans) if p.run for o in quantitative_outputs(f, inputs)]
        outcomes.append(
            SubjectOutcome(
                subject,
                session,
                "published",
                tuple(plans),
                inputs=inputs,
                quantitative=tuple(maps),
                anatomy_file=str(map_grid_file(inputs)),
            )
        )
    return outcomes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bids-dir", type=Path, default=REPO / "bids_example")
    parser.add_argument("--derivatives", type=Path, nargs="*", default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmri-bench-report"))
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    derivatives = args.derivatives
    if derivatives is None:
        default = args.bids_dir / "derivatives" / "phantom"
        derivatives = [default] if default.is_dir() else []
    shutil.rmtree(args.workdir, ignore_errors=True)
    out, work = args.workdir / "out", args.workdir / "work"

    from qmri_workflows.cli import run

    command = [str(args.bids_dir), str(out), "participant", "--skip-bids-validation", "-w", str(work)]
    command += ["--nprocs", str(args.nprocs)]
    if derivatives:
        command += ["--derivatives", *map(str, derivatives)]
    started, cpu = time.perf_counter(), time.process_time()
    code = run.main(command)
    run_wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the App failed (exit code {code})")
    logging.getLogger("qmri_workflows").setLevel(logging.WARNING)

    from qmri_workflows.reports.subject import RunInfo, write_reports, write_subject_report

    outcomes = _outcomes(args.bids_dir, out, derivatives)
    info = RunInfo(" ".join(command), str(args.bids_dir), str(out))
    rows = []
    for outcome in outcomes:
        started, cpu = time.perf_counter(), time.process_time()
        write_subject_report(out, outcome.subject, [outcome], info)
        rows.append((outcome.subject, time.perf_counter() - started, time.process_time() - cpu))
    started = time.perf_counter()
    write_reports(out, outcomes, info, workers=args.nprocs)
    parallel = time.perf_counter() - started
    figures = sum(len(list((out / f"sub-{o.subject}" / "figures").glob("*.png"))) for o in outcomes)

    print(f"\nApp run (maps, tables and reports), {len(outcomes)} subject(s): {run_wall:.1f} s wall")
    print("| subject | report wall (s) | report CPU (s) |")
    print("|---|---|---|")
    for subject, wall, cpu in rows:
        print(f"| sub-{subject} | {wall:.2f} | {cpu:.2f} |")
    print(f"all subjects with {args.nprocs} worker(s), as the App draws them: {parallel:.2f} s wall; {figures} figures")
    print("(the first subject's time includes importing matplotlib)")


if __name__ == "__main__":
    main()
