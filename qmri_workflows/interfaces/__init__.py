"""Nipype interfaces: load NIfTI + sidecars, call :mod:`qmri_workflows.core`, save results."""
