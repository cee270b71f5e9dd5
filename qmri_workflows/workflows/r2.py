"""R2 from phase-cycled balanced SSFP (DESPOT2 on band-free signals), and its registry entry.

Outputs (``docs/architecture.rst``, "R2 from bSSFP"): ``anat/..._R2map`` (1/s), ``_T2map`` (s),
``_desc-stderr_R2map`` (1/s) and, for complex data, ``fmap/..._desc-offresonance_fieldmap`` (Hz,
modulo 1/TR). R1 and B1+ come from the R1 family, which must run (a spoiled-GRE VFA collection).
"""

from __future__ import annotations

import math

R2_METHOD_CHOICES = ("nonlinear", "linear")
#: Magnitude-only data fitted cycle by cycle with the off-resonance (DESPOT2-FM), not combined; the
#: same value as ``interfaces.bssfp.JOINT_MAGNITUDE_FIT`` (not imported: the registry loads this module
#: without nipype).
JOINT_MAGNITUDE_FIT = "despot2-fm"
BSSFP_COMBINATION_CHOICES = ("auto", "geometric", "ellipse", JOINT_MAGNITUDE_FIT, "rms", "max")
MIN_FLIP_ANGLES_R2 = 2
MIN_PHASE_CYCLES = 4
#: DESPOT2-FM fits the cycles' magnitudes (three unknowns), it removes no band: three cycles do. With
#: two (0 and 180 deg) at two flip angles the magnitudes leave a second minimum at a wrong R2 (a
#: Monte Carlo at SNR 40: 5th percentile -40 %, against -6 % with three cycles and -5 % with four).
MIN_PHASE_CYCLES_FM = 3
OFFRESONANCE_DESC = "offresonance"
#: Sidecar key of the bSSFP excitation pulse duration (s); project convention, BIDS has none.
PULSE_DURATION_KEY = "RFPulseDuration"


def init_r2_wf(
    *,
    flip_angles,
    phase_increments,
    repetition_time,
    combination="geometric",
    method="nonlinear",
    with_phase=True,
    pulse_duration=0.0,
    pulse_duration_source=None,
    b1_note=None,
    refine_r1=None,
    denoise=None,
    denoise_search_radius=2,
    n_coils=1,
    denoise_mem_gb=None,
    mem_gb=1.0,
    omp_nthreads=1,
    name="r2_wf",
):
    """Build a workflow that maps R2 and T2 from phase-cycled bSSFP by DESPOT2.

    Parameters
    ----------
    flip_angles : list of float
        Nominal flip angles (deg), ascending, one per bSSFP series.
    phase_increments : list of float
        RF phase-cycling increments (deg), the same at every flip angle.
    repetition_time : float
        TR (s).
    combination : {"geometric", "ellipse", "despot2-fm", "rms", "max"}
        Band-free signal per flip angle (complex data), the joint fit of every phase-cycle
        magnitude (``despot2-fm``: the band-free step passes the cycles, floor removed, to the fit
        node) or the band-reduced magnitude combination.
    method : {"nonlinear", "linear"}
        DESPOT2 estimator (not used by ``despot2-fm``).
    with_phase : bool
        Whether phase images are given (``phase_files``, ``phase_scale``).
    pulse_duration : float
        RF pulse duration (s) for DESPOT2's finite-pulse correction (0: instantaneous pulses); with
        phase images the band-free step's off-resonance map feeds the correction, itself corrected
        for the precession during the pulse at the actual flip angle (B1+ map).
    pulse_duration_source : str, optional
        Where ``pulse_duration`` comes from (recorded in the R2 sidecar).
    b1_note : str, optional
        Why no B1+ map reaches the fit (then ``b1_file`` is not used).
    refine_r1 : dict, optional
        The R1 family's settings when its R1 is corrected for imperfect spoiling, which depends on
        T2: R1 is then refitted with each voxel's T2 from this R2
        (:func:`~qmri_workflows.workflows.relaxometry.init_r1_refit_wf`) and R2 refitted with the
        refined R1: one round of the joint fixed point. A second would change R1 by about 0.03 times
        the relative change of R2 (R1 moves ~2 % when T2 halves), and R2 follows R1 at most one to
        one, so by < 0.03 % where the first round moved R1 by < 1 %.
        Without it the ``refined_*`` outputs are the R1 family's own.
    denoise : {"multispectral", "nlm", "none"}, optional
        Denoising of the phase cycles before the band-free step
        (``interfaces.denoise.DenoiseCollection`` on all cycles and flip angles at once: noise map,
        then the filter). With phase images, ``multispectral`` averages the real and imaginary parts
        of the complex signals (made Gaussian first: root-sum-of-squares magnitudes lose the noise
        power orthogonal to the signal), so magnitude and phase come out denoised;
        ``nlm`` denoises the magnitudes only (dipy, per image) and the band-free step combines them
        with the raw phases. None: no node (the images go in as they are).
    denoise_search_radius : int, optional
        Search radius (voxels) of the non-local means.
    n_coils : int, optional
        Receive channels combined by root-sum-of-squares (noise law of the magnitudes). Without
        denoising, the band-free step removes the floor such magnitudes have as complex data.
    denoise_mem_gb : float, optional
        Memory of the denoising node (GB); ``mem_gb["band_free"]`` when None.
    mem_gb : float or dict
        Memory (GB) of each node, or by node (``band_free``, ``fit`` and, with ``refine_r1``,
        ``refit_r1``) as :func:`_build_r2` gives them.
    omp_nthreads : int
        Threads of each node.
    name : str
        Workflow name.

    Inputs
    ------
    magnitude_files, phase_files, phase_scale
        Every phase cycle of every flip angle (flip angle by flip angle, cycles in the order of
        ``phase_increments``); phase optional.
    reference_file
        An image on the map grid.
    mask_file, r1_file, b1_file
        Brain mask, R1 (1/s) and the B1+ ratio map (1 = nominal) on the map grid.
    t1_file, m0_file, r1_stderr_file, r1_metadata
        The rest of the R1 family's outputs (passed on, or replaced by the refit).
    r1_signal_files, r1_flip_angles, r2star_file, r2star_stderr_file
        What the R1 fit read (its ``signal_files`` and ``flip_angles`` outputs: the R2* fit's S0 or the
        denoised single-echo images) and the R2* maps, for the refit (see
        :func:`~qmri_workflows.workflows.relaxometry.init_r1_wf`).

    Outputs
    -------
    r2_file, t2_file, r2_stderr_file
        R2 (1/s), T2 (s), standard error of R2 (1/s).
    offresonance_file
        Off-resonance (Hz, modulo 1/TR), complex data only.
    noise_map_file
        Noise SD per channel of the phase cycles, voxel by voxel (with ``denoise`` only).
    band_free_files
        Band-free signal per flip angle (map grid).
    metadata
        Sidecar fields.
    refined_r1_file, refined_t1_file, refined_m0_file, refined_r1_stderr_file, refined_r1_metadata
        R1 outputs with the spoiling correction at this R2's T2 (they supersede the R1 family's).
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.bssfp import BandFreeBSSFP, FitDESPOT2
    from ..interfaces.utility import MergeMetadata

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                "magnitude_files",
                "phase_files",
                "phase_scale",
                "reference_file",
                "mask_file",
                "r1_file",
                "b1_file",
                *R1_PASSED_ON,
                "r1_signal_files",
                "r1_flip_angles",
                "r2star_file",
                "r2star_stderr_file",
            ]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "r2_file",
                "t2_file",
                "r2_stderr_file",
                "offresonance_file",
                "band_free_files",
                "noise_map_file",
                "metadata",
                *(f"refined_{field}" for field in REFINED_R1_FIELDS),
            ]
        ),
        name="outputnode",
    )
    band_free = pe.Node(
        BandFreeBSSFP(
            flip_angles=[float(v) for v in flip_angles],
            phase_increments=[float(v) for v in phase_increments],
            repetition_time=repetition_time,
            combination=combination,
            pulse_duration=float(pulse_duration),
            n_coils=n_coils,
            # raw_magnitudes: the denoising node's "applied" when there is one (denoising removes the
            # floor itself: moment correction, or before complex averaging); else the default, raw
            num_threads=omp_nthreads,
        ),
        name="band_free",
        mem_gb=_node_mem_gb(mem_gb, "band_free"),
        n_procs=omp_nthreads,
    )
    fit = pe.Node(
        FitDESPOT2(
            flip_angles=[float(v) for v in flip_angles],
            repetition_time=repetition_time,
            method=method,
            combination=combination,
            pulse_duration=float(pulse_duration),
            # denoised: the denoising node's "applied" when there is one
            num_threads=omp_nthreads,
        ),
        name="fit_despot2",
        mem_gb=_node_mem_gb(mem_gb, "fit"),
        n_procs=omp_nthreads,
    )
    if combination == JOINT_MAGNITUDE_FIT:
        fit.inputs.phase_increments = [float(v) for v in phase_increments]
    if b1_note is not None:
        fit.inputs.b1_note = b1_note
    if pulse_duration_source is not None:
        fit.inputs.pulse_duration_source = pulse_duration_source
    # the finite-pulse correction depends on the off-resonance during the pulse
    use_offresonance = with_phase and pulse_duration > 0
    merge = pe.Node(MergeMetadata(), name="merge_metadata", run_without_submitting=True)
    # what the band-free step reads: the magnitudes, or their denoised copies
    magnitudes = inputnode
    if denoise is not None:
        from .r2star import init_denoise_node

        denoise_node = init_denoise_node(
            denoise,
            n_coils=n_coils,
            search_radius=denoise_search_radius,
            mem_gb=_node_mem_gb(mem_gb, "band_free") if denoise_mem_gb is None else denoise_mem_gb,
            omp_nthreads=omp_nthreads,
        )
        merge_denoise = pe.Node(MergeMetadata(), name="merge_denoise_metadata", run_without_submitting=True)
        workflow.connect([
            (inputnode, denoise_node, [("magnitude_files", "magnitude_files"), ("mask_file", "mask_file")]),
            (denoise_node, outputnode, [("noise_map_file", "noise_map_file")]),
            (denoise_node, band_free, [("noise_map_file", "noise_map_file")]),
            # without a noise level in the air (zero-filled background) the node passes the raw images on
            (denoise_node, band_free, [(("applied", _not_denoised), "raw_magnitudes")]),
            (denoise_node, fit, [("applied", "denoised")]),
            (band_free, merge_denoise, [("metadata", "base")]),
            (denoise_node, merge_denoise, [("metadata", "update")]),
            (merge_denoise, merge, [("out_dict", "base")]),
        ])  # fmt: skip
        magnitudes = denoise_node
    else:
        workflow.connect([(band_free, merge, [("metadata", "base")])])
    workflow.connect([
        (magnitudes, band_free, [("magnitude_files" if denoise is None else "denoised_files", "magnitude_files")]),
        (inputnode, band_free, [("reference_file", "reference_file"), ("mask_file", "mask_file")]),
        (inputnode, fit, [("mask_file", "mask_file"), ("r1_file", "r1_file")]),
        (band_free, fit, [("band_free_files", "band_free_files"), ("noise_sigma", "noise_sigma")]),
        *([(band_free, fit, [("cycle_files", "cycle_files")])] if combination == JOINT_MAGNITUDE_FIT else []),
        (band_free, outputnode, [("offresonance_file", "offresonance_file"), ("band_free_files", "band_free_files")]),
        (merge, outputnode, [("out_dict", "metadata")]),
    ])  # fmt: skip
    if with_phase and denoise is None:
        workflow.connect([(inputnode, band_free, [("phase_files", "phase_files"), ("phase_scale", "phase_scale")])])
    elif with_phase:
        # multispectral denoising of complex data denoises the phase too (the node passes it through otherwise)
        workflow.connect([
            (inputnode, denoise_node, [("phase_files", "phase_files"), ("phase_scale", "phase_scale")]),
            (denoise_node, band_free, [("denoised_phase_files", "phase_files"),
                                       ("denoised_phase_scale", "phase_scale")]),
        ])  # fmt: skip
    if use_offresonance:
        workflow.connect([(band_free, fit, [("offresonance_file", "offresonance_file")])])
    if b1_note is None:
        workflow.connect([
            (inputnode, fit, [("b1_file", "b1_file"), (("r1_metadata", _b1_source), "b1_source")]),
        ])  # fmt: skip
        if use_offresonance:
            # the off-resonance's finite-pulse correction depends on the actual flip angle
            workflow.connect([(inputnode, band_free, [("b1_file", "b1_file")])])
    if refine_r1 is None:
        final_fit = fit
        workflow.connect([
            (inputnode, outputnode, [("r1_file", "refined_r1_file")]
             + [(field, f"refined_{field}") for field in R1_PASSED_ON[:-1]]
             + [("r1_metadata", "refined_metadata")]),
        ])  # fmt: skip
    else:
        from .relaxometry import init_r1_refit_wf

        refit = init_r1_refit_wf(settings=refine_r1, mem_gb=_node_mem_gb(mem_gb, "refit_r1"), omp_nthreads=omp_nthreads)
        final_fit = pe.Node(
            fit.interface.__class__(**fit.inputs.get_traitsfree()),
            name="refit_despot2",
            mem_gb=_node_mem_gb(mem_gb, "fit"),
            n_procs=omp_nthreads,
        )
        workflow.connect([
            (inputnode, refit, [("r1_signal_files", "inputnode.signal_files"),
                                ("r1_flip_angles", "inputnode.flip_angles"), ("mask_file", "inputnode.mask_file"),
                                ("b1_file", "inputnode.b1_file"), ("r2star_file", "inputnode.r2star_file"),
                                ("r2star_stderr_file", "inputnode.r2star_stderr_file"),
                                ("r1_metadata", "inputnode.metadata")]),
            (fit, refit, [("r2_file", "inputnode.r2_file")]),
            (refit, final_fit, [("outputnode.r1_file", "r1_file")]),
            (inputnode, final_fit, [("mask_file", "mask_file")]),
            (band_free, final_fit, [("band_free_files", "band_free_files"), ("noise_sigma", "noise_sigma")]
             + ([("cycle_files", "cycle_files")] if combination == JOINT_MAGNITUDE_FIT else [])),
            (refit, outputnode, [(f"outputnode.{field}", f"refined_{field}") for field in REFINED_R1_FIELDS]),
        ])  # fmt: skip
        if combination == JOINT_MAGNITUDE_FIT:
            # R1 moved a little: start from the first fit's minimum instead of searching the grid again
            workflow.connect([
                (fit, final_fit, [("r2_file", "start_r2_file"),
                                  ("fitted_offresonance_file", "start_offresonance_file")]),
            ])  # fmt: skip
        if denoise is not None:
            workflow.connect([(denoise_node, final_fit, [("applied", "denoised")])])
        if b1_note is None:
            workflow.connect([
                (inputnode, final_fit, [("b1_file", "b1_file"), (("r1_metadata", _b1_source), "b1_source")]),
            ])  # fmt: skip
        if use_offresonance:
            workflow.connect([(band_free, final_fit, [("offresonance_file", "offresonance_file")])])
    workflow.connect([
        (final_fit, merge, [("metadata", "update")]),
        (final_fit, outputnode, [("r2_file", "r2_file"), ("t2_file", "t2_file"),
                                 ("r2_stderr_file", "r2_stderr_file")]),
    ])  # fmt: skip
    return workflow


def _not_denoised(applied):
    """``raw_magnitudes`` of the band-free step from the denoising node's ``applied``."""
    return not applied


def _b1_source(r1_metadata):
    """The R1 family's ``B1Correction`` (measured map, estimate from the VFA data ...), for R2's sidecar."""
    return str((r1_metadata or {}).get("B1Correction", "")) or "unknown"


#: R1 family outputs the R2 family takes in and passes on (or replaces by its refit).
R1_PASSED_ON = ("t1_file", "m0_file", "r1_stderr_file", "r1_metadata")
#: Fields of the R1 refit; the R2 family's ``refined_<field>`` supersede the R1 family's ``<field>``.
REFINED_R1_FIELDS = ("r1_file", "t1_file", "m0_file", "r1_stderr_file", "metadata")


# --------------------------------------------------------------------------------------------------
# registry entry
# --------------------------------------------------------------------------------------------------
def _in_opposite_pairs(increments):
    """Whether the increments (deg) pair up as Delta and Delta + 180 (the geometric solution's need)."""
    remaining = [round(float(v)) % 360 for v in increments]
    while remaining:
        first = remaining.pop(0)
        opposite = (first + 180) % 360
        if opposite not in remaining:
            return False
        remaining.remove(opposite)
    return True


def _has_phase(inputs):
    return all(series.phase is not None for series in inputs.bssfp)


def resolve_combination(inputs, requested):
    """The band-free combination ``--bssfp-combination`` means for these data.

    ``auto``: the geometric solution for complex data with cycles in opposite pairs, the ellipse fit
    for other complex data, the joint fit of the magnitudes (DESPOT2-FM) without phase.
    """
    if requested != "auto":
        return requested
    if not _has_phase(inputs):
        return JOINT_MAGNITUDE_FIT
    return "geometric" if _in_opposite_pairs(inputs.bssfp[0].phase_increments) else "ellipse"


def _check_r2(inputs, options):
    series = inputs.bssfp
    flips = sorted({s.flip_angle for s in series})
    if len(flips) < MIN_FLIP_ANGLES_R2:
        return f"{len(flips)} bSSFP flip angle(s); DESPOT2 needs at least {MIN_FLIP_ANGLES_R2} different ones"
    increments = series[0].phase_increments
    combination = resolve_combination(inputs, options["bssfp_combination"])
    cycles = (
        f"{len(increments)} bSSFP phase cycle(s) ({', '.join(f'{v:g}' for v in increments)} deg, e.g. "
        f"{series[0].magnitude[0]})"
    )
    if combination == JOINT_MAGNITUDE_FIT and len(increments) < MIN_PHASE_CYCLES_FM:
        return (
            f"{cycles}; {JOINT_MAGNITUDE_FIT} needs at least {MIN_PHASE_CYCLES_FM} per flip angle (with two the "
            "magnitudes leave the off-resonance, and so R2, ambiguous), e.g. 0, 120, 240 deg"
        )
    if combination != JOINT_MAGNITUDE_FIT and len(increments) < MIN_PHASE_CYCLES:
        return (
            f"{cycles}; removing the bands needs at least {MIN_PHASE_CYCLES} per flip angle (0, 90, 180, 270 deg)"
            + (
                f"; --bssfp-combination {JOINT_MAGNITUDE_FIT} (magnitudes only) needs {MIN_PHASE_CYCLES_FM}"
                if len(increments) >= MIN_PHASE_CYCLES_FM
                else ""
            )
        )
    trs = {round(s.repetition_time, 6) for s in series}
    if len(trs) > 1:
        return (
            f"the bSSFP flip angles have different TRs ({', '.join(f'{tr * 1e3:g}' for tr in sorted(trs))} ms); "
            "DESPOT2 needs one TR"
        )
    _, problem = pulse_duration(inputs, options)
    if problem is not None:
        return problem
    if combination in ("geometric", "ellipse") and not _has_phase(inputs):
        return (
            f"--bssfp-combination {combination} needs the phase of every phase cycle, and the bSSFP has magnitude "
            f"only (e.g. {series[0].magnitude[0]}); add the part-phase images, or use --bssfp-combination rms "
            f"(band-reduced, biased), {JOINT_MAGNITUDE_FIT} or auto"
        )
    if combination == "geometric" and not _in_opposite_pairs(increments):
        return (
            f"--bssfp-combination geometric needs the phase cycles in opposite pairs (Delta, Delta + 180 deg), got "
            f"{', '.join(f'{v:g}' for v in increments)} deg; use --bssfp-combination ellipse"
        )
    return None


def pulse_duration(inputs, options):
    """``((seconds, source), None)`` of the bSSFP RF pulse duration, or ``(None, why it is unusable)``.

    ``--bssfp-pulse-duration`` wins over the sidecars' ``RFPulseDuration`` (s, project convention:
    BIDS has no key for it), which must then agree across the bSSFP images; without either the
    pulses are taken as instantaneous (0 s).
    """
    series = inputs.bssfp
    tr = series[0].repetition_time
    given = options.get("bssfp_pulse_duration")
    if given is not None:
        value, source = float(given), "--bssfp-pulse-duration"
    else:
        values = [s.metadata.get(PULSE_DURATION_KEY) for s in series]
        if all(v is None for v in values):
            return (0.0, f"no {PULSE_DURATION_KEY} in the bSSFP sidecars nor --bssfp-pulse-duration"), None
        if len({repr(v) for v in values}) > 1:
            return None, (
                f"the bSSFP sidecars disagree on {PULSE_DURATION_KEY} ({', '.join(sorted({repr(v) for v in values}))}, "
                f"e.g. {series[0].magnitude[0]}); make them agree or give --bssfp-pulse-duration SECONDS"
            )
        given = values[0]
        try:
            value = float(given)
        except (TypeError, ValueError):
            value = math.nan
        source = f"sidecar {PULSE_DURATION_KEY}"
    if not (math.isfinite(value) and 0.0 <= value < tr):
        return None, (
            f"bSSFP RF pulse duration {given!r} ({source}, e.g. {series[0].magnitude[0]}) "
            f"is not a time in seconds in [0, TR = {tr:g} s); fix it (e.g. 0.001 for 1 ms)"
        )
    return (value, source), None


def _describe_r2(inputs, options):
    from .registry import BuildContext
    from .relaxometry import spoiling_corrected

    series = inputs.bssfp
    flips = ", ".join(f"{s.flip_angle:g}" for s in series)
    combination = resolve_combination(inputs, options["bssfp_combination"])
    method = "DESPOT2"
    if combination == JOINT_MAGNITUDE_FIT:
        method = "DESPOT2-FM (joint fit of every cycle's magnitude with the off-resonance)"
        data = "complex, phase not used" if _has_phase(inputs) else "magnitude only"
    elif _has_phase(inputs):
        data = "complex"
    else:
        data = (
            f"WARNING: magnitude only, band-reduced not band-free (R2 biased; --bssfp-combination "
            f"{JOINT_MAGNITUDE_FIT} is not)"
        )
    refit = (
        "; R1 refitted with this R2's T2 (spoiling correction), then R2 with that R1"
        if spoiling_corrected(BuildContext(inputs=inputs, options=options))
        else ""
    )
    (duration, _), _ = pulse_duration(inputs, options)
    pulses = f"finite-pulse correction for {duration * 1e3:g} ms pulses" if duration > 0 else "instantaneous pulses"
    return (
        f"{method} from {len(series[0].phase_increments)} bSSFP phase cycles ({data}) at flip {flips} deg, "
        f"TR {series[0].repetition_time * 1e3:g} ms, {pulses}; R1 and B1+ from the R1 family{refit}"
    )


def _b1_note(context):
    """None when the R1 family's B1+ map reaches R2, else why not.

    Without B1+ data the R1 family estimates the field from the VFA data (unless
    ``--no-b1-estimate``) and passes that map on, as it does a measured one: R2 uses it too, as the
    refit of R1 inside this family and MTsat do.
    """
    if context.options.get("r1_no_b1_correction"):
        return "turned off (--no-b1-correction)"
    if "b1" not in context.running:
        from .relaxometry import _no_b1_reason

        if context.options.get("r1_no_b1_estimate", False):
            return f"{_no_b1_reason(context.inputs)}; --no-b1-estimate"
    return None


# Peak memory of the R2 nodes, from benchmarks/bench_nodes.py on the 1 mm phantom (191 x 227 x 201
# voxels, 2 flip angles x 4 cycles, 2 threads: band-free 1.07-1.14 GB, DESPOT2 0.83-0.96 GB):
# what stays besides the interpreter and the chunks' temporaries, in bytes per voxel of the grid.
_R2_BASE_GB = 0.25
_R2_CHUNK_BYTES_PER_CYCLE = {"geometric": 200, "ellipse": 250, "rms": 200, "max": 200, JOINT_MAGNITUDE_FIT: 200}


def _node_mem_gb(mem_gb, node):
    """A node's memory from ``mem_gb`` given for all nodes (float) or by node (dict)."""
    return mem_gb[node] if isinstance(mem_gb, dict) else mem_gb


def estimate_r2_mem_gb(bssfp_file, map_file, n_cycle, n_flip, *, combination="geometric", n_threads=1):
    """Peak memory (GB) of the R2 nodes: ``{"band_free": GB, "fit": GB}``, with 30 % margin.

    The band-free step holds one flip angle's magnitude and phase stacks (float32), the complex64
    cycles of the voxels it combines (at most half the grid in a head), the band-free signal of
    every flip angle and the off-resonance phasor sum; plus, per thread, a chunk of 100 000 voxels'
    temporaries (about 200 bytes per voxel and cycle, 250 for the ellipse fit). DESPOT2 holds the
    band-free stack, R1 and B1+ (float32 and float64), its float64 outputs and their float32 copies.
    ``despot2-fm`` (counted, not measured): the band-free step also keeps every cycle's float32
    magnitude, and the fit reads them (float32, plus its own float32 copy) and works on chunks of
    50 000 voxels (about 200 bytes per voxel and sample).
    """
    import nibabel as nib
    import numpy as np

    n_bssfp = int(np.prod(nib.load(bssfp_file).shape[:3]))
    n_map = int(np.prod(nib.load(map_file).shape[:3]))
    band_free = n_bssfp * (8 * n_cycle + 4 * n_cycle + 8 * n_flip + 34) + max(n_map - n_bssfp, 0) * 8 * n_flip
    band_free_chunks = 100_000 * n_cycle * _R2_CHUNK_BYTES_PER_CYCLE[combination] * max(n_threads, 1)
    fit = n_map * (4 * n_flip + 76)
    fit_chunks = 200_000 * (24 * n_flip + 100) * max(n_threads, 1)
    if combination == JOINT_MAGNITUDE_FIT:
        band_free += n_bssfp * 4 * n_flip * n_cycle
        fit += n_map * 8 * n_flip * n_cycle
        fit_chunks += 50_000 * 200 * n_flip * n_cycle * max(n_threads, 1)
    return {
        "band_free": round(_R2_BASE_GB + 1.3 * (band_free + band_free_chunks) / 1e9, 2),
        "fit": round(_R2_BASE_GB + 1.3 * (fit + fit_chunks) / 1e9, 2),
    }


def _build_r2(context):
    from .base import map_grid_file
    from .r2star import estimate_denoise_mem_gb
    from .relaxometry import r1_fit_mem_gb, r1_settings, spoiling_corrected

    inputs, options = context.inputs, context.options
    series = inputs.bssfp
    combination = resolve_combination(inputs, options["bssfp_combination"])
    n_cycle = len(series[0].phase_increments)
    refine_r1 = r1_settings(context) if spoiling_corrected(context) else None
    mem_gb = estimate_r2_mem_gb(
        series[0].magnitude[0],
        map_grid_file(inputs),
        n_cycle,
        len(series),
        combination=combination,
        n_threads=context.omp_nthreads,
    )
    if refine_r1 is not None:
        mem_gb["refit_r1"] = r1_fit_mem_gb(context)
    (duration, duration_source), _ = pulse_duration(inputs, options)
    magnitude_files = [path for s in series for path in s.magnitude]
    denoise = _denoise_method(options)
    workflow = init_r2_wf(
        flip_angles=[s.flip_angle for s in series],
        phase_increments=list(series[0].phase_increments),
        repetition_time=series[0].repetition_time,
        combination=combination,
        method=options["r2_method"],
        with_phase=_has_phase(inputs),
        pulse_duration=duration,
        pulse_duration_source=duration_source,
        b1_note=_b1_note(context),
        refine_r1=refine_r1,
        denoise=denoise,
        denoise_search_radius=options.get("denoise_search_radius", 2),
        n_coils=options.get("n_coils", 1),
        # complex data are denoised as 2 C real and imaginary parts (1 mm phantom, 8 complex cycles:
        # measured 3.16 GB, estimated 3.9 GB)
        denoise_mem_gb=estimate_denoise_mem_gb(
            magnitude_files[0], len(magnitude_files) * (2 if _has_phase(inputs) else 1)
        ),
        mem_gb=mem_gb,
        omp_nthreads=context.omp_nthreads,
    )
    workflow.inputs.inputnode.magnitude_files = magnitude_files
    if _has_phase(inputs):
        workflow.inputs.inputnode.phase_files = [path for s in series for path in s.phase]
        workflow.inputs.inputnode.phase_scale = float(series[0].phase_scale)
    workflow.inputs.inputnode.reference_file = map_grid_file(inputs)
    return workflow


def _denoise_method(options):
    """``--denoise`` for the phase cycles (``none`` still measures and writes their noise map, as for the GRE)."""
    return (options or {}).get("denoise", "none")


#: ``desc-`` of the phase cycles' noise map (the GRE's is ``desc-noise``).
BSSFP_NOISE_MAP_DESC = "bssfpnoise"


def _r2_outputs(inputs):
    from .r2star import NOISE_MAP_SUFFIX
    from .registry import Output

    sources = tuple(path for s in inputs.bssfp for path in (*s.magnitude, *(s.phase or ())))
    masked = {"SkullStripped": True}
    outputs = [
        Output(
            field="r2_file",
            suffix="R2map",
            source_files=sources,
            metadata={**masked, "Units": "1/s"},
            quantitative=True,
        ),
        Output(
            field="t2_file",
            suffix="T2map",
            source_files=sources,
            metadata={**masked, "Units": "s", "Description": "1/R2; NaN where R2 is undetermined or not positive"},
        ),
        Output(
            field="r2_stderr_file",
            suffix="R2map",
            desc="stderr",
            source_files=sources,
            metadata={
                **masked,
                "Units": "1/s",
                "Description": "Standard error of R2 (1/s) from the Jacobian of the DESPOT2 fit at the estimate, "
                "with R1 and B1+ taken as exact; NaN where unknown",
            },
        ),
    ]
    outputs.append(
        Output(
            field="noise_map_file",
            suffix=NOISE_MAP_SUFFIX,
            desc=BSSFP_NOISE_MAP_DESC,
            source_files=tuple(path for s in inputs.bssfp for path in s.magnitude),
            metadata={
                "Description": "Noise standard deviation per receive channel and per real/imaginary part of the "
                "bSSFP phase-cycle magnitudes, voxel by voxel (homomorphic estimate, Aja-Fernandez et al. 2015), "
                "in their units; the sigma of their non-local-means denoising (--denoise) and of its bias "
                "correction; 0 where the air holds no measurable noise",
                "Units": "arbitrary (units of the magnitude images)",
            },
        )
    )
    if _has_phase(inputs):
        tr = inputs.bssfp[0].repetition_time
        outputs.append(
            Output(
                field="offresonance_file",
                suffix="fieldmap",
                desc=OFFRESONANCE_DESC,
                datatype="fmap",
                source_files=sources,
                metadata={
                    "Units": "Hz",
                    "Description": "Off-resonance frequency (B0 inhomogeneity plus chemical shift) from the "
                    "phase-cycled bSSFP, known modulo 1/TR: values in [-1/(2 TR), 1/(2 TR)) = "
                    f"[{-0.5 / tr:g}, {0.5 / tr:g}) Hz; a positive frequency advances the transverse phase; "
                    "averaged over the flip angles, weighted by the squared band-free signal",
                    "RepetitionTimeExcitation": tr,
                    # computed inside the brain mask only when the bSSFP shares the map grid
                    "SkullStripped": False,
                },
            )
        )
    return outputs


def _pulse_seconds(text):
    import argparse

    value = float(text)
    if not (math.isfinite(value) and 0.0 <= value < 0.05):
        raise argparse.ArgumentTypeError(f"an RF pulse duration in seconds (0 to 0.05, e.g. 0.001), got {text}")
    return value


def _registry_entries():
    from ..io.query import BSSFP
    from .registry import MapFamily, Option

    r2 = MapFamily(
        key="r2",
        name="R2",
        needs=(BSSFP,),
        depends=("brainmask", "r1"),
        uses=("r2star",),
        consumes={
            "mask_file": ("brainmask", "mask_file"),
            "r1_file": ("r1", "r1_file"),
            "b1_file": ("r1", "b1_file"),
            "t1_file": ("r1", "t1_file"),
            "m0_file": ("r1", "m0_file"),
            "r1_stderr_file": ("r1", "r1_stderr_file"),
            "r1_metadata": ("r1", "metadata"),
            # the signals the R1 family fitted (S0 of the R2* fit, or the denoised single-echo images)
            "r1_signal_files": ("r1", "signal_files"),
            "r1_flip_angles": ("r1", "flip_angles"),
            "r2star_file": ("r2star", "r2star_file"),
            "r2star_stderr_file": ("r2star", "r2star_stderr_file"),
        },
        # R1's spoiling correction depends on T2: the R1 this family refits with its own R2 is the one
        # published and used (init_r2_wf's refine_r1)
        supersedes={("r1", field): f"refined_{field}" for field in REFINED_R1_FIELDS},
        check=_check_r2,
        check_options=True,
        describe=_describe_r2,
        describe_options=True,
        build=_build_r2,
        outputs=_r2_outputs,
        options=(
            Option(
                ("--r2-method",),
                "r2_method",
                {
                    "choices": R2_METHOD_CHOICES,
                    "default": "nonlinear",
                    "help": "DESPOT2 estimator on the band-free bSSFP signals: non-linear least squares (default) "
                    "or the linearised regression",
                },
            ),
            Option(
                ("--bssfp-combination",),
                "bssfp_combination",
                {
                    "choices": BSSFP_COMBINATION_CHOICES,
                    "default": "auto",
                    "help": "band-free signal per flip angle from its phase cycles: geometric solution "
                    "(complex data, cycles in opposite pairs), ellipse fit (complex data); for magnitude-only "
                    f"data {JOINT_MAGNITUDE_FIT}, no combination but the joint fit of every cycle's magnitude with "
                    "the off-resonance (Deoni 2009), or the root mean square (rms) or maximum (max) over cycles, "
                    "which are band-reduced, not band-free (R2 biased); auto (default): geometric, else ellipse, "
                    f"else {JOINT_MAGNITUDE_FIT}",
                },
            ),
            Option(
                ("--bssfp-pulse-duration",),
                "bssfp_pulse_duration",
                {
                    "type": _pulse_seconds,
                    "default": None,
                    "metavar": "SECONDS",
                    "help": "duration (s) of the bSSFP RF pulses, for DESPOT2's finite-pulse correction (1 ms pulses "
                    "at TR 5 ms bias R2 by about -8 %% uncorrected); default: the sidecars' RFPulseDuration, else 0 "
                    "(instantaneous pulses, no correction)",
                },
            ),
        ),
    )
    return (r2,)


MAP_FAMILIES = _registry_entries()
