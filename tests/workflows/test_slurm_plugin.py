"""Run the project's R2* workflow through a real SLURM cluster (Nipype's SLURM plugins).

Start a local cluster first with ``tools/slurm/start-local-slurm.sh`` (root, Debian). Without
``sbatch`` these tests skip, unless ``QMRI_REQUIRE_SLURM=1`` (set in CI), which makes them fail.

The echoes are closed-form mono-exponential decays, so the fitted R2* must equal the truth to
float32 precision. Each test also checks that every computing node ran as a SLURM job that completed on
this machine, and that the memory ``batch_resources`` derived from ``mem_gb`` was the memory the
scheduler allocated to the fitting job.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.utility import IdentityInterface

import qmri_workflows
from qmri_workflows.cli.run import batch_resources
from qmri_workflows.workflows.r2star import init_brain_mask_wf, init_r2star_wf
from tests.bids_factory import write_image

pytestmark = pytest.mark.slurm  # about 7 s per test on 2 cores

SHAPE = (32, 32, 20)  # 1.5 x 1.5 x 2 mm voxels (bids_factory's affine)
VOXEL_MM = (1.5, 1.5, 2.0)
HEAD_SEMI_AXES_MM = (18.0, 18.0, 14.0)
FLIP_ANGLES = (4.0, 20.0)
ECHO_TIMES = (0.003, 0.007, 0.011, 0.015, 0.019)
# batch_resources asks for mem_gb * 1024 + 256 MB: 768M and 563M, which SLURM cannot round to G
# (denoise: 665M); every other node runs inside the submitting process
MEM_GB = {"fit_r2star": 0.5, "brain_mask": 0.3, "denoise": 0.4}
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
JOB_TIMEOUT_S = 300


def _require_slurm():
    """Skip (or fail, when ``QMRI_REQUIRE_SLURM=1``) unless a SLURM controller answers."""
    required = os.environ.get("QMRI_REQUIRE_SLURM") == "1"
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch not found (start a cluster with tools/slurm/start-local-slurm.sh)"
    else:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
        if "UP" not in ping.stdout:
            problem = f"the SLURM controller does not answer: {ping.stdout.strip()} {ping.stderr.strip()}"
    if problem:
        if required:
            pytest.fail(f"QMRI_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


@pytest.fixture
def slurm_env(monkeypatch):
    """Environment the batch jobs inherit: LOGNAME (Nipype names jobs after it) and PYTHONPATH.

    sbatch exports the submitting environment, so putting this checkout first on PYTHONPATH makes
    the jobs unpickle the same ``qmri_workflows`` the test imported.
    """
    _require_slurm()
    if not os.environ.get("LOGNAME"):
        import getpass

        monkeypatch.setenv("LOGNAME", getpass.getuser())
    package_root = str(Path(qmri_workflows.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))


def _write_echoes(folder):
    """Noise-free echoes S = S0(flip) exp(-R2* TE) of an ellipsoidal "head" in dim air.

    Returns the files, their TEs and flip angles, the true R2* and the head's voxels.
    """
    grid = np.indices(SHAPE, dtype=float)
    radius = np.sqrt(sum(
        ((grid[axis] - (SHAPE[axis] - 1) / 2) * VOXEL_MM[axis] / HEAD_SEMI_AXES_MM[axis]) ** 2
        for axis in range(3)
    ))  # fmt: skip
    head = radius <= 1.0
    rng = np.random.default_rng(7)
    r2star = rng.uniform(5.0, 80.0, size=SHAPE)  # s^-1, white matter to iron-rich deep grey
    files, echo_times, flip_angles = [], [], []
    for flip_index, flip in enumerate(FLIP_ANGLES, start=1):
        s0 = np.where(head, rng.uniform(500.0, 2000.0, size=SHAPE), rng.uniform(5.0, 20.0, size=SHAPE))
        for echo_index, te in enumerate(ECHO_TIMES, start=1):
            path = folder / f"echo-{echo_index}_flip-{flip_index}.nii.gz"
            write_image(path, s0 * np.exp(-r2star * te), shape=SHAPE)
            files.append(str(path))
            echo_times.append(te)
            flip_angles.append(flip)
    return files, echo_times, flip_angles, r2star, head


def _build_workflow(tmp_path, name, plugin="SLURM"):
    """Brain mask, then the noise map and the masked R2* fit: three batch jobs in a chain.

    No denoising, so the noise-free echoes reach the fit unchanged and it must be exact.
    """
    from nipype.pipeline import engine as pe

    files, echo_times, flip_angles, truth, head = _write_echoes(tmp_path)
    mask_wf = init_brain_mask_wf(mem_gb=MEM_GB["brain_mask"])
    fit_wf = init_r2star_wf(method="wls", denoise="none", mem_gb=MEM_GB["fit_r2star"], denoise_mem_gb=MEM_GB["denoise"])
    workflow = pe.Workflow(name=name, base_dir=str(tmp_path / "work"))  # same machine as slurmd
    workflow.connect(mask_wf, "outputnode.mask_file", fit_wf, "inputnode.mask_file")
    workflow.config["execution"].update(
        {"poll_sleep_duration": 1, "crashfile_format": "txt", "crashdump_dir": str(tmp_path / "crash")}
    )
    first_echoes = [f for f, te in zip(files, echo_times) if te == ECHO_TIMES[0]]
    mask_wf.inputs.inputnode.in_files = first_echoes
    fit_wf.inputs.inputnode.magnitude_files = files
    fit_wf.inputs.inputnode.echo_times = echo_times
    fit_wf.inputs.inputnode.flip_angles = flip_angles
    batch_resources(workflow, plugin)
    return workflow, truth, head


def _requested(workflow, plugin="SLURM"):
    """(sbatch_args, MB, CPUs) that batch_resources set on each submitted node, by node name.

    SLURM runs light nodes (metadata merges) in the submitting process; SLURMGraph submits them.
    """
    requests = {}
    for node in workflow._get_all_nodes():
        if isinstance(node.interface, IdentityInterface):
            continue
        if node.run_without_submitting and plugin == "SLURM":
            continue
        args = node.plugin_args["sbatch_args"]
        mem = re.search(r"--mem=(\d+)M", args)
        cpus = re.search(r"--cpus-per-task=(\d+)", args)
        assert mem and cpus, f"batch_resources gave {node.name} no --mem/--cpus-per-task: {args!r}"
        # appended to the user's own sbatch arguments, not replacing them
        assert node.plugin_args["overwrite"] is False
        assert int(mem.group(1)) == int(MEM_GB.get(node.name, node.mem_gb) * 1024) + 256
        requests[node.name] = (args, int(mem.group(1)), int(cpus.group(1)))
    assert set(MEM_GB) <= set(requests), f"nodes found: {sorted(requests)}"
    return requests


def _show_job(job_id):
    """``scontrol show job`` as a dict (finished jobs stay listed for MinJobAge seconds)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"job {job_id} unknown to SLURM: {result.stderr.strip()}"
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)


def _jobs_with_output_under(folder):
    """All jobs SLURM still lists whose stdout file lies under ``folder``."""
    result = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True)
    jobs = []
    for line in result.stdout.splitlines():
        job = dict(field.split("=", 1) for field in line.split() if "=" in field)
        if job.get("StdOut", "").startswith(str(folder)):
            jobs.append(job)
    return jobs


def _memory_mb(value):
    """SLURM memory such as '768M' or '1G' in MB."""
    number, unit = re.fullmatch(r"([\d.]+)([KMGT]?)", value).groups()
    return float(number) * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2, "": 1}[unit]


def _node_name(job_name):
    """Node of a job: SLURM names jobs '<node>.<workflows>.<user>', SLURMGraph 'j<index>_<node>'."""
    return job_name.split(".")[0] if "." in job_name else re.sub(r"^j\d+_", "", job_name)


def _check_jobs(jobs, requests):
    """One completed job per node on this host, allocated the memory and CPUs batch_resources set."""
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    by_node = {_node_name(job["JobName"]): job for job in jobs}
    assert sorted(by_node) == sorted(requests) and len(jobs) == len(requests), (
        f"jobs {[job['JobName'] for job in jobs]} do not match the nodes {sorted(requests)}"
    )
    for node_name, (_, mem_mb, cpus) in requests.items():
        job = by_node[node_name]
        what = f"job {job['JobId']} ({job['JobName']})"
        assert job["JobState"] == "COMPLETED", f"{what}: {job['JobState']} {job.get('Reason')}"
        assert job["ExitCode"] == "0:0", f"{what}: exit code {job['ExitCode']}"
        assert job["NodeList"] == host, f"{what} ran on {job['NodeList']}"
        assert _memory_mb(job["MinMemoryNode"]) == mem_mb, (
            f"{what} asked for --mem={mem_mb}M, SLURM recorded MinMemoryNode={job['MinMemoryNode']}"
        )
        assert f"mem={job['MinMemoryNode']}" in job["TRES"], f"{what}: allocated TRES {job['TRES']}"
        assert int(job["NumCPUs"]) == cpus, f"{what}: {job['NumCPUs']} CPUs, asked for {cpus}"


def _check_maps(workflow, truth, head):
    node_dir = Path(workflow.base_dir) / workflow.name
    mask = np.asarray(nib.load(node_dir / "brain_mask_wf" / "brain_mask" / "brain_mask.nii").dataobj) > 0
    # the ellipsoid is the only bright object: the mask must cover most of it and nothing else
    assert (mask & ~head).sum() == 0, f"{(mask & ~head).sum()} mask voxels outside the head"
    assert (mask & head).sum() >= 0.9 * head.sum(), f"mask {mask.sum()} of {head.sum()} head voxels"
    r2star_file = node_dir / "r2star_wf" / "fit_r2star" / "R2starmap.nii"
    fitted = np.asarray(nib.load(r2star_file).dataobj)
    # Noise-free data: the log-linear fit is exact; float32 images bound the error at ~1e-6
    # relative per echo, i.e. ~1e-6 / TE-span (16 ms) ~ 1e-4 s^-1 in R2*.
    np.testing.assert_allclose(fitted[mask], truth[mask], rtol=1e-4, atol=1e-3)
    assert np.all(fitted[~mask] == 0), "R2* written outside the brain mask"


def test_r2star_workflow_on_slurm(tmp_path, slurm_env):
    workflow, truth, head = _build_workflow(tmp_path, "slurm_r2star")
    requests = _requested(workflow)

    # A user's own scheduler arguments (here a time limit) must reach every job as well.
    workflow.run(plugin="SLURM", plugin_args={"retry_timeout": 2, "max_tries": 2, "sbatch_args": "--time=10"})

    batch_dir = Path(workflow.base_dir) / workflow.name / "batch"
    job_ids = sorted(
        int(m.group(1)) for out in batch_dir.glob("slurm-*.out") if (m := re.fullmatch(r"slurm-(\d+)\.out", out.name))
    )
    jobs = [_show_job(job_id) for job_id in job_ids]
    _check_jobs(jobs, requests)
    assert all(job["TimeLimit"] == "00:10:00" for job in jobs), [job["TimeLimit"] for job in jobs]
    _check_maps(workflow, truth, head)


def test_r2star_workflow_on_slurm_graph(tmp_path, slurm_env):
    """SLURMGraph submits the whole graph at once with afterok dependencies, then returns."""
    workflow, truth, head = _build_workflow(tmp_path, "slurm_graph_r2star", plugin="SLURMGraph")
    requests = _requested(workflow, plugin="SLURMGraph")

    workflow.run(plugin="SLURMGraph", plugin_args={"dont_resubmit_completed_jobs": False})

    batch_dir = Path(workflow.base_dir) / workflow.name / "batch"
    submitted = (batch_dir / "submit_jobs.sh").read_text()
    for node_name, (args, _, _) in requests.items():
        lines = [line for line in submitted.splitlines() if f"_{node_name}=$(sbatch" in line]
        assert len(lines) == 1 and args in lines[0], f"{node_name} in submit_jobs.sh:\n{submitted}"
    fit_line = next(line for line in submitted.splitlines() if "_fit_r2star=$(sbatch" in line)
    assert "--dependency=afterok:" in fit_line

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        jobs = _jobs_with_output_under(batch_dir)
        if len(jobs) == len(requests) and all(job["JobState"] in TERMINAL_STATES for job in jobs):
            break
        assert time.monotonic() < deadline, f"jobs not finished after {JOB_TIMEOUT_S} s: {jobs}"
        time.sleep(1)
    _check_jobs(jobs, requests)
    _check_maps(workflow, truth, head)


def test_the_app_on_slurm_reports_steps_and_publishes_each_subject(tmp_path, slurm_env, caplog):
    """The BIDS App with --plugin SLURM: step lines from the batch jobs, one commit per subject."""
    from qmri_workflows.cli import run
    from tests.bids_factory import make_vfa_dataset

    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02"), phase=False)  # no QSM
    code = run.main(
        [
            str(raw),
            str(tmp_path / "out"),
            "participant",
            "--skip-bids-validation",
            "--plugin",
            "SLURM",
            "-w",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    for subject in ("01", "02"):
        assert (tmp_path / "out" / f"sub-{subject}" / "anat" / f"sub-{subject}_R2starmap.nii.gz").is_file()
        assert f"sub-{subject}: r2star_wf.fit_r2star done in" in caplog.text
    # one job per computing step of each subject; metadata merges and sinks stay in this process
    scripts = [p.name for p in (tmp_path / "work").rglob("batch/batchscript_*.sh")]
    steps = (
        "brain_mask_wf_brain_mask", "r2star_wf_denoise", "r2star_wf_fit_r2star", "r1_wf_estimate_b1",
        "r1_wf_fit_r1", "pd_wf_calibrate_pd", "analysis_wf_analysis",
    )  # fmt: skip
    expected = sorted(f"sub_{subject}_wf.{step}" for subject in ("01", "02") for step in steps)
    submitted = sorted(re.sub(r"^batchscript_pyscript_\d+_\d+_qmri_wf\.|\.sh$", "", name) for name in scripts)
    assert submitted == expected
    assert len(list((tmp_path / "work").rglob("batch/slurm-*.out"))) == len(expected)
