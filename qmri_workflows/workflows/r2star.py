"""R2*/T2* mapping and brain masking workflows."""

from __future__ import annotations

import os


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
    user_mask_file
        Optional: a brain mask of the user's on that grid (``--derivatives``), used instead of the
        automatic one (see :class:`qmri_workflows.interfaces.masking.BrainMask`).

    Outputs
    -------
    mask_file
        Brain mask (uint8 NIfTI).
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.masking import BrainMask

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["in_files", "user_mask_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["mask_file"]), name="outputnode")
    brain_mask = pe.Node(BrainMask(), name="brain_mask", mem_gb=mem_gb)
    workflow.connect([
        (inputnode, brain_mask, [("in_files", "in_files"), ("user_mask_file", "user_mask_file")]),
        (brain_mask, outputnode, [("out_mask", "mask_file")]),
    ])  # fmt: skip
    return workflow


def init_denoise_node(method, *, n_coils=1, search_radius=2, mem_gb=1.0, omp_nthreads=1, name="denoise"):
    """The node that measures the noise of a collection's magnitudes and denoises them (``--denoise``).

    Parameters
    ----------
    method : {"multispectral", "nlm", "none"}
        ``interfaces.denoise.DenoiseCollection``'s method ("none": the noise map only).
    n_coils : int
        Receive channels combined by root-sum-of-squares.
    search_radius : int
        Search radius (voxels) of the non-local means.
    mem_gb : float
        Memory of the node (GB; see :func:`estimate_denoise_mem_gb`).
    omp_nthreads : int
        Threads (dipy's per-volume NLM only uses them).
    name : str
        Node name.

    Returns
    -------
    nipype.pipeline.engine.Node
        Inputs ``magnitude_files``, ``mask_file``, ``echo_times``, ``flip_angles``; outputs
        ``denoised_files``, ``noise_map_file``, ``metadata`` and ``applied`` (whether the images
        were denoised).
    """
    from nipype.pipeline import engine as pe

    from ..interfaces.denoise import DenoiseCollection

    return pe.Node(
        DenoiseCollection(method=method, n_coils=n_coils, search_radius=search_radius, num_threads=omp_nthreads),
        name=name,
        mem_gb=mem_gb,
        n_procs=omp_nthreads if method == "nlm" else 1,
    )


def init_r2star_wf(
    *,
    method="wls",
    n_coils=1,
    denoise="multispectral",
    denoise_search_radius=2,
    mem_gb=1.0,
    denoise_mem_gb=None,
    omp_nthreads=1,
    name="r2star_wf",
):
    """Build a workflow that fits R2* (and T2*) to multi-echo spoiled gradient echoes.

    With several flip angles the ESTATICS model is fitted: one R2* shared by all flip angles and
    one TE = 0 intercept (``S0``) per flip angle, which later feed R1 and PD mapping.

    Parameters
    ----------
    method : {"wls", "nls"}
        Weighted log-linear fit, or non-linear fit of the expected magnitude with its noise floor.
    n_coils : int
        Number of receive channels combined by root-sum-of-squares (sets the noise law for "nls").
    denoise : {"multispectral", "nlm", "none"}
        Non-local means of the magnitudes before the fit (``interfaces.denoise.DenoiseCollection``):
        one set of weights for all echoes and flip angles, dipy's per-volume NLM, or none (the noise
        map is estimated in every case). Denoised data are bias-corrected, so "nls" models no noise
        floor on them.
    denoise_search_radius : int
        Search radius (voxels) of the non-local means.
    mem_gb : float
        Memory the fitting node may use (GB).
    denoise_mem_gb : float, optional
        Memory of the denoising node (GB); ``mem_gb`` when None (see :func:`estimate_denoise_mem_gb`).
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
        R2* (1/s) and T2* (s) maps; T2* is NaN where R2* is not significantly above zero.
    r2star_stderr_file
        Standard error of R2* (1/s).
    s0_files
        TE = 0 intercepts, one per flip angle in ascending flip-angle order.
    flip_angles
        The flip angle of each S0 file.
    magnitude_files
        The magnitudes the fit used (denoised, or the raw files), in the order of the input, for
        other families that use magnitude images.
    noise_map_file
        Noise SD per channel, voxel by voxel.
    metadata
        Sidecar fields describing the estimation (and the denoising).
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.r2star import FitR2star
    from ..interfaces.utility import MergeMetadata

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["magnitude_files", "echo_times", "flip_angles", "mask_file"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "r2star_file",
                "r2star_stderr_file",
                "t2star_file",
                "s0_files",
                "flip_angles",
                "magnitude_files",
                "noise_map_file",
                "metadata",
            ]
        ),
        name="outputnode",
    )
    denoise_node = init_denoise_node(
        denoise,
        n_coils=n_coils,
        search_radius=denoise_search_radius,
        mem_gb=mem_gb if denoise_mem_gb is None else denoise_mem_gb,
        omp_nthreads=omp_nthreads,
    )
    fit_r2star = pe.Node(
        FitR2star(method=method, n_coils=n_coils, num_threads=omp_nthreads),
        name="fit_r2star",
        mem_gb=mem_gb,
        n_procs=omp_nthreads,
    )
    merge_metadata = pe.Node(MergeMetadata(), name="merge_metadata", run_without_submitting=True)
    workflow.connect([
        (inputnode, denoise_node, [
            ("magnitude_files", "magnitude_files"),
            ("mask_file", "mask_file"),
            ("echo_times", "echo_times"),
            ("flip_angles", "flip_angles"),
        ]),
        # "applied", not the option: without noise in the air (zero-filled background) the images pass raw
        (denoise_node, fit_r2star, [("denoised_files", "magnitude_files"), ("applied", "denoised")]),
        (denoise_node, outputnode, [("denoised_files", "magnitude_files"), ("noise_map_file", "noise_map_file")]),
        (denoise_node, merge_metadata, [("metadata", "update")]),
        (fit_r2star, merge_metadata, [("metadata", "base")]),
        (merge_metadata, outputnode, [("out_dict", "metadata")]),
        (inputnode, fit_r2star, [
            ("echo_times", "echo_times"),
            ("flip_angles", "flip_angles"),
            ("mask_file", "mask_file"),
        ]),
        (fit_r2star, outputnode, [
            ("r2star_file", "r2star_file"),
            ("r2star_stderr_file", "r2star_stderr_file"),
            ("t2star_file", "t2star_file"),
            ("s0_files", "s0_files"),
            ("flip_angles", "flip_angles"),
        ]),
    ])  # fmt: skip
    return workflow


# --------------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------------
MIN_ECHOES_R2STAR = 2
R2STAR_STDERR_DESC = "stderr"
R2STAR_STDERR_DESCRIPTION = (
    "Standard error of R2* (1/s): noise SD from the fit's residuals (measured in the air when the "
    "protocol leaves fewer than 4 residual degrees of freedom) over the square root of the Fisher "
    "information on R2* at the fitted values; NaN where R2* is undetermined"
)


def _t2star_description():
    from ..core.r2star import T2STAR_MIN_SIGNIFICANCE

    return (
        f"1/R2* where R2* > 0 and R2* > {T2STAR_MIN_SIGNIFICANCE:g} times its standard error "
        "(desc-stderr_R2starmap); NaN elsewhere in the brain mask (R2* undetermined, negative or "
        "not significantly above zero, where 1/R2* would be arbitrarily large)"
    )


def _first_echoes(inputs):
    return [series.magnitude[0] for series in inputs.gre]


def _build_brain_mask(context):
    from .base import estimate_fit_mem_gb

    first_echoes = _first_echoes(context.inputs)
    workflow = init_brain_mask_wf(mem_gb=estimate_fit_mem_gb(first_echoes[0], len(first_echoes)))
    workflow.inputs.inputnode.in_files = first_echoes
    return workflow


def _user_brain_mask(inputs):
    from ..io.query import BRAIN_MASK

    return inputs.derivatives.get(BRAIN_MASK)


def _describe_brain_mask(inputs):
    user_mask = _user_brain_mask(inputs)
    if user_mask is not None:
        return f"{os.path.basename(user_mask.path)} given with --derivatives (checked, used as given)"
    return f"first echo of {len(inputs.gre)} {inputs.gre_suffix} flip angle(s)"


def _brain_mask_outputs(inputs):
    from .registry import Output

    # The maps are fitted inside it: it is as much a result as they are.
    user_mask = _user_brain_mask(inputs)
    metadata = {}
    if user_mask is not None:
        metadata["Description"] = (
            f"Brain mask given with --derivatives ({os.path.basename(user_mask.path)}), on the map grid"
        )
    return [
        Output(
            field="mask_file",
            suffix="mask",
            desc="brain",
            source_files=tuple(_first_echoes(inputs)),
            metadata=metadata,
        )
    ]


def _n_echoes(inputs):
    return max(len(series.magnitude) for series in inputs.gre)


def _check_r2star(inputs):
    n_echoes = _n_echoes(inputs)
    if n_echoes < MIN_ECHOES_R2STAR:
        return f"{n_echoes} echo(es); R2* needs at least {MIN_ECHOES_R2STAR}"
    return None


def _describe_r2star(inputs):
    from .base import echo_counts

    return f"{inputs.gre_suffix} {len(inputs.gre)} flip angle(s) x {echo_counts(inputs.gre)} echoes"


def estimate_denoise_mem_gb(reference_file, n_volumes):
    """Memory (GB) of the denoising node for ``n_volumes`` images on the grid of ``reference_file``.

    About 6.5 float32 copies of the stack (the images, their copy in the mask's box, its padded and
    squared channels-first copies, the output) plus the interpreter: measured 2.24 GiB for 16 volumes
    of 1 mm (191 x 227 x 201; benchmarks/bench_denoise.py; dipy's per-volume NLM 2.56 GiB), for
    which this gives 3.9 GB. The distances in the signal subspace need only a few channels more.
    """
    import nibabel as nib
    import numpy as np

    n_voxels = int(np.prod(nib.load(reference_file).shape[:3]))
    return round(max(0.5, 6.5 * n_voxels * n_volumes * 4 / 1e9 + 0.3), 2)


def _build_r2star(context):
    from .base import estimate_fit_mem_gb, flatten_echoes

    magnitude_files, echo_times, flip_angles = flatten_echoes(context.inputs.gre)
    workflow = init_r2star_wf(
        method=context.options["r2star_method"],
        n_coils=context.options["n_coils"],
        denoise=context.options["denoise"],
        denoise_search_radius=context.options["denoise_search_radius"],
        mem_gb=estimate_fit_mem_gb(magnitude_files[0], len(magnitude_files)),
        denoise_mem_gb=estimate_denoise_mem_gb(magnitude_files[0], len(magnitude_files)),
        omp_nthreads=context.omp_nthreads,
    )
    workflow.inputs.inputnode.magnitude_files = magnitude_files
    workflow.inputs.inputnode.echo_times = echo_times
    workflow.inputs.inputnode.flip_angles = flip_angles
    return workflow


def _r2star_outputs(inputs):
    from .base import flatten_echoes
    from .registry import Output

    magnitude_files = tuple(flatten_echoes(inputs.gre)[0])
    # The maps are fitted inside the brain mask only.
    masked = {"SkullStripped": True}
    outputs = [
        Output(
            field="r2star_file", suffix="R2starmap", source_files=magnitude_files, metadata=masked, quantitative=True
        ),
        Output(
            field="r2star_stderr_file",
            suffix="R2starmap",
            desc=R2STAR_STDERR_DESC,
            source_files=magnitude_files,
            metadata={**masked, "Description": R2STAR_STDERR_DESCRIPTION},
        ),
        Output(
            field="t2star_file",
            suffix="T2starmap",
            source_files=magnitude_files,
            metadata={**masked, "Description": _t2star_description()},
        ),
    ]
    outputs.append(noise_map_output(magnitude_files))
    several = inputs.gre_suffix in ("VFA", "MPM") and len(inputs.gre) > 1
    # The query layer sorts the series by flip angle, as the fit orders its S0 maps; each S0 map
    # describes its own acquisition (BIDS allows no flip entity on derivative maps: desc-flip<i>).
    for index, series in enumerate(inputs.gre):
        acquisition = {**masked, "EchoTime": list(series.echo_times)}
        if series.flip_angle:
            acquisition["FlipAngle"] = series.flip_angle
        if series.repetition_time:
            acquisition["RepetitionTimeExcitation"] = series.repetition_time
        outputs.append(
            Output(
                field="s0_files",
                suffix="S0map",
                index=index,
                desc=f"flip{index + 1}" if several else None,
                source_files=tuple(series.magnitude),
                metadata=acquisition,
            )
        )
    return outputs


NOISE_MAP_SUFFIX = "sigmamap"
NOISE_MAP_DESC = "noise"
NOISE_MAP_DESCRIPTION = (
    "Noise standard deviation per receive channel and per real/imaginary part of the GRE magnitude "
    "images, voxel by voxel (homomorphic estimate, Aja-Fernandez et al. 2015), in the units of the "
    "magnitude images; the sigma of the non-local-means denoising and of its bias correction"
)


def noise_map_output(magnitude_files):
    """The derivative of the denoising step's noise map (``outputnode.noise_map_file``).

    Parameters
    ----------
    magnitude_files : tuple of str
        The magnitudes the noise was estimated from (``Sources``).
    """
    from .registry import Output

    return Output(
        field="noise_map_file",
        suffix=NOISE_MAP_SUFFIX,
        desc=NOISE_MAP_DESC,
        source_files=tuple(magnitude_files),
        metadata={"Description": NOISE_MAP_DESCRIPTION, "Units": "arbitrary (units of the magnitude images)"},
    )


def _registry_entries():
    from ..io.query import BRAIN_MASK, GRE
    from .registry import MapFamily, Option, positive_int

    brain_mask = MapFamily(
        key="brainmask",
        name="brain mask",
        needs=(GRE,),
        describe=_describe_brain_mask,
        build=_build_brain_mask,
        outputs=_brain_mask_outputs,
        derived_inputs={"user_mask_file": (BRAIN_MASK, "majority")},
        runtime_metadata=False,
        auxiliary=True,
    )
    r2star = MapFamily(
        key="r2star",
        name="R2*",
        needs=(GRE,),
        depends=("brainmask",),
        consumes={"mask_file": ("brainmask", "mask_file")},
        check=_check_r2star,
        describe=_describe_r2star,
        build=_build_r2star,
        outputs=_r2star_outputs,
        options=(
            Option(
                ("--r2star-method",),
                "r2star_method",
                {
                    "choices": ("wls", "nls"),
                    "default": "wls",
                    "help": "R2* estimator: ESTATICS weighted log-linear (wls, default) or "
                    "non-linear with the magnitude noise floor (nls)",
                },
            ),
            Option(
                ("--n-coils",),
                "n_coils",
                {
                    "type": positive_int,
                    "default": 1,
                    "metavar": "N",
                    "help": "receive channels combined by root-sum-of-squares (noise law for nls and "
                    "denoising, for the noise floor removed from the AFI pair, and for the noise "
                    "measured in the air with few echoes)",
                },
            ),
            Option(
                ("--denoise",),
                "denoise",
                {
                    "choices": ("none", "nlm", "multispectral"),
                    "default": "multispectral",
                    "help": "denoising of the magnitudes before every fit that uses them (GRE echoes and "
                    "flip angles; bSSFP phase cycles and flip angles): multispectral non-local means, one "
                    "set of weights for a whole collection (default; complex bSSFP: real and imaginary "
                    "parts, so their phase too), dipy's non-local means of each image (nlm), or none. "
                    "The GRE phase is never denoised",
                },
            ),
            Option(
                ("--denoise-search-radius",),
                "denoise_search_radius",
                {
                    "type": positive_int,
                    "default": 2,
                    "metavar": "VOXELS",
                    "help": "search radius of the non-local means (default: 2, a 5x5x5 cube; the cost "
                    "grows with its cube)",
                },
            ),
        ),
    )
    return brain_mask, r2star


MAP_FAMILIES = _registry_entries()
