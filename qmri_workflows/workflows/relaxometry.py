"""B1+ (transmit field) and R1 mapping workflows, and their registry entries.

Outputs (``docs/architecture.rst``, "R1 and B1+"): ``fmap/..._TB1map`` (percent of the nominal flip
angle, from the AFI or double-angle pair or the Siemens tfl_b1map, on the map grid),
``anat/..._R1map`` (1/s), ``_T1map`` (s), ``_M0map`` (arbitrary units) and ``_desc-stderr_R1map``
(1/s).

The R1 family takes the TE = 0 intercepts of the R2* (ESTATICS) fit when the VFA data are
multi-echo, otherwise the single-echo images; the B1+ map when the B1 family runs (AFI pair,
double-angle pair, Siemens tfl_b1map, or a pre-computed ``TB1map``); without one it runs
uncorrected for B1+ and says so in the plan and in its sidecars.
"""

from __future__ import annotations

R1_METHOD_CHOICES = ("exact", "linear", "nonlinear")
MIN_FLIP_ANGLES_R1 = 2


def init_b1_wf(*, source="afi", smoothing_fwhm=8.0, n_coils=1, mem_gb=1.0, name="b1_wf"):
    """Build a workflow that makes the B1+ map (percent of nominal) on the map grid.

    Parameters
    ----------
    source : {"afi", "dam", "tfl", "tb1map"}
        From an AFI pair, a double-angle pair, the famp image of a Siemens tfl_b1map (on any grid),
        or a pre-computed TB1map (already on the map grid).
    smoothing_fwhm : float
        Smoothing of the pair's map (mm).
    n_coils : int
        Receive channels of the pair's magnitudes (root-sum-of-squares), for their noise floor.
    mem_gb : float
        Memory of the node (GB).
    name : str
        Workflow name.

    Inputs
    ------
    tr1_file, tr2_file, repetition_time_1, repetition_time_2, flip_angle, reference_file
        The AFI pair, its protocol and an image on the map grid (``source="afi"``).
    flip1_file, flip2_file, flip_angles, repetition_time, reference_file
        The double-angle pair (smaller angle first), its protocol and an image on the map grid
        (``source="dam"``).
    vfa_files, vfa_flip_angles, vfa_repetition_time, vfa_phase_increment, vfa_gradient_moment
        One VFA image per flip angle at one echo time, for the T1 the double-angle reading needs,
        and their spoiling for its correction (``source="dam"``; optional).
    t1_note
        Why there are no ``vfa_files`` (``source="dam"``; for the sidecar).
    famp_file, anat_file, prep_angle, angle_source, reference_file
        The tfl_b1map's famp image, its reference image (optional: the head of the fold check),
        the nominal preparation angle (deg), where that angle comes from, and an image on the map
        grid (``source="tfl"``).
    tb1map_file, units, source_name
        The resampled user map, its sidecar ``Units`` and its original path (``source="tb1map"``).

    Outputs
    -------
    tb1map_file
        B1+ in percent of the nominal flip angle, on the map grid.
    metadata
        Sidecar fields.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.relaxometry import AFIFlipAngleMap, DAMFlipAngleMap, ReadTB1map, ReadTFLMap

    workflow = pe.Workflow(name=name)
    pairs = {
        "afi": (
            AFIFlipAngleMap,
            ["tr1_file", "tr2_file", "repetition_time_1", "repetition_time_2", "flip_angle", "reference_file"],
        ),
        "dam": (
            DAMFlipAngleMap,
            ["flip1_file", "flip2_file", "flip_angles", "repetition_time", "reference_file"]
            + ["vfa_files", "vfa_flip_angles", "vfa_repetition_time", "vfa_phase_increment", "vfa_gradient_moment"]
            + ["t1_note"],
        ),
    }
    if source in pairs:
        interface, fields = pairs[source]
        node = pe.Node(interface(smoothing_fwhm=smoothing_fwhm, n_coils=n_coils), name=f"{source}_b1", mem_gb=mem_gb)
        connections = [(field, field) for field in fields]
    elif source == "tfl":
        # brought linearly onto the map grid by the node itself (its masked zeros are no data there),
        # then scaled, not smoothed
        fields = ["famp_file", "anat_file", "prep_angle", "angle_source", "reference_file"]
        node = pe.Node(ReadTFLMap(), name="read_tfl", mem_gb=mem_gb)
        connections = [("famp_file", "in_file"), ("anat_file", "anat_file"), ("reference_file", "reference_file")]
        connections += [("prep_angle", "prep_angle"), ("angle_source", "angle_source"), ("famp_file", "source_name")]
    elif source == "tb1map":
        fields = ["tb1map_file", "units", "source_name"]
        node = pe.Node(ReadTB1map(), name="read_tb1map", mem_gb=mem_gb)
        connections = [("tb1map_file", "in_file"), ("units", "units"), ("source_name", "source_name")]
    else:
        raise ValueError(f"B1+ source must be 'afi', 'dam', 'tfl' or 'tb1map', got {source!r}")
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["tb1map_file", "metadata"]), name="outputnode")
    workflow.connect([
        (inputnode, node, connections),
        (node, outputnode, [("tb1map_file", "tb1map_file"), ("metadata", "metadata")]),
    ])  # fmt: skip
    return workflow


def init_r1_wf(
    *,
    repetition_time,
    method="linear",
    spoiling_correction=True,
    phase_increment=None,
    manufacturer=None,
    gradient_moment=None,
    tissue_t2=None,
    signal_kind="TE = 0 intercepts of the ESTATICS fit",
    b1_note=None,
    estimate_b1=False,
    afi_protocol=None,
    b1_description=None,
    echo_times=None,
    field_strength=None,
    n_coils=1,
    denoise=None,
    denoise_search_radius=2,
    denoise_mem_gb=None,
    mem_gb=1.0,
    omp_nthreads=1,
    name="r1_wf",
):
    """Build a workflow that maps R1, T1 and M0 by DESPOT1 (B1+ and spoiling corrected).

    Parameters
    ----------
    repetition_time : float
        TR (s) of the VFA series.
    method : {"exact", "linear", "nonlinear"}
        DESPOT1 estimator (exact needs exactly two flip angles).
    spoiling_correction : bool
        Correct for imperfect RF spoiling.
    phase_increment : float, optional
        ``SpoilingRFPhaseIncrement`` (deg).
    manufacturer : str, optional
        ``Manufacturer`` (vendor default increment when ``phase_increment`` is missing).
    gradient_moment : float, optional
        ``SpoilingGradientMoment`` (mT s/m).
    tissue_t2 : float, optional
        T2 (s) the spoiling correction assumes (default ``core.relaxometry.DEFAULT_TISSUE_T2``).
    signal_kind : str
        What ``signal_files`` are (for the sidecar).
    b1_note : str, optional
        Why no B1+ map reaches the workflow (recorded when ``b1_file`` is undefined).
    estimate_b1 : bool, optional
        Without a B1+ map (``b1_note`` given), estimate a smooth B1+ field from the VFA signals
        themselves (:func:`qmri_workflows.core.relaxometry.estimate_b1_from_vfa`: B1+ smooth, R1
        constant within each of three tissue classes, mean B1+ 1 over the brain) and correct with it.
    afi_protocol : tuple of float, optional
        ``(TR1, TR2, flip angle in deg)`` of the AFI pair the B1+ map comes from: its finite-T1
        bias is then removed with the fitted T1 (:func:`~qmri_workflows.core.relaxometry.afi_t1_bias`).
    b1_description : str, optional
        Which B1+ map ``b1_file`` is (the sidecar's ``B1Correction``).
    echo_times : list of list of float, optional
        Echo times (s) of each flip angle when ``signal_files`` are ESTATICS intercepts: then
        ``r2star_file`` and ``r2star_stderr_file`` are connected, for the T2 prior of the spoiling
        correction and for the noise of the intercepts (R1 standard error).
    field_strength : float, optional
        B0 (T) for the T2 prior from R2* (3 T when unknown).
    n_coils : int, optional
        Receive channels, for the noise of single-echo images measured in the air.
    denoise : {"multispectral", "nlm", "none"}, optional
        Single-echo images only: the denoising of the R2* family's magnitudes
        (``interfaces.denoise.DenoiseCollection``: noise map, non-local means with one set of weights
        for all flip angles or per image, bias correction) applied to them before the fit and the
        B1+ estimate; "none" makes the noise map only. None (ESTATICS intercepts): the signals
        arrive fitted to magnitudes the R2* family already denoised, and are used as they come.
    denoise_search_radius : int, optional
        Search radius (voxels) of the non-local means.
    denoise_mem_gb : float, optional
        Memory of the denoising node (GB); ``mem_gb`` when None.
    mem_gb : float
        Memory of the fitting node (GB).
    omp_nthreads : int
        Threads of the fitting node.
    name : str
        Workflow name.

    Inputs
    ------
    signal_files
        One image per flip angle (ESTATICS S0 or single-echo).
    flip_angles
        Their nominal flip angles (deg).
    mask_file
        Brain mask.
    b1_file
        B1+ in percent of nominal on the map grid (optional).
    r2star_file, r2star_stderr_file
        R2* and its standard error from the ESTATICS fit (with ``echo_times``).

    Outputs
    -------
    r1_file, t1_file, m0_file, r1_stderr_file
        R1 (1/s), T1 (s), M0 (arbitrary), standard error of R1 (1/s).
    b1_file
        The B1+ ratio map (1 = nominal) the fit used, on the map grid (ones without B1+ data).
    signal_files, flip_angles
        The signals the fit used (denoised single-echo images, or the inputs), for a refit.
    noise_map_file
        Noise SD per channel, voxel by voxel (with ``denoise`` only).
    metadata
        Sidecar fields.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.relaxometry import FitR1
    from ..interfaces.utility import MergeMetadata

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=["signal_files", "flip_angles", "mask_file", "b1_file", "r2star_file", "r2star_stderr_file"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        IdentityInterface(
            fields=[
                "r1_file",
                "t1_file",
                "m0_file",
                "r1_stderr_file",
                "b1_file",
                "signal_files",
                "flip_angles",
                "noise_map_file",
                "metadata",
            ]
        ),
        name="outputnode",
    )
    fit = pe.Node(
        FitR1(
            repetition_time=repetition_time,
            method=method,
            spoiling_correction=spoiling_correction,
            signal_kind=signal_kind,
            n_coils=n_coils,
            # denoised: the denoising node's "applied" when there is one (single-echo images)
            num_threads=omp_nthreads,
        ),
        name="fit_r1",
        mem_gb=mem_gb,
        n_procs=omp_nthreads,
    )
    # what the fit (and the B1+ estimate) reads: the inputs, or their denoised copies
    signals, signals_field = inputnode, "signal_files"
    if denoise is not None:
        from .r2star import init_denoise_node

        denoise_node = init_denoise_node(
            denoise,
            n_coils=n_coils,
            search_radius=denoise_search_radius,
            mem_gb=mem_gb if denoise_mem_gb is None else denoise_mem_gb,
            omp_nthreads=omp_nthreads,
        )
        merge_metadata = pe.Node(MergeMetadata(), name="merge_metadata", run_without_submitting=True)
        workflow.connect([
            (inputnode, denoise_node, [("signal_files", "magnitude_files"), ("flip_angles", "flip_angles"),
                                       ("mask_file", "mask_file")]),
            (denoise_node, outputnode, [("noise_map_file", "noise_map_file")]),
            # "applied", not the option: without noise in the air the images pass raw
            (denoise_node, fit, [("applied", "denoised")]),
            (fit, merge_metadata, [("metadata", "base")]),
            (denoise_node, merge_metadata, [("metadata", "update")]),
            (merge_metadata, outputnode, [("out_dict", "metadata")]),
        ])  # fmt: skip
        signals, signals_field = denoise_node, "denoised_files"
    else:
        workflow.connect([(fit, outputnode, [("metadata", "metadata")])])
    _set_t2_and_noise_inputs(
        workflow,
        inputnode,
        fit,
        dict(
            phase_increment=phase_increment,
            manufacturer=manufacturer,
            gradient_moment=gradient_moment,
            tissue_t2=tissue_t2,
            field_strength=field_strength,
            echo_times=echo_times,
        ),
    )
    if b1_note is not None:
        fit.inputs.b1_note = b1_note
    if b1_description is not None:
        fit.inputs.b1_description = b1_description
    if afi_protocol is not None:
        fit.inputs.afi_repetition_times = [float(afi_protocol[0]), float(afi_protocol[1])]
        fit.inputs.afi_flip_angle = float(afi_protocol[2])
    workflow.connect([
        (signals, fit, [(signals_field, "signal_files")]),
        (signals, outputnode, [(signals_field, "signal_files")]),
        (inputnode, fit, [("flip_angles", "flip_angles"), ("mask_file", "mask_file")]),
        (inputnode, outputnode, [("flip_angles", "flip_angles")]),
        (fit, outputnode, [("r1_file", "r1_file"), ("t1_file", "t1_file"), ("m0_file", "m0_file"),
                           ("r1_stderr_file", "r1_stderr_file")]),
    ])  # fmt: skip
    if b1_note is None:
        # B1+ data feed the fit: the map it used is the PD family's transmit field
        workflow.connect([
            (inputnode, fit, [("b1_file", "b1_file")]),
            (fit, outputnode, [("b1_file", "b1_file")]),
        ])  # fmt: skip
    elif estimate_b1:
        from ..interfaces.pd import EstimateB1FromVFA

        estimate = pe.Node(
            EstimateB1FromVFA(repetition_time=repetition_time, no_map_reason=b1_note), name="estimate_b1", mem_gb=mem_gb
        )
        workflow.connect([
            (signals, estimate, [(signals_field, "signal_files")]),
            (inputnode, estimate, [("flip_angles", "flip_angles"), ("mask_file", "mask_file")]),
            (estimate, fit, [("b1_file", "b1_file"), ("description", "b1_description")]),
            (fit, outputnode, [("b1_file", "b1_file")]),
        ])  # fmt: skip
    return workflow


# --------------------------------------------------------------------------------------------------
# registry entries
# --------------------------------------------------------------------------------------------------
def _b1_source(inputs):
    """``"tb1map"``, ``"afi"``, ``"dam"``, ``"tfl"``, or None.

    A TB1map given with ``--derivatives`` wins (the user chose it), then the AFI pair and the
    double-angle pair (raw data the App maps with its own corrections; AFI's steady state has the
    smaller T1 bias), then the Siemens tfl_b1map (the scanner's own map, read with a nominal angle
    the user or the sidecar gives), then a pre-computed ``fmap/*_TB1map`` of the raw dataset.
    """
    from ..io.query import AFI, DAM, TB1MAP, TFL

    given = inputs.derivatives.get(TB1MAP)
    if given is not None and given.origin == "derivatives":
        return "tb1map"
    if inputs.has(AFI):
        return "afi"
    if inputs.has(DAM):
        return "dam"
    if inputs.has(TFL):
        return "tfl"
    if given is not None:
        return "tb1map"
    return None


def _b1_sources(inputs):
    """The raw files of the B1+ map R1 reads when it has one (for ``Sources``: a TB1map of a
    derivatives dataset has no ``bids:raw`` address)."""
    source = _b1_source(inputs)
    if source == "afi":
        return (inputs.afi.tr1_file, inputs.afi.tr2_file)
    if source == "dam":
        return (inputs.dam.flip1_file, inputs.dam.flip2_file)
    if source == "tfl":
        return tuple(path for path in (inputs.tfl.famp_file, inputs.tfl.anat_file) if path)
    derived = inputs.derivatives.get("TB1map")
    if source == "tb1map" and derived.origin == "raw":
        return (derived.path,)
    return ()


_B1_SOURCE_NAMES = {
    "tb1map": "the TB1map",
    "afi": "AFI",
    "dam": "the double-angle pair",
    "tfl": "the Siemens tfl_b1map",
}


def _b1_correction_text(inputs):
    """R1's ``B1Correction``: which B1+ map corrects the flip angles (the plan's words)."""
    return f"TB1map ({_describe_b1(inputs)}), actual / nominal flip angle"


def _tb1map_origin(derived):
    return "given with --derivatives" if derived.origin == "derivatives" else "pre-computed in the raw dataset's fmap"


def _no_b1_reason(inputs):
    """Why the subject has no usable B1+ data (for the plans of B1+ and R1)."""
    from ..io.query import AFI, DAM, TB1MAP, TFL

    reasons = []
    for collection in (AFI, DAM, TFL, TB1MAP):
        problem = inputs.problem(collection)
        if problem is not None:
            reasons.append(f"{collection} unusable: {problem.message}")
    if inputs.unsupported_transmit:
        reasons.append(
            f"transmit-field data of a kind this version cannot process ({', '.join(inputs.unsupported_transmit)}); "
            "only an AFI pair (fmap/*_acq-tr1_TB1AFI + *_acq-tr2_TB1AFI), a double-angle pair "
            "(fmap/*_flip-<n>_TB1DAM), a Siemens tfl_b1map (fmap/*_acq-famp_TB1TFL) or a TB1map (fmap/*_TB1map, "
            "or given with --derivatives) is used"
        )
    if not reasons:
        reasons.append(
            "no B1+ data (no TB1AFI or TB1DAM pair, no TB1TFL, no TB1map in fmap or given with --derivatives)"
        )
    return "; ".join(reasons)


def _check_b1(inputs):
    return None if _b1_source(inputs) else _no_b1_reason(inputs)


def _describe_b1(inputs):
    derived = inputs.derivatives.get("TB1map")
    source = _b1_source(inputs)
    # the raw sources in the order of _b1_source
    raw_sources = (
        ("afi", "AFI pair", inputs.afi),
        ("dam", "double-angle pair", inputs.dam),
        ("tfl", "tfl_b1map", inputs.tfl),
    )
    unused = [name for _, name, present in raw_sources if present]
    if source == "tb1map":
        units_text = derived.units_read or f"Units {derived.metadata.get('Units')!r}"
        return f"TB1map {_tb1map_origin(derived)} ({derived.path}; {units_text})" + (
            f", used instead of the {' and the '.join(unused)}" if unused else ""
        )
    rank = [key for key, _, _ in raw_sources].index(source)
    not_used = [name for _, name, present in raw_sources[rank + 1 :] if present]
    if source == "afi":
        afi = inputs.afi
        text = f"AFI pair, flip {afi.flip_angle:g} deg, TR1/TR2 {afi.tr1 * 1e3:g}/{afi.tr2 * 1e3:g} ms"
    elif source == "tfl":
        tfl = inputs.tfl
        text = f"{tfl.scale_text} ({tfl.famp_file}; median {tfl.median_ratio:.3g} of nominal in the head)"
    else:
        dam = inputs.dam
        angles = "/".join(f"{angle:g}" for angle in dam.flip_angles)
        text = f"double-angle pair, flip {angles} deg, TR {dam.repetition_time * 1e3:g} ms"
        series, why_not = _dam_t1_series(inputs)
        if series:
            text += f", read at each voxel's T1 (DESPOT1 of the first echoes at flip {_degrees(series)} deg)"
        else:
            # the long-TR reading is high by several percent at a TR of seconds: the user must see it
            text += f", long-TR model (full relaxation; reads high where T1 is not short against TR): {why_not}"
    if not_used:
        text += f" (the {' and the '.join(not_used)} {'is' if len(not_used) == 1 else 'are'} not used)"
    return text + (f" (the pre-computed {derived.path} is not used)" if derived is not None else "")


def _dam_t1_series(inputs):
    """``(series, "")``: the VFA series whose first echoes give the T1 a double-angle pair is read
    at, or ``((), why_not)``."""
    with_flip = [series for series in inputs.gre if series.flip_angle and series.repetition_time]
    if len({series.flip_angle for series in with_flip}) < 2:
        return (), f"no T1 from the {inputs.gre_suffix or 'GRE'} data (fewer than two flip angles)"
    if len({series.repetition_time for series in with_flip}) > 1:
        return (), "no T1 from the VFA images (their flip angles have different TRs)"
    if len({round(series.echo_times[0], 6) for series in with_flip}) > 1:
        # T2* would weigh the first echoes differently and bias DESPOT1
        first = ", ".join(f"{series.echo_times[0] * 1e3:g}" for series in with_flip)
        return (), f"no T1 from the VFA images (their first echoes are at different TEs: {first} ms)"
    return tuple(with_flip), ""


def _degrees(series):
    return ", ".join(f"{one.flip_angle:g}" for one in series)


def _build_b1(context):
    from ..io.query import TB1MAP
    from .base import estimate_fit_mem_gb, map_grid_file

    inputs = context.inputs
    source = _b1_source(inputs)
    workflow = init_b1_wf(
        source=source,
        n_coils=context.options.get("n_coils", 1),
        # the double-angle node also holds the VFA images and DESPOT1's working maps for its T1:
        # 1.72 GiB measured at 1 mm with two flip angles (benchmarks/bench_dam.py), 1.89 estimated
        mem_gb=estimate_fit_mem_gb(map_grid_file(inputs), 4 + (3 * len(inputs.gre) if source == "dam" else 0)),
    )
    if source == "dam":
        dam = inputs.dam
        workflow.inputs.inputnode.flip1_file = dam.flip1_file
        workflow.inputs.inputnode.flip2_file = dam.flip2_file
        workflow.inputs.inputnode.flip_angles = tuple(dam.flip_angles)
        workflow.inputs.inputnode.repetition_time = dam.repetition_time
        workflow.inputs.inputnode.reference_file = map_grid_file(inputs)
        series, why_not = _dam_t1_series(inputs)
        if series:
            workflow.inputs.inputnode.vfa_files = [one.magnitude[0] for one in series]
            workflow.inputs.inputnode.vfa_flip_angles = [float(one.flip_angle) for one in series]
            workflow.inputs.inputnode.vfa_repetition_time = float(series[0].repetition_time)
            from ..interfaces.relaxometry import spoiling_choice

            increment_sidecar, manufacturer, moment = _spoiling_sidecar(inputs)
            enabled = not context.options.get("r1_no_spoiling_correction", False)
            increment, _ = spoiling_choice(enabled, increment_sidecar, manufacturer)
            if increment is not None:  # the T1 that DAM needs, corrected as the R1 fit corrects its own
                workflow.inputs.inputnode.vfa_phase_increment = increment
                if moment is not None:
                    workflow.inputs.inputnode.vfa_gradient_moment = moment
        else:
            workflow.inputs.inputnode.t1_note = why_not
    elif source == "tfl":
        tfl = inputs.tfl
        workflow.inputs.inputnode.famp_file = tfl.famp_file
        if tfl.anat_file:
            workflow.inputs.inputnode.anat_file = tfl.anat_file
        workflow.inputs.inputnode.prep_angle = tfl.prep_angle
        workflow.inputs.inputnode.angle_source = tfl.angle_source
        workflow.inputs.inputnode.reference_file = map_grid_file(inputs)
    elif source == "afi":
        afi = inputs.afi
        workflow.inputs.inputnode.tr1_file = afi.tr1_file
        workflow.inputs.inputnode.tr2_file = afi.tr2_file
        workflow.inputs.inputnode.repetition_time_1 = afi.tr1
        workflow.inputs.inputnode.repetition_time_2 = afi.tr2
        workflow.inputs.inputnode.flip_angle = afi.flip_angle
        workflow.inputs.inputnode.reference_file = map_grid_file(inputs)
    else:
        derived = inputs.derivatives[TB1MAP]
        workflow.inputs.inputnode.source_name = derived.path
        units = derived.metadata.get("Units")
        if units is not None:
            workflow.inputs.inputnode.units = str(units)
    return workflow


def _b1_outputs(inputs):
    from .registry import Output

    if _b1_source(inputs) not in ("afi", "dam", "tfl"):
        return []  # the user's own map is used as it is: nothing new to publish
    return [
        Output(
            field="tb1map_file",
            suffix="TB1map",
            source_files=_b1_sources(inputs),
            metadata={
                "Units": "percent",
                "Description": "B1+ as percent of the nominal flip angle (100 = nominal), on the grid of the maps",
            },
        )
    ]


def _flip_angles(inputs):
    return [series.flip_angle for series in inputs.gre if series.flip_angle]


def _check_r1(inputs):
    if inputs.gre_suffix not in ("VFA", "MPM"):
        return f"{inputs.gre_suffix} data have one flip angle; R1 needs a VFA or MPM collection with at least two"
    flips = sorted(set(_flip_angles(inputs)))
    if len(flips) < MIN_FLIP_ANGLES_R1:
        return f"{len(flips)} flip angle(s); R1 needs at least {MIN_FLIP_ANGLES_R1} different ones"
    return None


def _multi_echo(inputs):
    from .r2star import _check_r2star

    return _check_r2star(inputs) is None


def _spoiling_sidecar(inputs):
    """(phase increment deg or None, Manufacturer or None, gradient moment or None) of the GRE sidecars."""
    metadata = inputs.gre[0].metadata

    def number(key):
        value = metadata.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    manufacturer = metadata.get("Manufacturer")
    return (
        number("SpoilingRFPhaseIncrement"),
        (str(manufacturer) if manufacturer else None),
        number("SpoilingGradientMoment"),
    )


def _describe_r1(inputs, options=None):
    from ..core.relaxometry import DEFAULT_TISSUE_T2
    from ..interfaces.relaxometry import spoiling_choice

    flips = ", ".join(f"{flip:g}" for flip in _flip_angles(inputs))
    signals = "S0 of the R2* fit" if _multi_echo(inputs) else "single-echo images"
    denoise = (options or {}).get("denoise", "none")
    if not _multi_echo(inputs) and denoise != "none":
        signals = f"{signals} denoised ({denoise} non-local means)"
    b1 = (
        f"B1+ from {_B1_SOURCE_NAMES[_b1_source(inputs)]}"
        if _b1_source(inputs)
        else f"B1+ estimated from the VFA data, no B1+ map ({_no_b1_reason(inputs)}) unless --no-b1-estimate"
    )
    if options is not None and options.get("r1_no_spoiling_correction"):
        spoiling = "no spoiling correction (--no-spoiling-correction)"
    else:
        increment, source = spoiling_choice(True, *_spoiling_sidecar(inputs)[:2])
        from ..io.query import BSSFP

        then = "; refitted with the R2 map where R2 runs" if inputs.has(BSSFP) else ""
        t2 = (
            f"per-voxel T2 inferred from R2*{then}"
            if _multi_echo(inputs)
            else f"tissue T2 {(options or {}).get('r1_tissue_t2') or DEFAULT_TISSUE_T2:g} s (single echo: no R2*){then}"
        )
        spoiling = (
            f"spoiling corrected (increment {source}; {t2})"
            if increment is not None
            else "WARNING: no spoiling correction (no SpoilingRFPhaseIncrement, unknown Manufacturer)"
        )
    return (
        f"DESPOT1 from {signals} at flip {flips} deg, TR {inputs.gre[0].repetition_time * 1e3:g} ms; {b1}; {spoiling}"
    )


def r1_settings(context):
    """The DESPOT1 settings of the subject (for the R1 family and for the R2 family's refit)."""
    inputs, options = context.inputs, context.options
    phase_increment, manufacturer, gradient_moment = _spoiling_sidecar(inputs)
    b1_corrected = "b1" in context.running and not options["r1_no_b1_correction"]
    if b1_corrected:
        b1_note = None
    elif options["r1_no_b1_correction"]:
        b1_note = "turned off (--no-b1-correction)"
    else:
        b1_note = _no_b1_reason(inputs)
    multi_echo = "r2star" in context.running
    return dict(
        repetition_time=inputs.gre[0].repetition_time,
        method=options["r1_method"],
        spoiling_correction=not options["r1_no_spoiling_correction"],
        phase_increment=phase_increment,
        manufacturer=manufacturer,
        gradient_moment=gradient_moment,
        tissue_t2=options["r1_tissue_t2"],
        signal_kind="TE = 0 intercepts of the ESTATICS fit" if multi_echo else "single-echo images",
        b1_note=b1_note,
        estimate_b1=not b1_corrected
        and not options["r1_no_b1_correction"]
        and not options.get("r1_no_b1_estimate", False),
        afi_protocol=(
            (inputs.afi.tr1, inputs.afi.tr2, inputs.afi.flip_angle)
            if b1_corrected and _b1_source(inputs) == "afi"
            else None
        ),
        b1_description=_b1_correction_text(inputs) if b1_corrected else None,
        echo_times=[list(series.echo_times) for series in inputs.gre] if multi_echo else None,
        field_strength=inputs.field_strength,
        n_coils=options.get("n_coils", 1),
        # multi-echo: the R2* family denoised the magnitudes its intercepts come from
        denoise=None if multi_echo else options.get("denoise", "none"),
        denoise_search_radius=options.get("denoise_search_radius", 2),
    )


def spoiling_corrected(context):
    """Whether the subject's R1 is corrected for imperfect spoiling (and so depends on T2)."""
    from ..interfaces.relaxometry import spoiling_choice

    if context.options.get("r1_no_spoiling_correction"):
        return False
    return spoiling_choice(True, *_spoiling_sidecar(context.inputs)[:2])[0] is not None


def _r1_signal_inputs(workflow, context):
    """Single-echo data: the R1 workflow reads (and denoises) the images themselves (multi-echo: the
    R2* family's S0, connected by the subject workflow)."""
    if "r2star" not in context.running:
        workflow.inputs.inputnode.signal_files = [series.magnitude[0] for series in context.inputs.gre]
        workflow.inputs.inputnode.flip_angles = [float(series.flip_angle) for series in context.inputs.gre]


def r1_fit_mem_gb(context):
    """Memory (GB) of an R1 fit of the subject (the R1 family's, and the R2 family's refit)."""
    from .base import estimate_fit_mem_gb

    return estimate_fit_mem_gb(context.inputs.gre[0].magnitude[0], len(context.inputs.gre) + 10)


def _build_r1(context):
    from .r2star import estimate_denoise_mem_gb

    workflow = init_r1_wf(
        **r1_settings(context),
        denoise_mem_gb=estimate_denoise_mem_gb(context.inputs.gre[0].magnitude[0], len(context.inputs.gre)),
        mem_gb=r1_fit_mem_gb(context),
        omp_nthreads=context.omp_nthreads,
    )
    _r1_signal_inputs(workflow, context)
    return workflow


R1_REFIT_FIELDS = ("r1_file", "t1_file", "m0_file", "r1_stderr_file", "metadata")


def init_r1_refit_wf(*, settings, mem_gb=1.0, omp_nthreads=1, name="r1_refit_wf"):
    """Build a workflow that refits R1 with each voxel's own T2 (from an R2 map) in the spoiling correction.

    The R1 family fits first with a T2 inferred from R2* (or a tissue T2); R2 (DESPOT2) needs that
    R1; this refit closes the loop with the R2 map. It uses the B1+ ratio map of the first fit (its
    AFI bias already removed) and keeps the first fit's ``B1Correction``.

    Parameters
    ----------
    settings : dict
        The R1 family's settings (:func:`r1_settings`): TR, method, spoiling sidecar values, echo times ...
    mem_gb : float
        Memory of the fitting node (GB).
    omp_nthreads : int
        Threads of the fitting node.
    name : str
        Workflow name.

    Inputs
    ------
    signal_files, flip_angles, mask_file, r2star_file, r2star_stderr_file
        As for :func:`init_r1_wf`.
    b1_file
        The B1+ ratio map (1 = nominal) of the first fit (undefined when it used none).
    r2_file
        R2 (1/s) on the map grid.
    metadata
        Sidecar fields of the first fit.

    Outputs
    -------
    r1_file, t1_file, m0_file, r1_stderr_file, metadata
        As for :func:`init_r1_wf`.
    """
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    from ..interfaces.relaxometry import FitR1
    from ..interfaces.utility import MergeMetadata

    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(
            fields=[
                "signal_files",
                "flip_angles",
                "mask_file",
                "b1_file",
                "r2star_file",
                "r2star_stderr_file",
                "r2_file",
                "metadata",
            ]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(IdentityInterface(fields=list(R1_REFIT_FIELDS)), name="outputnode")
    fit = pe.Node(
        FitR1(
            repetition_time=settings["repetition_time"],
            method=settings["method"],
            spoiling_correction=True,
            signal_kind=settings["signal_kind"],
            n_coils=settings["n_coils"],
            denoised=settings.get("denoise") not in (None, "none"),
            b1_units="ratio",
            num_threads=omp_nthreads,
        ),
        name="refit_r1",
        mem_gb=mem_gb,
        n_procs=omp_nthreads,
    )
    _set_t2_and_noise_inputs(workflow, inputnode, fit, settings)
    uses_b1 = settings["b1_note"] is None or settings["estimate_b1"]
    if not uses_b1:
        fit.inputs.b1_note = settings["b1_note"]
    merge = pe.Node(MergeMetadata(base_wins=["B1Correction"]), name="merge_metadata", run_without_submitting=True)
    workflow.connect([
        (inputnode, fit, [("signal_files", "signal_files"), ("flip_angles", "flip_angles"),
                          ("mask_file", "mask_file"), ("r2_file", "r2_file")]),
        (inputnode, merge, [("metadata", "base")]),
        (fit, merge, [("metadata", "update")]),
        (fit, outputnode, [("r1_file", "r1_file"), ("t1_file", "t1_file"), ("m0_file", "m0_file"),
                           ("r1_stderr_file", "r1_stderr_file")]),
        (merge, outputnode, [("out_dict", "metadata")]),
    ])  # fmt: skip
    if uses_b1:
        workflow.connect([(inputnode, fit, [("b1_file", "b1_file")])])
    return workflow


def _set_t2_and_noise_inputs(workflow, inputnode, fit, settings):
    """Give an R1 fit node (first fit or refit) the spoiling sidecar values and tissue T2 it
    corrects with, and, for ESTATICS intercepts, the echo times and R2* maps that give the T2
    prior and the intercepts' noise."""
    for trait in ("phase_increment", "manufacturer", "gradient_moment", "tissue_t2", "field_strength"):
        if settings.get(trait) is not None:
            setattr(fit.inputs, trait, settings[trait])
    if settings.get("echo_times") is not None:
        fit.inputs.echo_times = [[float(te) for te in echoes] for echoes in settings["echo_times"]]
        workflow.connect([
            (inputnode, fit, [("r2star_file", "r2star_file"), ("r2star_stderr_file", "r2star_stderr_file")]),
        ])  # fmt: skip


def _r1_outputs(inputs):
    from .registry import Output

    sources = tuple(path for series in inputs.gre for path in series.magnitude) + _b1_sources(inputs)
    masked = {"SkullStripped": True}
    outputs = [
        Output(
            field="r1_file",
            suffix="R1map",
            source_files=sources,
            metadata={**masked, "Units": "1/s"},
            quantitative=True,
        ),
        Output(field="t1_file", suffix="T1map", source_files=sources, metadata={**masked, "Units": "s"}),
        Output(
            field="m0_file",
            suffix="M0map",
            source_files=sources,
            metadata={
                **masked,
                "Units": "arbitrary",
                "Description": "equilibrium magnetisation of the Ernst equation at TE = 0, times the receive "
                "sensitivity (not yet calibrated proton density)",
            },
        ),
        Output(
            field="r1_stderr_file",
            suffix="R1map",
            desc="stderr",
            source_files=sources,
            metadata={
                **masked,
                "Units": "1/s",
                "Description": "Standard error of R1 (1/s) from the Fisher information of the DESPOT1 fit at "
                "the estimate; the noise of the signals is the covariance of the TE = 0 intercepts of the "
                "ESTATICS fit (multi-echo data), else the residuals (more than two flip angles) or the noise "
                "measured in the air (raw images only: NaN for two flip angles of denoised single-echo images); "
                "R1StandardErrorSource in the R1map sidecar says which; NaN where unknown",
            },
        ),
    ]
    if not _multi_echo(inputs):
        # single-echo images are denoised here, not by the R2* family: their noise map is this family's
        from .r2star import noise_map_output

        outputs.append(noise_map_output(path for series in inputs.gre for path in series.magnitude))
    return outputs


def _positive_seconds(text):
    import argparse

    value = float(text)
    if not 0.005 <= value <= 3.0:
        raise argparse.ArgumentTypeError(f"a tissue T2 in seconds (0.005-3), got {text}")
    return value


def _preparation_angle(text):
    import argparse

    from ..io.query.fieldmaps import TFL_MIN_PREP_ANGLE

    value = float(text)
    if not TFL_MIN_PREP_ANGLE <= value < 180.0:
        raise argparse.ArgumentTypeError(
            f"a preparation flip angle in degrees ({TFL_MIN_PREP_ANGLE:g}-180, commonly 80 or 90), got {text}"
        )
    return value


def _registry_entries():
    from ..core.relaxometry import DEFAULT_TISSUE_T2
    from ..io.query import AFI, DAM, GRE, TB1MAP, TFL
    from .registry import MapFamily, Option

    b1 = MapFamily(
        key="b1",
        name="B1+",
        # the GRE sets the grid of the maps the B1+ map is brought onto
        needs=(GRE,),
        reads=(AFI, DAM, TFL, TB1MAP),
        check=_check_b1,
        describe=_describe_b1,
        build=_build_b1,
        outputs=_b1_outputs,
        derived_inputs={"tb1map_file": (TB1MAP, "linear")},
        uses_derived=lambda inputs: _b1_source(inputs) == "tb1map",
        # it serves R1 (and PD): a subject with only a B1+ map to make has no map to compute
        auxiliary=True,
        options=(
            Option(
                ("--tb1tfl-prep-angle",),
                "tb1tfl_prep_angle",
                {
                    "type": _preparation_angle,
                    "default": None,
                    "metavar": "DEG",
                    "help": "nominal preparation (saturation) flip angle of a Siemens tfl_b1map "
                    "(fmap/*_acq-famp_TB1TFL, whose values are 10 x the actual angle); needed when the sidecar's "
                    "FlipAngle is the readout angle (VE/XA software: 8 or 10 deg; the preparation angle is commonly "
                    "80 or 90 deg, check the scanner protocol); it wins over the sidecar",
                },
            ),
        ),
    )
    r1 = MapFamily(
        key="r1",
        name="R1",
        needs=(GRE,),
        depends=("brainmask",),
        uses=("r2star", "b1"),
        consumes={
            "mask_file": ("brainmask", "mask_file"),
            "signal_files": ("r2star", "s0_files"),
            "flip_angles": ("r2star", "flip_angles"),
            "r2star_file": ("r2star", "r2star_file"),
            "r2star_stderr_file": ("r2star", "r2star_stderr_file"),
            "b1_file": ("b1", "tb1map_file"),
        },
        check=_check_r1,
        describe=_describe_r1,
        describe_options=True,
        build=_build_r1,
        outputs=_r1_outputs,
        options=(
            Option(
                ("--r1-method",),
                "r1_method",
                {
                    "choices": R1_METHOD_CHOICES,
                    "default": "linear",
                    "help": "DESPOT1 estimator: weighted linearised fit (linear, default; exact with two flip "
                    "angles), exact two-angle solution (exact) or non-linear least squares (nonlinear)",
                },
            ),
            Option(
                ("--no-b1-correction",),
                "r1_no_b1_correction",
                {"action": "store_true", "help": "fit R1 at the nominal flip angles even when a B1+ map exists"},
            ),
            Option(
                ("--no-b1-estimate",),
                "r1_no_b1_estimate",
                {
                    "action": "store_true",
                    "help": "without B1+ data, fit R1 at the nominal flip angles instead of estimating a smooth "
                    "B1+ field from the VFA data (default: estimate it)",
                },
            ),
            Option(
                ("--no-spoiling-correction",),
                "r1_no_spoiling_correction",
                {
                    "action": "store_true",
                    "help": "do not correct R1 for imperfect RF spoiling (for ideally spoiled, e.g. simulated, data)",
                },
            ),
            Option(
                ("--r1-tissue-t2",),
                "r1_tissue_t2",
                {
                    "type": _positive_seconds,
                    "default": DEFAULT_TISSUE_T2,
                    "metavar": "SECONDS",
                    "help": f"tissue T2 the spoiling correction assumes where no voxel T2 is known (default "
                    f"{DEFAULT_TISSUE_T2:g} s, between white matter and cortex at 3 T): single-echo VFA without an "
                    "R2 map; multi-echo data infer each voxel's T2 from R2*, and an R2 map gives it",
                },
            ),
        ),
    )
    return b1, r1


MAP_FAMILIES = _registry_entries()
