"""R2*/T2* mapping and brain masking workflows."""

from __future__ import annotations


def init_brain_mask_wf(*, mem_gb=1.0, name="brain_mask_wf"):
    """Build a workflow that masks the brain from magnitude images.

    Parameters
    ----------
    mem_gb : float
        Memory the masking node may use (GB), for the plugin's scheduler.
    name : str
        Workflow name.

    Inputs
    ------
    in_files
        Magnitude images on one grid (the first echo of each flip angle).

    Outputs
    -------
    mask_file
        Brain mask (uint8 NIfTI).
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.masking import BrainMask

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["in_files"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["mask_file"]), name="outputnode")
    brain_mask = pe.Node(BrainMask(), name="brain_mask", mem_gb=mem_gb)
    workflow.connect([
        (inputnode, brain_mask, [("in_files", "in_files")]),
        (brain_mask, outputnode, [("out_mask", "mask_file")]),
    ])  # fmt: skip
    return workflow


def init_r2star_wf(*, method="wls", n_coils=1, mem_gb=1.0, omp_nthreads=1, name="r2star_wf"):
    """Build a workflow that fits R2* (and T2*) to multi-echo spoiled gradient echoes.

    With several flip angles the ESTATICS model is fitted: one R2* shared by all flip angles and
    one TE = 0 intercept (``S0``) per flip angle, which later feed R1 and PD mapping.

    Parameters
    ----------
    method : {"wls", "nls"}
        Weighted log-linear fit, or non-linear fit of the expected magnitude with its noise floor.
    n_coils : int
        Number of receive channels combined by root-sum-of-squares (sets the noise law for "nls").
    mem_gb : float
        Memory the fitting node may use (GB).
    omp_nthreads : int
        Threads the fitting node uses (chunks of voxels are fitted in parallel).
    name : str
        Workflow name.

    Inputs
    ------
    magnitude_files
        Magnitude image of every echo of every flip angle (flat list).
    echo_times
        Echo time (s) of each file.
    flip_angles
        Nominal flip angle (deg) of each file.
    mask_file
        Voxels to fit.

    Outputs
    -------
    r2star_file, t2star_file
        R2* (1/s) and T2* (s) maps.
    s0_files
        TE = 0 intercepts, one per flip angle in ascending flip-angle order.
    flip_angles
        The flip angle of each S0 file.
    metadata
        Sidecar fields describing the estimation.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.r2star import FitR2star

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["magnitude_files", "echo_times", "flip_angles", "mask_file"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=["r2star_file", "t2star_file", "s0_files", "flip_angles", "metadata"]
        ),
        name="outputnode",
    )
    fit_r2star = pe.Node(
        FitR2star(method=method, n_coils=n_coils, num_threads=omp_nthreads),
        name="fit_r2star",
        mem_gb=mem_gb,
        n_procs=omp_nthreads,
    )
    workflow.connect([
        (inputnode, fit_r2star, [
            ("magnitude_files", "magnitude_files"),
            ("echo_times", "echo_times"),
            ("flip_angles", "flip_angles"),
            ("mask_file", "mask_file"),
        ]),
        (fit_r2star, outputnode, [
            ("r2star_file", "r2star_file"),
            ("t2star_file", "t2star_file"),
            ("s0_files", "s0_files"),
            ("flip_angles", "flip_angles"),
            ("metadata", "metadata"),
        ]),
    ])  # fmt: skip
    return workflow
