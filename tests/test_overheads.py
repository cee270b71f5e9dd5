"""Costs around the fits that once dominated a run (issue 7, item 13), each bounded by a count.

Counts, not timings: the machines that run the tests are shared and their timings vary tenfold.
"""

import gc
import subprocess
import sys
from pathlib import Path

from sqlalchemy import event

from qmri_workflows.io.query import collect_inputs, open_layout, select_participants

EXAMPLE = Path(__file__).resolve().parent.parent / "bids_example"


def test_a_subject_is_collected_with_a_few_index_queries():
    layout = open_layout(EXAMPLE)
    statements = []
    engine = layout.session.get_bind()
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        pairs = select_participants(layout)
        inputs = [collect_inputs(layout, subject, session) for subject, session in pairs]
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert [i.subject for i in inputs] == ["01", "02"] and all(i.gre for i in inputs)
    # One query per file and entity made this ~900 statements per subject; now a handful.
    assert len(statements) <= 1 + 10 * len(pairs), len(statements)


def test_help_imports_neither_nipype_nor_the_imaging_libraries():
    code = (
        "import sys\nfrom qmri_workflows.cli.run import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('nipype', 'bids', 'nibabel', 'scipy', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_workflow_runs_with_the_existing_objects_frozen(tmp_path):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    from qmri_workflows.workflows.engine import QMRIWorkflow

    def frozen_count():
        import gc

        return gc.get_freeze_count()

    workflow = QMRIWorkflow(name="frozen", base_dir=str(tmp_path))
    node = pe.Node(Function(function=frozen_count, output_names=["count"]), name="probe")
    workflow.add_nodes([node])
    result = workflow.run(plugin="Linear")
    (probe,) = [n for n in result.nodes() if n.name == "probe"]
    # MultiProc's gc.collect() at each scheduler pass skips what existed before the run.
    assert probe.result.outputs.count > 0
    assert gc.get_freeze_count() == 0  # unfrozen afterwards


def test_multiproc_scheduler_sleeps_while_only_workers_can_progress(tmp_path):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    from qmri_workflows.cli.run import _plugin_instance, _stop_workers
    from qmri_workflows.workflows.engine import QMRIWorkflow

    def pause(seconds):
        import time

        time.sleep(seconds)
        return seconds

    def identity(value):
        return value

    workflow = QMRIWorkflow(name="slow", base_dir=str(tmp_path))
    workflow.config["execution"]["crashdump_dir"] = str(tmp_path)  # never beside the sources
    workflow.config["execution"]["poll_sleep_duration"] = 0.01  # as the App sets it
    slow = pe.Node(Function(function=pause, output_names=["out"]), name="slow")
    slow.inputs.seconds = 1.5
    quick = pe.Node(Function(function=identity, output_names=["out"]), name="quick", run_without_submitting=True)
    workflow.connect(slow, "out", quick, "value")
    runner = _plugin_instance("MultiProc", {"n_procs": 2})
    passes = []
    send = runner._send_procs_to_workers
    runner._send_procs_to_workers = lambda *args, **kwargs: (passes.append(1), send(*args, **kwargs))
    try:
        result = workflow.run(plugin=runner)
    finally:
        _stop_workers(runner)
    assert {node.name for node in result.nodes()} == {"slow", "quick"}
    # Polling every 10 ms made ~150 passes over the 1.5 s of the worker's node.
    assert len(passes) < 20, len(passes)
