"""The Nipype workflow class of the top-level workflows (:func:`~.base.init_single_subject_wf`,
:func:`~.base.init_qmri_wf`).

The class is built on first use (module ``__getattr__``): the map registry imports every module of
this package to find the map families, and importing Nipype there would cost the App's ``--help``
and first line half a second.
"""

from __future__ import annotations

import gc

__all__ = ["QMRIWorkflow"]  # noqa: F822 - provided by the module __getattr__ below


def _workflow_class():
    from nipype.pipeline import engine as pe

    class QMRIWorkflow(pe.Workflow):
        """A Nipype ``Workflow`` whose :meth:`run` keeps the garbage collector off existing objects.

        Nipype's MultiProc plugin calls ``gc.collect()`` at every pass of its scheduler that may
        submit a job. With Nipype, pybids and SQLAlchemy loaded, one full collection takes 0.1-0.2 s
        of the main process; on the shipped two-subject example these calls took 5.9 s, as much CPU
        as all the processing. ``gc.freeze()`` moves every object that exists when the run starts to
        a generation the collector skips, so each collection scans only what the run allocates.
        """

        def run(self, plugin=None, plugin_args=None, updatehash=False):
            already_frozen = gc.get_freeze_count() > 0
            gc.freeze()
            try:
                return super().run(plugin=plugin, plugin_args=plugin_args, updatehash=updatehash)
            finally:
                if not already_frozen:
                    gc.unfreeze()

    # picklable by reference, as if defined at module level
    QMRIWorkflow.__module__, QMRIWorkflow.__qualname__ = __name__, "QMRIWorkflow"
    return QMRIWorkflow


def __getattr__(name):
    if name == "QMRIWorkflow":
        cls = globals()["QMRIWorkflow"] = _workflow_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
