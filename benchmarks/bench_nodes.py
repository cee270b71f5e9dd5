"""Re-run nodes of a finished App run, each alone in a fresh process: wall, CPU seconds, peak memory.

The App leaves every node's pickled inputs in its working directory (``-w``); this runs a node's
interface again on exactly those inputs, in a new folder, so one step can be timed and profiled
without the rest of the graph and without the other nodes competing for the cores::

    python benchmarks/bench_pipeline.py --dataset /tmp/qmri-bench/phantom --workdir /tmp/qmri-bench/app --app-only
    python benchmarks/bench_nodes.py /tmp/qmri-bench/app/work r2_wf/band_free r2_wf/fit_despot2 --repeat 3

Nodes are named ``workflow/node`` under the subject's workflow folder (``qsm`` runs the QSM chain,
``r2``, ``r1`` the R1/B1+/PD steps). Each run reports the wall seconds, the CPU seconds of all the
process's threads and the process's peak resident memory (``VmHWM``, the figure ``mem_gb`` must
cover; it includes the ~0.2 GB of the interpreter and the imported packages) while the interface
runs; imports the interface makes on first use count, as they do in a fresh worker. On a shared
machine the CPU seconds are the stable figure; ``--repeat`` keeps the best wall time.
``--profile FILE`` writes a cProfile of the (last) run of each node to ``FILE.<node>.prof``.

Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GROUPS = {
    "r2": ("r2_wf/band_free", "r2_wf/fit_despot2"),
    "r1": ("b1_wf/afi_b1", "r1_wf/fit_r1", "pd_wf/receive_sensitivity", "pd_wf/calibrate_pd"),
    "qsm": (
        "qsm_wf/total_field",
        "qsm_wf/qsm_mask",
        "qsm_wf/remove_background",
        "qsm_wf/invert_dipole",
        "qsm_wf/reference",
    ),
}

RUN_NODE = r"""
import cProfile, json, re, sys, time
from nipype.utils.filemanip import loadpkl
node = loadpkl(sys.argv[1])
interface = node.interface
profile = cProfile.Profile() if sys.argv[3] else None
start, start_cpu = time.perf_counter(), time.process_time()
if profile:
    profile.enable()
interface.run(cwd=sys.argv[2])
if profile:
    profile.disable()
    profile.dump_stats(sys.argv[3])
wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
status = open("/proc/self/status").read()
peak_kb = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
print(json.dumps({"wall": wall, "cpu": cpu, "peak_gb": peak_kb / 2**20,
                  "mem_gb": node.mem_gb, "n_procs": node.n_procs}))
"""


def node_folder(workdir, name):
    """The folder of node ``workflow/node`` of the (single) subject under the App's working dir."""
    matches = sorted(Path(workdir).glob(f"qmri_wf/sub_*_wf/{name}/_node.pklz"))
    if not matches:
        raise SystemExit(f"no node {name} under {workdir}/qmri_wf/sub_*_wf (finished App run with -w?)")
    return matches[0].parent


def run_node(folder, profile=None):
    """Wall, CPU, peak GB (and the node's declared mem_gb, n_procs) of one run in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="bench-node-") as cwd:
        result = subprocess.run(
            [sys.executable, "-c", RUN_NODE, str(folder / "_node.pklz"), cwd, profile or ""],
            capture_output=True,
            text=True,
            env={**os.environ, "NIPYPE_NO_ET": "1"},
        )
    if result.returncode:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"{folder} failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="the App's working directory (-w)")
    parser.add_argument("nodes", nargs="+", help=f"workflow/node names or groups {sorted(GROUPS)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs per node; the best wall and CPU are kept")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile statistics to FILE.<node>.prof")
    args = parser.parse_args(argv)
    names = [name for entry in args.nodes for name in GROUPS.get(entry, (entry,))]
    print(f"{os.cpu_count()} cores, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"{'node':<28} {'wall s':>7} {'CPU s':>7} {'peak GB':>8} {'mem_gb':>7} {'n_procs':>7}")
    totals = [0.0, 0.0, 0.0]
    for name in names:
        folder = node_folder(args.workdir, name)
        runs = []
        for _ in range(args.repeat):
            profile = f"{args.profile}.{name.replace('/', '.')}.prof" if args.profile else None
            runs.append(run_node(folder, profile))
        wall = min(run["wall"] for run in runs)
        cpu = min(run["cpu"] for run in runs)
        peak = max(run["peak_gb"] for run in runs)
        totals = [totals[0] + wall, totals[1] + cpu, max(totals[2], peak)]
        print(f"{name:<28} {wall:7.1f} {cpu:7.1f} {peak:8.2f} {runs[0]['mem_gb']:7.2f} {runs[0]['n_procs']:7d}")
    print(f"{'sum (peak: largest)':<28} {totals[0]:7.1f} {totals[1]:7.1f} {totals[2]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
