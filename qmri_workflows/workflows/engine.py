"""The Nipype workflow class of the top-level workflows (:func:`~.base.init_single_subject_wf`,
:func:`~.base.init_qmri_wf`)."""

from __future__ import annotations

import gc

from nipype.pipeline import engine as pe

__all__ = ["QMRIWorkflow"]


class QMRIWorkflow(pe.Workflow):
    """A Nipype ``Workflow`` whose :meth:`run` keeps the garbage collector off the objects built so far.

    Nipype's MultiProc plugin calls ``gc.collect()`` at every pass of its scheduler that may submit
    a job. With Nipype, pybids and SQLAlchemy loaded, one full collection takes 0.1-0.2 s of the main
    process; on the shipped two-subject example these calls took 5.9 s, as much CPU as all the
    processing. ``gc.freeze()`` moves every object that exists when the run starts to a generation
    the collector skips, so each collection only scans what the run itself allocates.
    """

    def run(self, plugin=None, plugin_args=None, updatehash=False):
        already_frozen = gc.get_freeze_count() > 0
        gc.freeze()
        try:
            return super().run(plugin=plugin, plugin_args=plugin_args, updatehash=updatehash)
        finally:
            if not already_frozen:
                gc.unfreeze()
