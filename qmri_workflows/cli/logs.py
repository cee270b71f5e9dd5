"""What the BIDS App tells its user: console and log-file messages, step timing, the run summary.

The App's own logger (``qmri_workflows``) says what matters: the plan, one line per processing step
with its duration, and a summary. Nipype's per-node chatter is shown only with ``-v``; warnings and
errors always are. Everything the console shows also goes to a log file in ``OUTPUT_DIR/logs/``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("qmri_workflows")
_FORMAT = "%(asctime)s [qmri-workflows] %(levelname)s: %(message)s"
_NIPYPE_LOGGERS = ("nipype.workflow", "nipype.interface", "nipype.utils", "nipype.filemanip")

__all__ = ["StepReporter", "attach_log_file", "configure_console", "configure_nipype", "subject_of_node"]


def configure_console(verbosity=0, quiet=0):
    """Console messages: INFO by default, DEBUG with ``-v``, WARNING with ``-q``, ERROR with ``-qq``.

    Nipype's node messages are raised to WARNING unless ``verbosity`` is 1 or more. Nipype takes half
    a second to import, so when it is not imported yet its levels are set by
    :func:`configure_nipype`, which the App calls before it builds the workflow.
    """
    global _nipype_level

    level = logging.INFO
    if verbosity:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING if quiet == 1 else logging.ERROR
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        LOGGER.addHandler(handler)
        # Our own handler only: Nipype logs its nodes through its own handlers.
        LOGGER.propagate = False
    LOGGER.setLevel(level)
    _nipype_level = "INFO" if verbosity == 1 else "DEBUG" if verbosity > 1 else "WARNING"
    if quiet:
        _nipype_level = "ERROR"
    if "nipype" in sys.modules:
        configure_nipype()


_nipype_level = "WARNING"


def configure_nipype():
    """Give Nipype's loggers the level :func:`configure_console` chose (imports Nipype)."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_config.update_config(
        {"logging": {"workflow_level": _nipype_level, "interface_level": _nipype_level, "utils_level": _nipype_level}}
    )
    nipype_logging.update_logging(nipype_config)


def attach_log_file(folder):
    """Also write the App's and Nipype's messages to ``<folder>/logs/qmri-workflows_<time>_<pid>.log``.

    Returns
    -------
    Path
        The log file.
    """
    folder = Path(folder) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"qmri-workflows_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT.replace("[qmri-workflows]", "[%(name)s]")))
    handler.setLevel(logging.DEBUG)
    LOGGER.addHandler(handler)
    for name in _NIPYPE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return path


def detach_log_file(path):
    """Close the handler :func:`attach_log_file` made for ``path``."""
    for logger in (LOGGER, *(logging.getLogger(name) for name in _NIPYPE_LOGGERS)):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == Path(path).resolve():
                logger.removeHandler(handler)
                handler.close()


def subject_of_node(fullname):
    """``sub-XX[ ses-YY]`` from a node's full name (``qmri_wf.sub_XX_ses_YY_wf.<...>``), else ''."""
    for part in fullname.split("."):
        if part.startswith("sub_") and part.endswith("_wf"):
            label = part[: -len("_wf")]
            subject, _, session = label[len("sub_") :].partition("_ses_")
            return f"sub-{subject}" + (f" ses-{session}" if session else "")
    return ""


class StepReporter:
    """Nipype ``status_callback``: one line per processing step with its duration; failures kept.

    Nodes that only move data (identity nodes, sinks, merges: those run without submitting) are
    reported at DEBUG level only.
    """

    def __init__(self):
        self._started = {}
        self.failed = {}
        # {subject: [(step, seconds)]} of the steps that ran (for the visual report)
        self.finished = {}

    def __call__(self, node, status):
        name = node.fullname
        if status == "start":
            self._started[name] = time.monotonic()
            return
        elapsed = time.monotonic() - self._started.pop(name, time.monotonic())
        subject = subject_of_node(name)
        step = name.split(".", 2)[-1] if subject else name
        if status == "exception":
            self.failed.setdefault(subject, []).append(step)
            LOGGER.error("%s: step %s failed after %.1f s", subject or "run", step, elapsed)
            return
        level = logging.DEBUG if node.run_without_submitting else logging.INFO
        if not node.run_without_submitting:
            self.finished.setdefault(subject, []).append((step, elapsed))
        LOGGER.log(level, "%s: %s done in %.1f s", subject or "run", step, elapsed)
