r"""Phase-cycled balanced SSFP: band-free signal, elliptical-signal-model fit, R2 (DESPOT2, PLANET).

Signal model (:func:`qmri_workflows.core.signal.bssfp_signal`, instantaneous pulses, TE = TR/2).
Phase cycle ``n`` with RF phase-cycling increment :math:`\Delta_n` and off-resonance angle
:math:`\theta = 2\pi f\,TR` gives, with :math:`\psi_n = \theta - \Delta_n`,

.. math::

    I_n = K \frac{1 + a e^{-i\psi_n}}{1 + b\cos\psi_n},\qquad
    K = M\sqrt{E_2}\,e^{i(\theta/2 + \phi_0)},\quad a = E_2,\quad
    b = \frac{E_2(1 - E_1)(1 + \cos\alpha)}{1 - E_1\cos\alpha - E_2^2(E_1 - \cos\alpha)},

where :math:`M = M_0(1 - E_1)\sin\alpha / (1 - E_1\cos\alpha - E_2^2(E_1 - \cos\alpha))` and
:math:`\phi_0` is the (unknown) transceive phase. As :math:`\psi` runs over a period, :math:`I`
traces an ellipse. Its complex "amplitude" ``K`` lies on every chord joining two opposite phase
cycles (:math:`\Delta` and :math:`\Delta + \pi`): with :math:`\lambda = (1 + b\cos\psi)/2`,
:math:`\lambda I(\psi) + (1 - \lambda) I(\psi + \pi) = K` exactly. So the intersection of those
chords, the geometric solution of Xiang & Hoff [1]_, is the band-free signal

.. math::

    |K| = \frac{M_0 (1 - E_1)\sin\alpha\sqrt{E_2}}{1 - E_1E_2^2 - (E_1 - E_2^2)\cos\alpha},

independent of off-resonance (:func:`band_free_signal`), and DESPOT2 [2]_ applies to it with
:math:`E_2^2` in place of :math:`E_2` in the denominator.

Estimators:

* band-free signal: :func:`geometric_solution` (complex, four or more cycles in opposite pairs),
  :func:`complex_sum` (its regulariser), :func:`magnitude_combination` (magnitude-only data);
* ellipse parameters and off-resonance: :func:`fit_ellipse` (linear then Levenberg-Marquardt,
  any three or more cycles), :func:`geometric_off_resonance` (closed form, as cheap as the
  geometric solution, noisier);
* R2: :func:`fit_despot2` on the band-free signal (two or more flip angles; R1 and B1+ given;
  corrected for finite RF pulses when their duration is known, :func:`finite_pulse_equivalent`),
  :func:`planet_relaxation` (R1 and R2 from one flip angle's ellipse: efficient but several
  times noisier than DESPOT2 at the same SNR), :func:`fit_bssfp_joint` (all cycles and flip
  angles at once: the most precise, the most sensitive to intravoxel frequency spread),
  :func:`fit_bssfp_magnitude` (the same from magnitudes only, DESPOT2-FM: the one unbiased
  estimate without phase);
  :func:`despot2_crlb` bounds the DESPOT2 precision.

Array conventions: phase cycles last (``signals[..., n_cycle]``, complex); the leading axes are
voxels (any shape, flip angles included when they are not fitted jointly). Angles in radians,
times in seconds, rates in 1/s, frequencies in Hz. ``b1`` is the transmit-field ratio.

The off-resonance frequency from the ellipse fit is known modulo 1/TR: it is returned in
:math:`[-1/(2TR), 1/(2TR))` (a positive frequency advances the transverse phase), in the frame of
the scanner frequency, i.e. B0 inhomogeneity plus chemical shift.

References
----------
.. [1] Xiang QS, Hoff MN. Banding artifact removal for bSSFP imaging with an elliptical signal
   model. Magn Reson Med 2014;71:927-933. doi:10.1002/mrm.25098
.. [2] Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient recalled
   acquisition in the steady state. Magn Reson Med 2003;49:515-526. doi:10.1002/mrm.10407
.. [3] Björk M, Ingle RR, Gudmundson E, Stoica P, Nishimura DG, Barral JK. Parameter estimation
   approach to banding artifact reduction in balanced steady-state free precession. Magn Reson
   Med 2014;72:880-892. doi:10.1002/mrm.24986
.. [4] Shcherbakova Y, van den Berg CAT, Moonen CTW, Bartels LW. PLANET: an ellipse fitting
   approach for simultaneous T1 and T2 mapping using phase-cycled balanced steady-state free
   precession. Magn Reson Med 2018;79:711-722. doi:10.1002/mrm.26717
.. [5] Bieri O, Scheffler K. On the origin of apparent low tissue signals in balanced SSFP.
   Magn Reson Med 2006;56:1067-1074. doi:10.1002/mrm.21056
"""

import functools
from collections import namedtuple

import numpy as np

from ._chunks import apply_in_chunks, check_mask
from .noise import correct_noise_floor

__all__ = [
    "EllipseFit",
    "Despot2Fit",
    "band_free_signal",
    "FinitePulseEquivalent",
    "FINITE_PULSE_T1_SHARE",
    "FINITE_PULSE_T2_SHARE",
    "FINITE_PULSE_PRECESSION_LOSS",
    "finite_pulse_equivalent",
    "finite_pulse_off_resonance",
    "complex_sum",
    "geometric_solution",
    "magnitude_combination",
    "geometric_off_resonance",
    "fit_ellipse",
    "planet_relaxation",
    "fit_despot2",
    "despot2_crlb",
    "JointFit",
    "fit_bssfp_joint",
    "fit_bssfp_magnitude",
]

EllipseFit = namedtuple("EllipseFit", ["amplitude", "a", "b", "off_resonance", "rms_residual"])
EllipseFit.__doc__ = """Elliptical-signal-model parameters per voxel (see :func:`fit_ellipse`)."""
Despot2Fit = namedtuple("Despot2Fit", ["r2", "r2_se", "amplitude"])
Despot2Fit.__doc__ = """DESPOT2 result per voxel (see :func:`fit_despot2`)."""
FinitePulseEquivalent = namedtuple("FinitePulseEquivalent", ["flip_angle", "tr_r2", "tr_r1"])
FinitePulseEquivalent.__doc__ = """Instantaneous-pulse equivalent of finite pulses (:func:`finite_pulse_equivalent`)."""

#: Share of the pulse duration without T2 decay in the band-free signal (:func:`finite_pulse_equivalent`).
FINITE_PULSE_T2_SHARE = 1.0 / 3.0
#: Share of the pulse duration, times tan^2(alpha/2), of extra T1 recovery (:func:`finite_pulse_equivalent`).
FINITE_PULSE_T1_SHARE = 1.0 / 4.0

#: Share of the pulse duration, over TR, by which T1 recovery during the pulse reduces the precession
#: excess the ellipse's phase shows (:func:`finite_pulse_off_resonance`).
FINITE_PULSE_PRECESSION_LOSS = 1.0

# Exponents are clipped so that diverging voxels keep exp() finite.
_MAX_EXPONENT = 600.0
# Chords crossing at less than this are ill-conditioned (see geometric_solution): 5 degrees.
_DEFAULT_MIN_LINE_ANGLE = 5.0 * np.pi / 180.0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _quiet(chunk_function):
    """Silence floating-point warnings in a chunk: bad voxels (NaN, inf, zeros) are flagged by value.

    ``np.errstate`` is per thread, so it is set inside each chunk rather than around the pool.
    """

    @functools.wraps(chunk_function)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return chunk_function(*args, **kwargs)

    return wrapper


def _check_last_axis(data, data_name, axis_name, values, values_name):
    """``data`` as an array of shape (..., n) and ``values`` as float of shape (n,)."""
    data = np.asarray(data)
    if data.ndim < 1:
        raise ValueError(f"{data_name} must have shape (..., {axis_name}), got shape {data.shape}")
    values = np.atleast_1d(np.asarray(values, dtype=float))
    if values.shape != data.shape[-1:]:
        raise ValueError(
            f"{values_name} must have shape ({data.shape[-1]},) to match {data_name} "
            f"of shape {data.shape}, got {values.shape}"
        )
    return data, values


def _check_cycles(signals, phase_increments, *, minimum):
    signals, increments = _check_last_axis(signals, "signals", "n_cycle", phase_increments, "phase_increments")
    n_cycle = signals.shape[-1]
    if n_cycle < minimum:
        raise ValueError(f"at least {minimum} phase cycles are needed, got {n_cycle}")
    if np.any(np.abs(increments) > 4 * np.pi):
        raise ValueError(f"phase_increments must be in radians, got {increments} (degrees? use np.deg2rad)")
    wrapped = np.mod(increments, 2 * np.pi)
    gaps = np.abs(np.angle(np.exp(1j * (wrapped[:, None] - wrapped[None, :]))))
    if np.any(gaps[~np.eye(n_cycle, dtype=bool)] < 1e-6):
        raise ValueError(f"phase_increments must be distinct modulo 2 pi, got {increments}")
    return signals, increments


def _opposite_pairs(increments):
    """Index pairs (i, j) with increments[j] = increments[i] + pi; every cycle used once."""
    pairs = []
    used = set()
    for i, increment in enumerate(increments):
        if i in used:
            continue
        gap = np.abs(np.angle(np.exp(1j * (increments - increment - np.pi))))
        j = int(np.argmin(gap))
        if gap[j] < 1e-6 and j not in used:
            pairs.append((i, j))
            used.update((i, j))
    if len(used) != increments.size:
        raise ValueError(
            "the geometric solution needs the phase cycles in opposite pairs (increments Delta and "
            f"Delta + 180 deg), got {np.rad2deg(increments)} deg; use fit_ellipse instead"
        )
    return pairs


def _check_tr(tr):
    tr = float(tr)
    if not tr > 0:
        raise ValueError(f"tr must be > 0 (seconds), got {tr!r}")
    if tr > 0.1:
        raise ValueError(f"tr must be in seconds (bSSFP TR is a few ms), got {tr!r}")
    return tr


def _voxel_parameter(name, value, leading_shape):
    """Scalar or array broadcast to ``leading_shape`` (for chunking)."""
    value = np.asarray(value, dtype=float)
    if value.ndim == 0:
        return value
    try:
        return np.broadcast_to(value, leading_shape)
    except ValueError:
        raise ValueError(
            f"{name} must be a scalar or broadcastable to the voxel shape {leading_shape}, got shape {value.shape}"
        ) from None


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _check_pulse_duration(pulse_duration, tr):
    pulse_duration = float(pulse_duration)
    if not 0.0 <= pulse_duration < tr:
        raise ValueError(f"pulse_duration must be in [0, TR = {tr:g}) seconds, got {pulse_duration!r}")
    return pulse_duration


def finite_pulse_equivalent(flip_angle, tr, pulse_duration, *, off_resonance=0.0):
    r"""Instantaneous-pulse equivalent of the band-free signal with rectangular pulses of finite duration.

    Parameters
    ----------
    flip_angle : array_like
        Actual flip angle (rad), B1+ included.
    tr : float
        Repetition time (s).
    pulse_duration : float
        Duration :math:`T_{RF}` of the rectangular RF pulse (s), in [0, TR); 0 gives back the inputs.
    off_resonance : array_like, optional
        Frequency offset (Hz) during the pulse.

    Returns
    -------
    FinitePulseEquivalent
        ``flip_angle`` (rad), ``tr_r2`` and ``tr_r1`` (s): the band-free signal with finite pulses
        is :func:`band_free_signal` with this flip angle and with
        :math:`E_2 = e^{-R_2 TR_2}`, :math:`E_1 = e^{-R_1 TR_1}`.

    Notes
    -----
    Two effects, each first order in :math:`T_{RF}/TR`:

    * **Off-resonance during the pulse.** The pulse turns about the effective field
      :math:`(-\alpha/T_{RF}, 0, \omega)`, :math:`\omega = 2\pi f`, by
      :math:`\Phi = \sqrt{\alpha^2 + (\omega T_{RF})^2}`. That rotation equals a rotation
      about x between two equal precessions about z (which only shift the off-resonance phase) by
      :math:`\alpha' = 2\arcsin((\alpha/\Phi)\sin(\Phi/2))` (exact without relaxation):
      at 90 Hz and 1 ms, 15 deg pulses act as 14.7 deg, 50 deg ones as 49.3 deg.
    * **Relaxation during the pulse.** While the pulse turns the magnetisation, part of it is
      longitudinal: it decays less with R2 and recovers more with R1 than the instantaneous
      model assumes. For the band-free (geometric-solution) signal the equivalent times are
      :math:`TR_2 = TR - T_{RF}/3` and :math:`TR_1 = TR + T_{RF}\tan^2(\alpha'/2)/4`
      (:data:`FINITE_PULSE_T2_SHARE`, :data:`FINITE_PULSE_T1_SHARE`). These shares are those of
      the exact steady state (the phantom's simulator,
      :mod:`qmri_workflows.phantom.bssfp_steady_state`, itself checked against a time-stepped
      Bloch simulation): with them DESPOT2 at 15/50 deg, TR 5 ms and 1 ms pulses finds R2 within
      0.5 % for brain T1/T2 (0.05-0.2 s T2), B1+ 0.8-1.2 and off-resonance up to 90 Hz, against
      -7 to -13 % without the correction (``tests/phantom/test_bssfp_steady_state.py``).

    Bieri & Scheffler [1]_ describe a single
    on-resonance bSSFP image by :math:`TR_2 = TR - \zeta T_{RF}` with
    :math:`\zeta = 0.68 - 0.125(1 + T_{RF}/TR)T_2/T_1` (about 2/3: R2 is *reduced*, i.e. the
    apparent T2 is longer). The band-free signal combines phase cycles whose magnetisation turns
    along other paths during the pulse: for it only a third of the pulse escapes T2 decay, and
    their :math:`\zeta` would turn the -7 to -13 % R2 error into +1 to +8 %.

    References
    ----------
    .. [1] Bieri O, Scheffler K. SSFP signal with finite RF pulses. Magn Reson Med
       2009;62:1232-1241. doi:10.1002/mrm.22116
    """
    tr = _check_tr(tr)
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    alpha = np.asarray(flip_angle, dtype=float)
    if pulse_duration == 0.0:
        alpha = np.broadcast_to(alpha, np.broadcast_shapes(alpha.shape, np.shape(off_resonance)))
        return FinitePulseEquivalent(alpha, tr, np.full(alpha.shape, tr))
    precession = 2.0 * np.pi * np.asarray(off_resonance, dtype=float) * pulse_duration
    rotation = np.hypot(alpha, precession)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(rotation > 0, alpha / rotation, 1.0)
        effective = np.where(rotation > 0, 2.0 * np.arcsin(np.clip(ratio * np.sin(0.5 * rotation), -1.0, 1.0)), alpha)
    tr_r2 = tr - FINITE_PULSE_T2_SHARE * pulse_duration
    tr_r1 = tr + FINITE_PULSE_T1_SHARE * pulse_duration * np.tan(0.5 * effective) ** 2
    return FinitePulseEquivalent(effective, tr_r2, tr_r1)


def _finite_pulse_phase(omega, alpha, tr, pulse_duration):
    """Ellipse phase theta (rad) at the angular frequency ``omega`` with finite pulses, and d(theta)/d(omega)."""
    precession = omega * pulse_duration
    rotation = np.hypot(alpha, precession)
    safe = np.where(rotation > 0, rotation, 1.0)
    # tan(beta) = tan(Phi/2) omega T / Phi; as atan2 it stays continuous for Phi up to 2 pi
    sine, cosine = np.sin(0.5 * rotation) * precession / safe, np.cos(0.5 * rotation)
    beta = np.arctan2(sine, cosine)
    # d(beta)/d(omega) from d(sine), d(cosine): Phi' = omega T^2 / Phi
    d_rotation = precession * pulse_duration / safe
    d_sine = 0.5 * np.cos(0.5 * rotation) * d_rotation * precession / safe + np.sin(0.5 * rotation) * (
        pulse_duration / safe - precession * d_rotation / safe**2
    )
    d_cosine = -0.5 * np.sin(0.5 * rotation) * d_rotation
    d_beta = (cosine * d_sine - sine * d_cosine) / (sine**2 + cosine**2)
    # the pulse's precession beyond omega T_RF, of which the ellipse shows the share 1 - T_RF/TR
    share = 1.0 - FINITE_PULSE_PRECESSION_LOSS * pulse_duration / tr
    theta = omega * tr + share * (2.0 * beta - omega * pulse_duration)
    return theta, tr + share * (2.0 * d_beta - pulse_duration)


def finite_pulse_off_resonance(apparent_off_resonance, flip_angle, tr, pulse_duration):
    r"""True off-resonance frequency from the one the ellipse shows with rectangular pulses.

    Parameters
    ----------
    apparent_off_resonance : array_like
        Frequency (Hz) read from the ellipse's phase :math:`\theta` as :math:`\theta/(2\pi TR)`
        (:func:`geometric_off_resonance` or :func:`fit_ellipse` without ``pulse_duration``), in
        [-1/(2 TR), 1/(2 TR)).
    flip_angle : array_like
        Actual flip angle (rad), B1+ included.
    tr : float
        Repetition time (s).
    pulse_duration : float
        Duration :math:`T_{RF}` of the rectangular RF pulse (s), in [0, TR).

    Returns
    -------
    numpy.ndarray
        Frequency (Hz), broadcast shape of the inputs, wrapped like the input: a true frequency
        within about :math:`(g - 1)T_{RF}/(2TR^2)` of :math:`\pm 1/(2TR)` shows on the other side.

    Notes
    -----
    During the pulse the magnetisation turns about the effective field
    :math:`(-\alpha/T_{RF}, 0, \omega)` by :math:`\Phi = \sqrt{\alpha^2 + (\omega T_{RF})^2}`,
    which is exactly a turn about x by :math:`\alpha'` (:func:`finite_pulse_equivalent`) between
    two precessions about z by :math:`\beta`, :math:`\tan\beta = \tan(\Phi/2)\,\omega T_{RF}/\Phi`
    (compare the quaternions). Without relaxation during the pulse the signal is then that of
    instantaneous pulses with the precession angle per TR
    :math:`\theta = \omega(TR - T_{RF}) + 2\beta \approx \omega(TR + (g - 1)T_{RF})`,
    :math:`g = 2\tan(\alpha/2)/\alpha` (1.006 at 15 deg, 1.07 at 50 deg, 1.10 at 60 deg): the
    pulse reads as a frequency :math:`(g - 1)T_{RF}/TR` too high (1 ms at TR 5 ms: +1.4 % at
    50 deg, +2 % at 60 deg). T1 recovery during the pulse enters the steady state part-way
    through the rotation and takes back a share of that excess, independently of the relaxation
    rates (the steady state is a balance of recovery and decay): the ellipse's phase is
    :math:`\theta = \omega TR + (1 - T_{RF}/TR)(2\beta - \omega T_{RF})`
    (:data:`FINITE_PULSE_PRECESSION_LOSS` = 1). That share is measured, not derived: on the exact
    steady state (:mod:`qmri_workflows.phantom.bssfp_steady_state`, itself checked against a
    time-stepped Bloch simulation) it holds for T1 0.3-1.5 s, T2 0.05-0.25 s and TR 3-10 ms to
    within a relative :math:`(g - 1)T_{RF}/TR` of the excess; T2 decay during the pulse does not
    move the phase. Left after the correction, for the geometric estimate at TR 5 ms and 1 ms
    pulses: 0.01 Hz at 95 Hz and 50 deg, 0.13 Hz at 84 deg (uncorrected 1.0 and 3.2 Hz;
    ``tests/core/test_bssfp_finite_pulse.py``). :math:`\theta(\omega)` is increasing; Newton's
    method inverts it.
    """
    tr = _check_tr(tr)
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    apparent = np.asarray(apparent_off_resonance, dtype=float)
    alpha = np.asarray(flip_angle, dtype=float)
    apparent, alpha = np.broadcast_arrays(apparent, alpha)
    if pulse_duration == 0.0:
        return apparent.copy()
    target = 2.0 * np.pi * apparent * tr
    omega = target / tr
    with np.errstate(invalid="ignore", divide="ignore"):
        # theta(omega) is smooth and increasing with slope near TR: a few Newton steps converge to
        # double precision from theta / TR
        for _ in range(6):
            theta, slope = _finite_pulse_phase(omega, alpha, tr, pulse_duration)
            omega = omega - (theta - target) / slope
    return omega / (2.0 * np.pi)


def band_free_signal(m0, r1, r2, flip_angle, tr, *, b1=1.0, pulse_duration=0.0, off_resonance=0.0):
    r"""Magnitude of the band-free (geometric-solution) signal, independent of off-resonance.

    Parameters
    ----------
    m0 : array_like
        Equilibrium magnetisation (including receive sensitivity).
    r1, r2 : array_like
        Relaxation rates (1/s).
    flip_angle : array_like
        Nominal flip angle (rad).
    tr : float
        Repetition time (s).
    b1 : array_like, optional
        Transmit field ratio (1 = nominal).
    pulse_duration : float, optional
        Rectangular RF pulse duration (s); 0 (default) is the instantaneous-pulse model, otherwise
        the first-order equivalent of :func:`finite_pulse_equivalent` is used.
    off_resonance : array_like, optional
        Frequency offset (Hz); matters with finite pulses only.

    Returns
    -------
    numpy.ndarray
        :math:`M_0 (1 - E_1)\sin\alpha\sqrt{E_2} / (1 - E_1E_2^2 - (E_1 - E_2^2)\cos\alpha)`,
        broadcast shape of the inputs (with finite pulses: the equivalent flip angle and times).
    """
    tr = _check_tr(tr)
    alpha = np.asarray(b1, dtype=float) * np.asarray(flip_angle, dtype=float)
    alpha, tr_r2, tr_r1 = finite_pulse_equivalent(alpha, tr, pulse_duration, off_resonance=off_resonance)
    e1 = np.exp(-tr_r1 * np.asarray(r1, dtype=float))
    e2 = np.exp(-tr_r2 * np.asarray(r2, dtype=float))
    denominator = 1.0 - e1 * e2**2 - (e1 - e2**2) * np.cos(alpha)
    return np.asarray(m0, dtype=float) * (1.0 - e1) * np.sin(alpha) * np.sqrt(e2) / denominator


# --------------------------------------------------------------------------------------------
# Band-free combinations
# --------------------------------------------------------------------------------------------
def complex_sum(signals):
    """Complex mean over phase cycles (``signals[..., n_cycle]``), the regulariser of the GS.

    It keeps a residual modulation with off-resonance (it is not band-free), but its noise is
    the lowest of any combination (SD / sqrt(n_cycle)).
    """
    return np.asarray(signals).mean(axis=-1)


def magnitude_combination(magnitudes, *, method="rms"):
    """Best band-reduced signal from magnitude-only phase cycles (``magnitudes[..., n_cycle]``).

    Parameters
    ----------
    magnitudes : array_like, shape (..., n_cycle)
        Magnitude images of the phase cycles.
    method : {"rms", "max"}, optional
        ``"rms"``: root mean square over cycles (sum of squares, normalised), the lower noise and,
        at moderate to high flip angles, the lower residual modulation; ``"max"``:
        maximum-intensity projection, the lower modulation at low flip angles, where the
        ellipse is elongated (the band's bright peak dominates the RMS).

    Returns
    -------
    numpy.ndarray, shape (...)

    Notes
    -----
    Without phase, the chords of the ellipse cannot be drawn: no magnitude-only combination is
    band-free. Both keep a modulation with off-resonance (WM, TR 5 ms, four cycles: RMS 17 % at
    15 deg and 0.2 % at 50 deg, maximum 9 % and 4 %; eight cycles: RMS 1.1 % and < 0.01 %,
    maximum 1.8 % and 0.9 %, peak to peak over the mean) and their level differs from
    :func:`band_free_signal`, so DESPOT2 on them is biased; prefer complex data.
    """
    magnitudes = np.abs(np.asarray(magnitudes))
    if method == "rms":
        return np.sqrt(np.mean(magnitudes**2, axis=-1))
    if method == "max":
        return magnitudes.max(axis=-1)
    raise ValueError(f"method must be 'rms' or 'max', got {method!r}")


@_quiet
def _geometric_solution_chunk(signals, pairs, min_sine):
    """GS of one chunk ``signals[n, n_cycle]`` -> (band_free[n], weight_of_gs[n])."""
    signals = signals.astype(np.complex128, copy=False)
    # Least-squares intersection of the chords: minimise sum_k |Im(conj(d_k) (x - p_k))|^2 with
    # the unnormalised chord d_k (longer chords weigh more: their direction is better known).
    # The normal of chord k is n_k = (-Im d_k, Re d_k).
    a11 = a12 = a22 = r1 = r2 = 0.0
    for i, j in pairs:
        start, chord = signals[:, i], signals[:, j] - signals[:, i]
        nx, ny = -chord.imag, chord.real
        offset = nx * start.real + ny * start.imag
        a11 = a11 + nx * nx
        a12 = a12 + nx * ny
        a22 = a22 + ny * ny
        r1 = r1 + nx * offset
        r2 = r2 + ny * offset
    determinant = a11 * a22 - a12**2
    trace = a11 + a22
    # det / (trace/2)^2 is the squared sine of the angle between two equal chords: a scale-free
    # measure of how well the intersection is defined.
    with np.errstate(divide="ignore", invalid="ignore"):
        conditioning = np.sqrt(np.clip(4.0 * determinant / trace**2, 0.0, 1.0))
        safe = np.where(determinant > 0, determinant, 1.0)
        gs = (a22 * r1 - a12 * r2) / safe + 1j * (a11 * r2 - a12 * r1) / safe
    regulariser = signals.mean(axis=-1)
    # The band-free point lies inside the ellipse, hence inside the data's magnitude range; a GS
    # outside it is noise (Xiang & Hoff's maximum-magnitude criterion).
    inside = np.abs(gs) <= np.abs(signals).max(axis=-1)
    weight = np.clip((conditioning - min_sine) / min_sine, 0.0, 1.0) * inside
    weight = np.where(np.isfinite(gs) & (determinant > 0), weight, 0.0)
    gs = np.where(weight > 0, gs, 0.0)
    return weight * gs + (1.0 - weight) * regulariser, weight


def geometric_solution(
    signals,
    phase_increments,
    *,
    min_line_angle=_DEFAULT_MIN_LINE_ANGLE,
    mask=None,
    return_weight=False,
    chunk_size=500_000,
    n_jobs=1,
):
    """Band-free bSSFP signal: intersection of the chords joining opposite phase cycles.

    Parameters
    ----------
    signals : ndarray of complex, shape (..., n_cycle)
        Complex phase-cycled signals (magnitude and phase), ``n_cycle >= 4`` and even.
    phase_increments : array_like, shape (n_cycle,)
        RF phase-cycling increments (rad), in opposite pairs (``Delta`` and ``Delta + pi``), e.g.
        0, 90, 180, 270 deg or eight increments in 45 deg steps.
    min_line_angle : float, optional
        Below this angle between the chords (rad) the intersection is ill-conditioned: the output
        blends linearly from the geometric solution (at twice this angle) to the complex sum
        (at this angle and below).
    mask : ndarray of bool, optional
        Voxels to process; others are 0.
    return_weight : bool, optional
        Also return the weight of the geometric solution in the output (1 = pure GS, 0 = complex
        sum).
    chunk_size : int, optional
        Voxels per chunk (about 200 bytes per voxel and cycle of temporaries).
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    band_free : ndarray of complex, shape (...)
        The band-free signal; its magnitude is :func:`band_free_signal` for one isochromat per
        voxel, its phase is :math:`\\theta/2 + \\phi_0`.
    weight : ndarray, shape (...)
        Only with ``return_weight``.

    Notes
    -----
    With two pairs the solution is the intersection of Xiang & Hoff [1]_; with more pairs it is
    the point nearest (least squares) to all chords. Regularisation [1]_: where the chords are
    nearly parallel or the intersection lies outside the largest phase-cycle magnitude (it must
    lie inside the ellipse), the complex sum replaces it. Xiang & Hoff's second pass (weights
    smoothed over a neighbourhood) needs the image grid and is not applied here.
    """
    signals, increments = _check_cycles(signals, phase_increments, minimum=4)
    pairs = _opposite_pairs(increments)
    min_sine = float(np.sin(min_line_angle))
    if not 0 < min_sine < 0.5:
        raise ValueError(f"min_line_angle must be in (0, 30) deg, got {min_line_angle!r} rad")
    leading_shape = signals.shape[:-1]
    mask = check_mask(mask, leading_shape)

    def chunk_function(chunk):
        return _geometric_solution_chunk(chunk, pairs, min_sine)

    band_free, weight = apply_in_chunks(
        chunk_function,
        [signals],
        leading_shape=leading_shape,
        output_shapes=[(), ()],
        mask=mask,
        chunk_size=chunk_size,
        dtype=np.complex128,
        n_jobs=n_jobs,
    )
    if return_weight:
        return band_free, weight.real
    return band_free


@_quiet
def _geometric_off_resonance_chunk(signals, band_free, pairs, pair_inverse, starts, tr, flip_angle, pulse_duration):
    signals = signals.astype(np.complex128, copy=False)
    band_free = band_free.astype(np.complex128, copy=False)
    cosines, rotors = [], []
    for i, j in pairs:
        chord = signals[:, i] - signals[:, j]
        length_sq = np.abs(chord) ** 2
        position = np.real((band_free - signals[:, j]) * np.conj(chord)) / length_sq
        # position = (1 + b cos(theta - Delta_i)) / 2 along the chord from I_j to I_i
        cosine = 2.0 * position - 1.0
        cosines.append(cosine)
        # chord = K (2 a e^{-i psi} - 2 b cos psi) / (1 - b^2 cos^2 psi), psi = theta - Delta_i
        rotors.append(chord / band_free * (1.0 - cosine**2) / 2.0 + cosine)
    cosines = np.stack(cosines, axis=-1)
    # a e^{i theta}, a = E2 (close to 1), from every pair's chord direction: the phase is well defined
    # even where b is near 0 (short T2 at large flip angles, where b e^{i theta} alone flips sign)
    a_phasor = np.mean(np.conj(np.stack(rotors, axis=-1)) * np.exp(1j * starts), axis=-1)
    theta = np.angle(a_phasor)
    # b cos(theta - Delta_i) = Re(z) cos(Delta_i) + Im(z) sin(Delta_i), with z = b e^{i theta}
    z = cosines @ pair_inverse.T
    b = z[:, 0] * np.cos(theta) + z[:, 1] * np.sin(theta)
    frequency = theta / (2 * np.pi * tr)
    if pulse_duration > 0:
        frequency = finite_pulse_off_resonance(frequency, flip_angle, tr, pulse_duration)
    ok = np.isfinite(frequency) & np.isfinite(b) & (np.abs(a_phasor) > 0)
    return np.where(ok, frequency, 0.0), np.where(ok, b, 0.0)


def geometric_off_resonance(
    signals,
    phase_increments,
    tr,
    *,
    band_free=None,
    flip_angle=None,
    pulse_duration=0.0,
    mask=None,
    chunk_size=500_000,
    n_jobs=1,
):
    r"""Off-resonance frequency from the chords of opposite phase cycles and the band-free point (closed form).

    Parameters
    ----------
    signals : ndarray of complex, shape (..., n_cycle)
        Complex phase cycles in opposite pairs (as for :func:`geometric_solution`).
    phase_increments : array_like, shape (n_cycle,)
        RF phase-cycling increments (rad).
    tr : float
        Repetition time (s).
    band_free : ndarray of complex, shape (...), optional
        The output of :func:`geometric_solution` if already computed.
    flip_angle : array_like, optional
        Actual flip angle (rad, B1+ included), scalar or of the voxel shape; needed with
        ``pulse_duration`` only.
    pulse_duration : float, optional
        Duration of the rectangular RF pulses (s): the frequency is corrected for the precession
        during the pulse (:func:`finite_pulse_off_resonance`). 0 (default): instantaneous pulses.
    mask, chunk_size, n_jobs : optional
        As in :func:`geometric_solution`.

    Returns
    -------
    off_resonance : ndarray, shape (...)
        Frequency (Hz) in [-1/(2 TR), 1/(2 TR)], 0 outside the mask or where undetermined.
    b : ndarray, shape (...)
        The ellipse parameter ``b`` (an estimate; :func:`fit_ellipse` is the efficient one). Its
        sign is kept: finite pulses (relaxation during the pulse) and noise can make a small ``b``
        negative.

    Notes
    -----
    With :math:`\psi_i = \theta - \Delta_i`, the chord from :math:`I(\psi_i + \pi)` to
    :math:`I(\psi_i)` is :math:`2K(a e^{-i\psi_i} - b\cos\psi_i)/(1 - b^2\cos^2\psi_i)`
    and the band-free point K divides it at :math:`\lambda_i = (1 + b\cos\psi_i)/2` (module
    docstring). So :math:`b\cos\psi_i = 2\lambda_i - 1` and
    :math:`a e^{-i\psi_i} = (\mathrm{chord}_i/K)(1 - b^2\cos^2\psi_i)/2 + b\cos\psi_i`:
    every pair gives :math:`a e^{i\theta}`, averaged over pairs; ``b`` is the least-squares
    :math:`b e^{i\theta}` of the :math:`b\cos\psi_i` projected on that phase. The phase
    comes from ``a`` (:math:`E_2`, close to 1), not from ``b``: ``b`` nears 0 at large flip
    angles and short T2 (60 deg, T1 1.2 s, T2 50 ms, TR 5 ms: ``b`` = 0.06 with instantaneous
    pulses, -0.0002 with 1 ms pulses), where a phase taken from :math:`b e^{i\theta}` turns
    by pi (100 Hz) or wanders. Exact on noiseless single-frequency data and as cheap as the
    geometric solution; noisier than the ellipse fit where the chords are short.
    """
    signals, increments = _check_cycles(signals, phase_increments, minimum=4)
    tr = _check_tr(tr)
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    pairs = _opposite_pairs(increments)
    starts = increments[[i for i, _ in pairs]]
    pair_inverse = np.linalg.pinv(np.stack([np.cos(starts), np.sin(starts)], axis=-1))
    leading_shape = signals.shape[:-1]
    mask = check_mask(mask, leading_shape)
    flip_angle = _finite_pulse_flip_angle(flip_angle, pulse_duration, leading_shape)
    if band_free is None:
        band_free = geometric_solution(signals, increments, mask=mask, chunk_size=chunk_size, n_jobs=n_jobs)
    band_free = np.asarray(band_free)
    if band_free.shape != leading_shape:
        raise ValueError(f"band_free must have the shape {leading_shape} of the signals' voxels, got {band_free.shape}")

    def chunk_function(signal_chunk, band_free_chunk, flip_chunk):
        return _geometric_off_resonance_chunk(
            signal_chunk, band_free_chunk, pairs, pair_inverse, starts, tr, flip_chunk, pulse_duration
        )

    off_resonance, b = apply_in_chunks(
        chunk_function,
        [signals, band_free, flip_angle],
        leading_shape=leading_shape,
        output_shapes=[(), ()],
        mask=mask,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )
    return off_resonance, b


def _finite_pulse_flip_angle(flip_angle, pulse_duration, leading_shape):
    """The actual flip angle for the finite-pulse frequency correction, checked (None without it)."""
    if pulse_duration == 0.0:
        return None
    if flip_angle is None:
        raise ValueError("pulse_duration > 0 needs the actual flip_angle (rad, B1+ included) of the signals")
    flip_angle = _voxel_parameter("flip_angle", flip_angle, leading_shape)
    if np.any(np.asarray(flip_angle) > np.pi):
        raise ValueError("flip_angle must be in radians (degrees? use np.deg2rad)")
    return flip_angle


# --------------------------------------------------------------------------------------------
# Elliptical signal model fit (linear, then Gauss-Newton / Levenberg-Marquardt)
# --------------------------------------------------------------------------------------------
def _ellipse_linear(signals, increments):
    """Algebraic fit of ``I (1 + b cos psi) = K + K a e^{-i psi}`` (six real unknowns).

    With ``c1 = (b/2) e^{i theta}`` and ``c3 = K a e^{-i theta}`` the model is linear:
    ``I = K + c3 e^{i Delta} - c1 I e^{-i Delta} - conj(c1) I e^{i Delta}``.
    """
    n_voxel, n_cycle = signals.shape
    phasor = np.exp(1j * increments)
    forward = signals * np.conj(phasor)
    backward = signals * phasor
    columns = np.empty((n_voxel, n_cycle, 6), dtype=np.complex128)
    columns[..., 0] = 1.0
    columns[..., 1] = 1j
    columns[..., 2] = phasor
    columns[..., 3] = 1j * phasor
    columns[..., 4] = -(forward + backward)
    columns[..., 5] = -1j * (forward - backward)
    design = np.concatenate([columns.real, columns.imag], axis=1)
    target = np.concatenate([signals.real, signals.imag], axis=1)
    design_transposed = design.transpose(0, 2, 1)
    normal = design_transposed @ design
    rhs = (design_transposed @ target[..., None])[..., 0]
    # A tiny ridge keeps degenerate (e.g. zero) voxels solvable; they are flagged later.
    scale = np.trace(normal, axis1=1, axis2=2)[:, None, None] / 6.0
    normal = normal + 1e-12 * np.maximum(scale, 1e-300) * np.eye(6)
    solution = np.linalg.solve(normal, rhs[..., None])[..., 0]
    amplitude = solution[:, 0] + 1j * solution[:, 1]
    c3 = solution[:, 2] + 1j * solution[:, 3]
    c1 = solution[:, 4] + 1j * solution[:, 5]
    b = 2.0 * np.abs(c1)
    theta = np.angle(c1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.real(c3 * np.exp(1j * theta) / amplitude)
    return amplitude, a, b, theta


def _ellipse_model(params, increments, data, *, with_jacobian=True):
    """Residual (n, 2 n_cycle), cost and Jacobian (n, 2 n_cycle, 5) for (Re K, Im K, a, b, theta)."""
    amplitude = params[:, 0:1] + 1j * params[:, 1:2]
    a, b, theta = params[:, 2:3], params[:, 3:4], params[:, 4:5]
    psi = theta - increments
    rotor = np.exp(-1j * psi)
    denominator = 1.0 + b * np.cos(psi)
    shape = (1.0 + a * rotor) / denominator
    model = amplitude * shape
    residual = data - np.concatenate([model.real, model.imag], axis=1)
    cost = np.sum(residual**2, axis=-1)
    if not with_jacobian:
        return residual, cost, None
    jac = np.empty(psi.shape + (5,), dtype=np.complex128)
    jac[..., 0] = shape
    jac[..., 1] = 1j * shape
    jac[..., 2] = amplitude * rotor / denominator
    jac[..., 3] = -model * np.cos(psi) / denominator
    jac[..., 4] = (-1j * a * amplitude * rotor + model * b * np.sin(psi)) / denominator
    return residual, cost, np.concatenate([jac.real, jac.imag], axis=1)


@_quiet
def _ellipse_chunk(signals, increments, tr, max_iter, tol, flip_angle=None, pulse_duration=0.0):
    signals = signals.astype(np.complex128, copy=False)
    amplitude, a, b, theta = _ellipse_linear(signals, increments)
    params = np.stack([amplitude.real, amplitude.imag, a, b, theta], axis=-1)
    start_ok = np.all(np.isfinite(params), axis=-1)
    params[~start_ok] = [0.0, 0.0, 0.5, 0.5, 0.0]
    target = np.concatenate([signals.real, signals.imag], axis=1)
    _, cost, _ = _ellipse_model(params, increments, target, with_jacobian=False)
    # Step sizes are judged against the signal level for K, in absolute terms for a, b, theta.
    signal_level = np.maximum(np.abs(signals).max(axis=-1), 1e-300)
    damping = np.full(params.shape[0], 1e-3)
    active = start_ok.copy()
    for _ in range(max_iter):
        if not active.any():
            break
        index = np.flatnonzero(active)
        current, data = params[index], target[index]
        residual, _, jac = _ellipse_model(current, increments, data)
        j_transposed = jac.transpose(0, 2, 1)
        normal = j_transposed @ jac
        gradient = (j_transposed @ residual[..., None])[..., 0]
        diagonal = np.einsum("nii->ni", normal)
        normal += (damping[index, None] * np.maximum(diagonal, 1e-300))[:, :, None] * np.eye(5)
        step = np.linalg.solve(normal, gradient[..., None])[..., 0]
        trial = current + step
        _, trial_cost, _ = _ellipse_model(trial, increments, data, with_jacobian=False)
        better = np.isfinite(trial_cost) & (trial_cost <= cost[index])
        accepted = index[better]
        params[accepted] = trial[better]
        cost[accepted] = trial_cost[better]
        damping[accepted] = np.maximum(damping[accepted] / 10.0, 1e-9)
        damping[index[~better]] *= 10.0
        scale = np.concatenate([np.repeat(signal_level[index, None], 2, axis=1), np.ones((index.size, 3))], axis=1)
        size = np.max(np.abs(step) / scale, axis=-1)
        converged = (better & (size < tol)) | (damping[index] > 1e8)
        active[index[converged]] = False
    amplitude = params[:, 0] + 1j * params[:, 1]
    a, b, theta = params[:, 2], params[:, 3], params[:, 4]
    # (a, b, theta) and (-a, -b, theta + pi) are the same ellipse: keep a >= 0. a = E2 is close to 1,
    # whereas b nears 0 at large flip angles and short T2 and can turn negative there (finite
    # pulses, noise): choosing by the sign of b would turn theta by pi (100 Hz at TR 5 ms).
    flip = a < 0
    a, b, theta = np.abs(a), np.where(flip, -b, b), np.where(flip, theta + np.pi, theta)
    theta = np.mod(theta + np.pi, 2 * np.pi) - np.pi
    off_resonance = theta / (2 * np.pi * tr)
    if pulse_duration > 0:
        off_resonance = finite_pulse_off_resonance(off_resonance, flip_angle, tr, pulse_duration)
    rms = np.sqrt(cost / signals.shape[-1])
    ok = start_ok & np.isfinite(cost) & np.isfinite(params).all(axis=-1)
    return (
        np.where(ok, amplitude, 0.0),
        np.where(ok, a, 0.0),
        np.where(ok, b, 0.0),
        np.where(ok, off_resonance, 0.0),
        np.where(ok, rms, np.inf),
    )


def fit_ellipse(
    signals,
    phase_increments,
    tr,
    *,
    flip_angle=None,
    pulse_duration=0.0,
    mask=None,
    max_iter=15,
    tol=1e-6,
    chunk_size=100_000,
    n_jobs=1,
):
    """Fit the elliptical signal model to complex phase cycles (linear fit, then LM refinement).

    Parameters
    ----------
    signals : ndarray of complex, shape (..., n_cycle)
        Complex phase-cycled signals at one flip angle per voxel, ``n_cycle >= 3``.
    phase_increments : array_like, shape (n_cycle,)
        RF phase-cycling increments (rad), any distinct values.
    tr : float
        Repetition time (s), to convert the off-resonance angle to Hz.
    flip_angle : array_like, optional
        Actual flip angle (rad, B1+ included), scalar or of the voxel shape; needed with
        ``pulse_duration`` only.
    pulse_duration : float, optional
        Duration of the rectangular RF pulses (s): the frequency is corrected for the precession
        during the pulse (:func:`finite_pulse_off_resonance`); the other parameters are those of
        the ellipse as it is. 0 (default): instantaneous pulses. Relaxation during the pulse bends
        the curve off an exact ellipse and the least-squares fit's phase with it: 1 ms pulses at
        TR 5 ms leave 0.4-0.9 Hz at 95 Hz (15-84 deg), against 0.01-0.13 Hz for
        :func:`geometric_off_resonance`, the better estimate with finite pulses.
    mask : ndarray of bool, optional
        Voxels to fit; others are 0 (``rms_residual`` inf).
    max_iter : int, optional
        Maximum Levenberg-Marquardt iterations.
    tol : float, optional
        Relative step below which a voxel has converged.
    chunk_size : int, optional
        Voxels per chunk (about 2 kB per voxel of temporaries with 8 cycles).
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    EllipseFit
        ``amplitude`` (complex ``K``: its magnitude is the band-free signal
        :func:`band_free_signal`, its phase :math:`\\theta/2 + \\phi_0`), ``a`` (= E2, >= 0), ``b``
        (> 0 for instantaneous pulses; a small ``b`` can come out negative with finite pulses or noise),
        ``off_resonance`` (Hz, in [-1/(2 TR), 1/(2 TR))), ``rms_residual`` (root mean square
        complex residual per cycle, signal units; large values flag a voxel the single-frequency
        model does not describe, e.g. a spread of frequencies).

    Notes
    -----
    The linear step is the algebraic fit of Björk et al. [3]_ with the constraint that ``b`` is
    real (six real unknowns, so three cycles determine it); it weights each cycle by
    :math:`1 + b\\cos\\psi` and is therefore biased under noise, which the Levenberg-Marquardt
    refinement of the five real parameters (Re K, Im K, a, b, theta) removes (LORE-GN).
    The parameters (a, b, theta) and (-a, -b, theta + pi) give the same ellipse: the fit keeps
    :math:`a \\ge 0` (``a`` is close to 1, its sign is never in doubt), which settles theta; PLANET's
    [4]_ ambiguity comes from its general conic parameterisation. With finite pulses ``a`` and
    ``b`` are not exactly those of the instantaneous model (relaxation during the pulse), so
    :func:`planet_relaxation` is biased there (it assumes instantaneous pulses).
    """
    signals, increments = _check_cycles(signals, phase_increments, minimum=3)
    tr = _check_tr(tr)
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    leading_shape = signals.shape[:-1]
    mask = check_mask(mask, leading_shape)
    flip_angle = _finite_pulse_flip_angle(flip_angle, pulse_duration, leading_shape)

    def chunk_function(chunk, flip_chunk):
        return _ellipse_chunk(chunk, increments, tr, max_iter, tol, flip_chunk, pulse_duration)

    amplitude, a, b, off_resonance, rms = apply_in_chunks(
        chunk_function,
        [signals, flip_angle],
        leading_shape=leading_shape,
        output_shapes=[(), (), (), (), ()],
        mask=mask,
        chunk_size=chunk_size,
        dtype=np.complex128,
        n_jobs=n_jobs,
    )
    rms = rms.real
    if mask is not None:
        rms[~mask] = np.inf
    return EllipseFit(amplitude, a.real, b.real, off_resonance.real, rms)


def planet_relaxation(a, b, flip_angle, tr, *, b1=1.0):
    """R1 and R2 from the ellipse parameters of one flip angle (PLANET).

    Parameters
    ----------
    a, b : array_like
        Ellipse parameters from :func:`fit_ellipse`.
    flip_angle : float or array_like
        Nominal flip angle (rad).
    tr : float
        Repetition time (s).
    b1 : array_like, optional
        Transmit field ratio; PLANET needs the actual flip angle.

    Returns
    -------
    r1, r2 : ndarray
        Rates in 1/s; NaN where (a, b) admit no physical solution (0 < a < 1, 0 < E1 < 1).

    Notes
    -----
    :math:`R_2 = -\\ln a / TR` and, inverting the expression of ``b``,
    :math:`E_1 = \\frac{a(1 + \\cos\\alpha - ab\\cos\\alpha) - b}{a(1 + \\cos\\alpha - ab) - b\\cos\\alpha}` [4]_.
    R1 is far more sensitive to noise than R2 (1 - E1 is small at short TR).

    Instantaneous pulses are assumed; there is no finite-pulse correction. Measured on the exact
    steady state with 1 ms rectangular pulses (TR 5 ms, 50 deg, 0-90 Hz, brain T1/T2,
    ``tests/core/test_bssfp_finite_pulse.py``): R2 from ``a`` stays within 1 %, but R1 from ``b``
    is 15-66 % low (``b`` reflects the T1 recovery during the pulse).
    """
    tr = _check_tr(tr)
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    cos_a = np.cos(np.asarray(b1, dtype=float) * np.asarray(flip_angle, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = (a * (1 + cos_a - a * b * cos_a) - b) / (a * (1 + cos_a - a * b) - b * cos_a)
        r2 = np.where((a > 0) & (a < 1), -np.log(np.where(a > 0, a, 1.0)) / tr, np.nan)
        r1 = np.where((e1 > 0) & (e1 < 1), -np.log(np.where(e1 > 0, e1, 1.0)) / tr, np.nan)
    return r1, r2


# --------------------------------------------------------------------------------------------
# DESPOT2 on the band-free signal
# --------------------------------------------------------------------------------------------
def _band_free_shape(e1, q, alpha):
    """``f = (1 - E1) sin(a) / (1 - E1 q - (E1 - q) cos a)`` and df/dq, q = E2^2 (broadcast)."""
    cos_a = np.cos(alpha)
    denominator = 1.0 - e1 * q - (e1 - q) * cos_a
    shape = (1.0 - e1) * np.sin(alpha) / denominator
    return shape, shape * (e1 - cos_a) / denominator


def _despot2_linear(signal, alpha, e1):
    """DESPOT2 regression ``S/sin a = m S/tan a + c`` -> q = E2^2 (n,); ``e1`` (n,) common to the flips."""
    y = signal / np.sin(alpha)
    x = signal / np.tan(alpha)
    x_mean, y_mean = x.mean(axis=-1, keepdims=True), y.mean(axis=-1, keepdims=True)
    sxx = np.sum((x - x_mean) ** 2, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.sum((x - x_mean) * (y - y_mean), axis=-1) / sxx
        return (e1 - slope) / (1.0 - slope * e1)


def _despot2_linear_per_flip(signal, alpha, e1):
    """DESPOT2 linearised with one E1 per flip (n, F) -> q = E2^2 (n,).

    :math:`S(1 - E_1q - (E_1 - q)\\cos\\alpha) = P(1 - E_1)\\sin\\alpha` divided by
    :math:`\\sin\\alpha` is linear in the amplitude P and q:
    :math:`S(1 - E_1\\cos\\alpha)/\\sin\\alpha = P(1 - E_1) + q\\,S(E_1 - \\cos\\alpha)/\\sin\\alpha`.
    With a common E1 it is the regression of :func:`_despot2_linear` in other coordinates (the
    same solution for two flip angles, another weighting for more).
    """
    cos_a, sin_a = np.cos(alpha), np.sin(alpha)
    target = signal * (1.0 - e1 * cos_a) / sin_a
    first, second = 1.0 - e1, signal * (e1 - cos_a) / sin_a
    # 2 x 2 normal equations of target = P first + q second
    a11, a12, a22 = np.sum(first**2, -1), np.sum(first * second, -1), np.sum(second**2, -1)
    r1, r2 = np.sum(first * target, -1), np.sum(second * target, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a11 * r2 - a12 * r1) / (a11 * a22 - a12**2)


def _amplitude_and_jacobian(signal, alpha, e1, r2, tr_r2):
    """Best amplitude P for given R2 (linear), the Jacobian (n, F, 2) of P f(R2), the residual.

    ``alpha`` and ``e1`` are (n, F) (per flip with finite pulses), ``tr_r2`` the time of E2 (s).
    """
    q = np.exp(-np.clip(2.0 * tr_r2 * r2, -_MAX_EXPONENT, _MAX_EXPONENT))
    shape, dshape_dq = _band_free_shape(e1, q[:, None], alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        amplitude = np.sum(signal * shape, axis=-1) / np.sum(shape**2, axis=-1)
    jac = np.stack([shape, amplitude[:, None] * dshape_dq * (-2.0 * tr_r2 * q[:, None])], axis=-1)
    residual = signal - amplitude[:, None] * shape
    return amplitude, jac, residual


@_quiet
def _despot2_chunk(signal, r1, b1, sigma, off_resonance, flip_angles, tr, pulse_duration, method, max_iter, tol):
    n = signal.shape[0]
    signal = np.abs(signal).astype(np.float64, copy=False)
    r1 = np.broadcast_to(np.asarray(r1, dtype=float), (n,))
    b1 = np.broadcast_to(np.asarray(b1, dtype=float), (n,))
    off_resonance = np.broadcast_to(np.asarray(0.0 if off_resonance is None else off_resonance, dtype=float), (n,))
    # finite pulses: per-flip equivalent flip angle and E1, one E2 time (finite_pulse_equivalent)
    alpha, tr_r2, tr_r1 = finite_pulse_equivalent(
        b1[:, None] * flip_angles, tr, pulse_duration, off_resonance=off_resonance[:, None]
    )
    e1 = np.exp(-tr_r1 * r1[:, None])
    if pulse_duration > 0:
        # E1 differs between the flips (finite_pulse_equivalent): the exact linearisation
        q = _despot2_linear_per_flip(signal, alpha, e1)
    else:
        q = _despot2_linear(signal, alpha, e1[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = -np.log(q) / (2.0 * tr_r2)
    started = np.isfinite(r2)
    # A voxel whose regression has no physical solution starts from a brain-like T2.
    r2 = np.where(started, r2, 15.0)
    if method == "nonlinear":
        # Gauss-Newton on R2 with the amplitude projected out (variable projection), damped.
        active = np.ones(n, dtype=bool)
        for _ in range(max_iter):
            if not active.any():
                break
            index = np.flatnonzero(active)
            _, jac, residual = _amplitude_and_jacobian(signal[index], alpha[index], e1[index], r2[index], tr_r2)
            shape = jac[..., 0]
            derivative = jac[..., 1]
            # Component of the R2 derivative orthogonal to the amplitude direction.
            with np.errstate(divide="ignore", invalid="ignore"):
                projected = (
                    derivative - shape * (np.sum(derivative * shape, axis=-1) / np.sum(shape**2, axis=-1))[:, None]
                )
                step = np.sum(projected * residual, axis=-1) / np.sum(projected**2, axis=-1)
            step = np.where(
                np.isfinite(step), np.clip(step, -0.5 * np.abs(r2[index]) - 1.0, 0.5 * np.abs(r2[index]) + 1.0), 0.0
            )
            r2[index] = r2[index] + step
            converged = np.abs(step) <= tol * (np.abs(r2[index]) + 1e-3)
            active[index[converged]] = False
    amplitude, jac, residual = _amplitude_and_jacobian(signal, alpha, e1, r2, tr_r2)
    normal = np.einsum("nki,nkj->nij", jac, jac)
    determinant = normal[:, 0, 0] * normal[:, 1, 1] - normal[:, 0, 1] ** 2
    n_flip = signal.shape[-1]
    if sigma is None:
        noise_variance = np.sum(residual**2, axis=-1) / (n_flip - 2) if n_flip > 2 else np.full(n, np.nan)
    else:
        noise_variance = np.broadcast_to(np.asarray(sigma, dtype=float), (n,)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        r2_se = np.sqrt(noise_variance * normal[:, 0, 0] / determinant)
    ok = np.isfinite(r2) & np.isfinite(amplitude) & np.isfinite(signal).all(axis=-1)
    ok &= (r1 > 0) & (b1 > 0) & np.any(signal > 0, axis=-1)
    return (np.where(ok, r2, 0.0), np.where(ok & (determinant > 0), r2_se, np.inf), np.where(ok, amplitude, 0.0))


def fit_despot2(
    band_free,
    flip_angles,
    tr,
    r1,
    *,
    b1=1.0,
    sigma=None,
    method="nonlinear",
    pulse_duration=0.0,
    off_resonance=None,
    mask=None,
    max_iter=30,
    tol=1e-8,
    chunk_size=500_000,
    n_jobs=1,
):
    """R2 from the band-free bSSFP signal at two or more flip angles, R1 and B1+ given (DESPOT2).

    Parameters
    ----------
    band_free : ndarray, shape (..., n_flip)
        Band-free signal per flip angle (complex or magnitude; its magnitude is fitted), e.g.
        :func:`geometric_solution` or the ``amplitude`` of :func:`fit_ellipse`.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad), at least two distinct.
    tr : float
        Repetition time (s).
    r1 : array_like
        R1 (1/s), scalar or of the voxel shape (e.g. from DESPOT1).
    b1 : array_like, optional
        Transmit field ratio, scalar or of the voxel shape.
    sigma : float or array_like, optional
        Noise SD of the band-free magnitudes, for ``r2_se``. Without it the SD is estimated from
        the residuals when there are more than two flip angles (else ``r2_se`` is NaN).
    method : {"nonlinear", "linear"}, optional
        ``"linear"``: the DESPOT2 regression :math:`S/\\sin\\alpha = m S/\\tan\\alpha + c`,
        :math:`E_2^2 = (E_1 - m)/(1 - mE_1)`. ``"nonlinear"``: least squares of the magnitudes
        over (amplitude, R2), Gauss-Newton with the amplitude projected out, started from the
        regression.
    pulse_duration : float, optional
        Duration of the (rectangular) RF pulses (s). 0 (default): instantaneous pulses. Otherwise
        the model is corrected for the finite pulse (:func:`finite_pulse_equivalent`): 1 ms
        pulses at TR 5 ms bias R2 by -7 to -13 % without the correction, within 0.5 % with it.
    off_resonance : array_like, optional
        Frequency offset (Hz) of each voxel, e.g. from :func:`geometric_off_resonance`; used with
        finite pulses only (0 when not given: at 1 ms, 90 Hz moves R2 by about 2.5 %). A frequency
        known modulo 1/TR is exact within +-1/(2 TR) only.
    mask : ndarray of bool, optional
        Voxels to fit; others are 0.
    max_iter, tol : optional
        Gauss-Newton iterations and relative step tolerance.
    chunk_size : int, optional
        Voxels per chunk.
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    Despot2Fit
        ``r2`` (1/s; negative values are kept, 0 where undetermined), ``r2_se`` (standard error
        of R2 from the Jacobian at the solution, 1/s; inf where undetermined) and ``amplitude``
        (:math:`M_0\\sqrt{E_2}`, signal units; with finite pulses :math:`E_2` at the time
        ``tr_r2`` of :func:`finite_pulse_equivalent`).

    Notes
    -----
    Model (:func:`band_free_signal`):
    :math:`S = M_0\\sqrt{E_2}(1 - E_1)\\sin\\alpha/(1 - E_1E_2^2 - (E_1 - E_2^2)\\cos\\alpha)` with
    :math:`\\alpha = B_1\\alpha_{nom}`; the amplitude absorbs the :math:`\\sqrt{E_2}` of the echo
    time, so R2 comes from the denominator only. Errors in R1 and B1+ propagate to R2 (see the
    tests for a 10 % B1+ error).
    """
    band_free, flip_angles = _check_last_axis(band_free, "band_free", "n_flip", flip_angles, "flip_angles")
    if np.unique(flip_angles).size < 2:
        raise ValueError(f"at least two distinct flip angles are needed, got {flip_angles}")
    if np.any(flip_angles <= 0) or np.any(flip_angles >= np.pi):
        raise ValueError(f"flip_angles must be in (0, pi) radians, got {flip_angles}")
    tr = _check_tr(tr)
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    if method not in ("linear", "nonlinear"):
        raise ValueError(f"method must be 'linear' or 'nonlinear', got {method!r}")
    leading_shape = band_free.shape[:-1]
    mask = check_mask(mask, leading_shape)
    r1 = _voxel_parameter("r1", r1, leading_shape)
    b1 = _voxel_parameter("b1", b1, leading_shape)
    if sigma is not None:
        sigma = _voxel_parameter("sigma", sigma, leading_shape)
    if off_resonance is not None:
        off_resonance = _voxel_parameter("off_resonance", off_resonance, leading_shape)

    def chunk_function(signal, r1_chunk, b1_chunk, sigma_chunk, off_resonance_chunk):
        return _despot2_chunk(
            signal, r1_chunk, b1_chunk, sigma_chunk, off_resonance_chunk, flip_angles, tr, pulse_duration, method,
            max_iter, tol,
        )  # fmt: skip

    r2, r2_se, amplitude = apply_in_chunks(
        chunk_function,
        [band_free, r1, b1, sigma, off_resonance],
        leading_shape=leading_shape,
        output_shapes=[(), (), ()],
        mask=mask,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )
    if mask is not None:
        r2_se[~mask] = np.inf
    return Despot2Fit(r2, r2_se, amplitude)


def despot2_crlb(m0, r1, r2, flip_angles, tr, sigma, *, b1=1.0):
    """Cramér-Rao bound on the SD of R2 from band-free magnitudes (amplitude and R2 unknown).

    Parameters
    ----------
    m0, r1, r2 : array_like
        True parameters (broadcast over voxels).
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    tr : float
        Repetition time (s).
    sigma : float or array_like
        Gaussian noise SD of each band-free magnitude, broadcastable to ``(..., n_flip)`` (the
        geometric solution's noise differs between flip angles); give a per-voxel map as
        ``sigma[..., np.newaxis]``.
    b1 : array_like, optional
        Transmit field ratio.

    Returns
    -------
    ndarray
        Lower bound on the SD of an unbiased R2 estimate (1/s), with R1 and B1+ known.
    """
    tr = _check_tr(tr)
    flip_angles = np.asarray(flip_angles, dtype=float)
    m0, r1, r2, b1 = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (m0, r1, r2, b1)))
    weight = 1.0 / np.asarray(sigma, dtype=float) ** 2
    alpha = b1[..., None] * flip_angles
    e1 = np.exp(-tr * r1)[..., None]
    q = np.exp(-2.0 * tr * r2)[..., None]
    shape, dshape_dq = _band_free_shape(e1, q, alpha)
    amplitude = (m0 * np.exp(-tr * r2 / 2))[..., None]
    d_amplitude = shape
    d_r2 = amplitude * dshape_dq * (-2.0 * tr * q)
    # The amplitude M0 sqrt(E2) is a free parameter: its R2 dependence adds no information.
    f11, f12, f22 = (
        np.sum(weight * d_amplitude**2, -1),
        np.sum(weight * d_amplitude * d_r2, -1),
        np.sum(weight * d_r2**2, -1),
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(f11 / (f11 * f22 - f12**2))


# --------------------------------------------------------------------------------------------
# Joint fit of all phase cycles and flip angles (R2 and off-resonance, R1 and B1+ given)
# --------------------------------------------------------------------------------------------
JointFit = namedtuple("JointFit", ["r2", "r2_se", "amplitude", "off_resonance", "rms_residual"])
JointFit.__doc__ = """Joint bSSFP fit per voxel (see :func:`fit_bssfp_joint`, :func:`fit_bssfp_magnitude`)."""


def _unit_signal(r1, r2, theta, alpha, tr, increments):
    """``bssfp_signal`` with M0 = 1 for (n,) voxels, alpha (n, F), increments (N,) -> (n, F, N).

    ``r1`` is (n,) or, per flip angle, (n, F) (the magnitude fit's finite-pulse equivalent).
    Returns the signal and its derivative with theta.
    """
    r1 = np.asarray(r1)
    e1 = np.exp(-tr * r1).reshape(r1.shape[0], -1, 1)
    e2 = np.exp(-np.clip(tr * r2, -_MAX_EXPONENT, _MAX_EXPONENT))[:, None, None]
    theta = theta[:, None, None]
    cos_a = np.cos(alpha)[..., None]
    denominator = 1.0 - e1 * cos_a - e2**2 * (e1 - cos_a)
    b = e2 * (1.0 - e1) * (1.0 + cos_a) / denominator
    psi = theta - increments
    rotor = e2 * np.exp(-1j * psi)
    ellipse_denominator = 1.0 + b * np.cos(psi)
    signal = (
        (1.0 - e1)
        * np.sin(alpha)[..., None]
        / denominator
        * np.sqrt(e2)
        * np.exp(0.5j * theta)
        * (1.0 + rotor)
        / ellipse_denominator
    )
    d_theta = signal * (0.5j - 1j * rotor / (1.0 + rotor) + b * np.sin(psi) / ellipse_denominator)
    return signal, d_theta


def _unit_signal_derivatives(r1, r2, theta, alpha, tr, increments):
    """:func:`_unit_signal` and its derivatives with R2 (central difference) and theta, each (n, F, N)."""
    signal, d_theta = _unit_signal(r1, r2, theta, alpha, tr, increments)
    step = 1e-5 * np.maximum(np.abs(r2), 1.0)
    plus, _ = _unit_signal(r1, r2 + step, theta, alpha, tr, increments)
    minus, _ = _unit_signal(r1, r2 - step, theta, alpha, tr, increments)
    return signal, (plus - minus) / (2.0 * step)[:, None, None], d_theta


def _projected_fit(signals, basis, *, nonnegative=False):
    """Best amplitude per voxel (complex, or real >= 0 with ``nonnegative``), the residual (n, F, N) and cost."""
    norm = np.sum(np.abs(basis) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        amplitude = np.sum(np.conj(basis) * signals, axis=(1, 2)) / norm
    if nonnegative:
        amplitude = np.maximum(amplitude, 0.0)
    residual = signals - amplitude[:, None, None] * basis
    return amplitude, residual, np.sum(np.abs(residual) ** 2, axis=(1, 2))


def _projected_columns(basis, amplitude, derivatives):
    """Variable-projection Jacobian columns (n, F N), one per derivative of the basis (n, F, N).

    Kaufman's approximation, exact at a zero residual: each keeps only the part of the model's
    change that the linear amplitude cannot absorb.
    """
    norm = np.sum(np.abs(basis) ** 2, axis=(1, 2))
    columns = []
    for derivative in derivatives:
        column = amplitude[:, None, None] * derivative
        along = np.sum(np.conj(basis) * column, axis=(1, 2)) / norm
        columns.append((column - along[:, None, None] * basis).reshape(column.shape[0], -1))
    return columns


def _joint_linearisation(signals, r1, r2, theta, alpha, tr, increments):
    """Complex amplitude, real residual (n, 2 F N), cost and variable-projection Jacobian (n, 2 F N, 2)."""
    basis, d_r2, d_theta = _unit_signal_derivatives(r1, r2, theta, alpha, tr, increments)
    amplitude, residual, cost = _projected_fit(signals, basis)
    columns = [np.concatenate([c.real, c.imag], axis=1) for c in _projected_columns(basis, amplitude, (d_r2, d_theta))]
    flat_residual = residual.reshape(residual.shape[0], -1)
    residual = np.concatenate([flat_residual.real, flat_residual.imag], axis=1)
    return amplitude, residual, cost, np.stack(columns, axis=-1)


def _magnitude_linearisation(magnitudes, r1, r2, theta, alpha, tr, increments):
    """Amplitude (real >= 0), residual (n, F N), cost and variable-projection Jacobian (n, F N, 2) of |model|."""
    signal, d_r2, d_theta = _unit_signal_derivatives(r1, r2, theta, alpha, tr, increments)
    basis = np.abs(signal)  # never 0: |1 + E2 e^{-i psi}| >= 1 - E2
    # d|s| = Re(conj(s) ds) / |s|
    derivatives = [np.real(np.conj(signal) * derivative) / basis for derivative in (d_r2, d_theta)]
    amplitude, residual, cost = _projected_fit(magnitudes, basis, nonnegative=True)
    columns = _projected_columns(basis, amplitude, derivatives)
    return amplitude, residual.reshape(residual.shape[0], -1), cost, np.stack(columns, axis=-1)


def _magnitude_cost(magnitudes, r1, r2, theta, alpha, tr, increments):
    basis = np.abs(_unit_signal(r1, r2, theta, alpha, tr, increments)[0])
    return _projected_fit(magnitudes, basis, nonnegative=True)[2]


def _solve_2x2(normal, vector):
    det = normal[:, 0, 0] * normal[:, 1, 1] - normal[:, 0, 1] * normal[:, 1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        first = (normal[:, 1, 1] * vector[:, 0] - normal[:, 0, 1] * vector[:, 1]) / det
        second = (normal[:, 0, 0] * vector[:, 1] - normal[:, 1, 0] * vector[:, 0]) / det
    return first, second, det


def _levenberg_marquardt(r2, theta, cost, linearise, cost_at, max_iter, tol):
    """Levenberg-Marquardt over (R2, theta) per voxel; updates ``r2``, ``theta`` and ``cost`` in place.

    ``linearise(index, r2, theta)`` gives the residual (data - model, (m, K)) and the Jacobian
    (m, K, 2) of the voxels ``index`` at those values, ``cost_at(index, r2, theta)`` their cost.
    """
    damping = np.full(r2.shape, 1e-3)
    active = np.isfinite(cost)
    for _ in range(max_iter):
        if not active.any():
            break
        index = np.flatnonzero(active)
        residual, jac = linearise(index, r2[index], theta[index])
        jt = jac.transpose(0, 2, 1)
        normal = jt @ jac
        normal[:, [0, 1], [0, 1]] *= 1.0 + damping[index, None]
        # residual = data - model and d(model) = jac d(params)
        step_r2, step_theta, det = _solve_2x2(normal, (jt @ residual[..., None])[..., 0])
        trial_r2, trial_theta = r2[index] + step_r2, theta[index] + step_theta
        trial_cost = cost_at(index, trial_r2, trial_theta)
        better = np.isfinite(trial_cost) & (trial_cost <= cost[index])
        accepted = index[better]
        r2[accepted], theta[accepted], cost[accepted] = trial_r2[better], trial_theta[better], trial_cost[better]
        damping[accepted] = np.maximum(damping[accepted] / 10.0, 1e-9)
        damping[index[~better]] *= 10.0
        small = (np.abs(step_r2) <= tol * (np.abs(r2[index]) + 1.0)) & (np.abs(step_theta) <= tol)
        converged = (better & small) | (damping[index] > 1e8) | ~np.isfinite(det)
        active[index[converged]] = False


def _r2_standard_error(jac, cost, n_free, sigma):
    """SE of R2 from the Jacobian (n, K, 2) and the determinant of its normal matrix.

    ``sigma`` (noise SD per datum) when given, else the residual variance ``cost / n_free``.
    """
    normal = jac.transpose(0, 2, 1) @ jac
    det = normal[:, 0, 0] * normal[:, 1, 1] - normal[:, 0, 1] ** 2
    if sigma is None:
        noise_variance = cost / n_free
    else:
        noise_variance = np.broadcast_to(np.asarray(sigma, dtype=float), cost.shape) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(noise_variance * normal[:, 1, 1] / det), det


@_quiet
def _joint_chunk(signals, r1, b1, r2_start, theta_start, sigma, flip_angles, increments, tr, max_iter, tol):
    n = signals.shape[0]
    signals = signals.astype(np.complex128, copy=False)
    r1 = np.broadcast_to(np.asarray(r1, dtype=float), (n,))
    alpha = np.broadcast_to(np.asarray(b1, dtype=float), (n,))[:, None] * flip_angles
    r2_start = np.broadcast_to(np.asarray(r2_start, dtype=float), (n,))
    theta_start = np.broadcast_to(np.asarray(theta_start, dtype=float), (n,))
    r2 = np.where(np.isfinite(r2_start) & (r2_start > 0), r2_start, 15.0)
    theta = np.where(np.isfinite(theta_start), theta_start, 0.0)

    def cost_at(index, r2_values, theta_values):
        basis, _ = _unit_signal(r1[index], r2_values, theta_values, alpha[index], tr, increments)
        return _projected_fit(signals[index], basis)[2]

    def linearise(index, r2_values, theta_values):
        _, residual, _, jac = _joint_linearisation(
            signals[index], r1[index], r2_values, theta_values, alpha[index], tr, increments
        )
        return residual, jac

    cost = cost_at(slice(None), r2, theta)
    _levenberg_marquardt(r2, theta, cost, linearise, cost_at, max_iter, tol)
    amplitude, _, cost, jac = _joint_linearisation(signals, r1, r2, theta, alpha, tr, increments)
    n_data = 2 * signals.shape[1] * signals.shape[2]
    # four unknowns: the complex amplitude, R2 and theta
    r2_se, det = _r2_standard_error(jac, cost, n_data - 4, sigma)
    wrapped = np.mod(theta + np.pi, 2 * np.pi) - np.pi
    # the model carries e^{i theta/2}: each 2 pi taken off theta flips the amplitude's sign
    turns = np.rint((theta - wrapped) / (2 * np.pi))
    amplitude = np.where(np.mod(turns, 2) == 1, -amplitude, amplitude)
    theta = wrapped
    ok = np.isfinite(r2) & np.isfinite(amplitude) & np.isfinite(cost) & (r1 > 0)
    ok &= np.any(np.abs(signals) > 0, axis=(1, 2))
    return (
        np.where(ok, r2, 0.0),
        np.where(ok & (det > 0), r2_se, np.inf),
        np.where(ok, amplitude, 0.0),
        np.where(ok, theta / (2 * np.pi * tr), 0.0),
        np.where(ok, np.sqrt(cost / (n_data // 2)), np.inf),
    )


def _joint_inputs(name, samples, flip_angles, phase_increments, tr, mask, r1, b1, sigma):
    """Checked inputs of the joint fits: increments, flip angles, TR, voxel shape, mask, R1, B1+ and sigma."""
    if samples.ndim < 2:
        raise ValueError(f"{name} must have shape (..., n_flip, n_cycle), got shape {samples.shape}")
    _, increments = _check_cycles(samples, phase_increments, minimum=3)
    flip_angles = np.atleast_1d(np.asarray(flip_angles, dtype=float))
    if flip_angles.shape != samples.shape[-2:-1]:
        raise ValueError(
            f"flip_angles must have shape ({samples.shape[-2]},) to match {name} of shape {samples.shape}, "
            f"got {flip_angles.shape}"
        )
    leading_shape = samples.shape[:-2]
    maps = [_voxel_parameter(key, value, leading_shape) for key, value in (("r1", r1), ("b1", b1))]
    maps.append(None if sigma is None else _voxel_parameter("sigma", sigma, leading_shape))
    return (increments, flip_angles, _check_tr(tr), leading_shape, check_mask(mask, leading_shape), *maps)


def _joint_fit_in_chunks(chunk_function, inputs, leading_shape, mask, dtype, *, chunk_size, n_jobs):
    """:class:`JointFit` of a joint chunk function over the (masked) voxels; ``r2_se`` and the residual inf outside."""
    r2, r2_se, amplitude, off_resonance, rms = apply_in_chunks(
        chunk_function,
        inputs,
        leading_shape=leading_shape,
        output_shapes=[(), (), (), (), ()],
        mask=mask,
        chunk_size=chunk_size,
        dtype=dtype,
        n_jobs=n_jobs,
    )
    r2_se, rms = r2_se.real, rms.real
    if mask is not None:
        r2_se[~mask] = np.inf
        rms[~mask] = np.inf
    return JointFit(r2.real, r2_se, amplitude, off_resonance.real, rms)


def fit_bssfp_joint(
    signals,
    flip_angles,
    phase_increments,
    tr,
    r1,
    *,
    b1=1.0,
    sigma=None,
    r2_start=None,
    off_resonance_start=None,
    mask=None,
    max_iter=20,
    tol=1e-5,
    chunk_size=50_000,
    n_jobs=1,
):
    r"""R2 and off-resonance from every complex phase cycle and flip angle at once (R1, B1+ given).

    Parameters
    ----------
    signals : ndarray of complex, shape (..., n_flip, n_cycle)
        Complex phase-cycled signals, the same increments at every flip angle.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    phase_increments : array_like, shape (n_cycle,)
        RF phase-cycling increments (rad).
    tr : float
        Repetition time (s).
    r1 : array_like
        R1 (1/s), scalar or of the voxel shape.
    b1 : array_like, optional
        Transmit field ratio, scalar or of the voxel shape.
    sigma : float or array_like, optional
        Noise SD of the real (and of the imaginary) part of each sample, for ``r2_se``; without it
        the SD is estimated from the residuals.
    r2_start, off_resonance_start : array_like, optional
        Starting values (1/s, Hz) of the voxel shape. By default R2 comes from
        :func:`geometric_solution` and non-linear :func:`fit_despot2`, the off-resonance from
        :func:`geometric_off_resonance` (averaged over flip angles, weighted by the squared
        band-free signal).
    mask : ndarray of bool, optional
        Voxels to fit; others are 0.
    max_iter, tol : optional
        Levenberg-Marquardt iterations and step tolerance (relative for R2, rad for theta).
    chunk_size : int, optional
        Voxels per chunk (about 3 kB per voxel of temporaries for 2 x 4 samples).
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    JointFit
        ``r2`` (1/s), ``r2_se`` (1/s), ``amplitude`` (complex :math:`M_0 e^{i\phi_0}`; the
        model's :math:`e^{i\theta/2}` flips its sign when the frequency moves by 1/TR, so at
        exactly :math:`\pm 1/(2TR)` the phase is defined modulo pi),
        ``off_resonance`` (Hz, in [-1/(2 TR), 1/(2 TR))) and ``rms_residual`` (signal units).

    Notes
    -----
    Least squares of :func:`qmri_workflows.core.signal.bssfp_signal` over the complex amplitude
    (projected out, variable projection) and (R2, theta). Unlike the geometric solution followed
    by DESPOT2, it uses the shape of each ellipse as well as its centre, so it reaches the
    Cramér-Rao bound of the complex data (the tests: an R2 SD 0.55 to 0.7 times that of
    DESPOT2 on the geometric solution with 2 flip angles x 4 cycles). The price: it costs
    about five times more, and relying on the ellipse's shape makes it more sensitive to a
    spread of frequencies within the voxel (uniform 40 Hz spread at TR 5 ms: median R2 bias
    +5 to +11 % against +1 to +6 % for DESPOT2 on the geometric solution). Like every
    DESPOT2 without its finite-pulse correction, it assumes instantaneous pulses (1 ms pulses at
    TR 5 ms, 15/50 deg, 0-90 Hz: R2 6 to 12 % low; :func:`fit_despot2` takes ``pulse_duration``,
    and with it the linear and non-linear DESPOT2 are exact on the model;
    :func:`fit_bssfp_magnitude` takes it too, approximately).
    """
    signals = np.asarray(signals)
    increments, flip_angles, tr, leading_shape, mask, r1, b1, sigma = _joint_inputs(
        "signals", signals, flip_angles, phase_increments, tr, mask, r1, b1, sigma
    )
    if r2_start is None or off_resonance_start is None:
        band_free = geometric_solution(signals, increments, chunk_size=chunk_size, n_jobs=n_jobs)
        if r2_start is None:
            r2_start = fit_despot2(band_free, flip_angles, tr, r1, b1=b1, mask=mask, n_jobs=n_jobs).r2
        if off_resonance_start is None:
            off_resonance, _ = geometric_off_resonance(signals, increments, tr, band_free=band_free, n_jobs=n_jobs)
            # flip angles weighted by the squared band-free signal (as the App's off-resonance map)
            phasor = np.sum(np.abs(band_free) ** 2 * np.exp(2j * np.pi * off_resonance * tr), axis=-1)
            off_resonance_start = np.angle(phasor) / (2 * np.pi * tr)
    r2_start = _voxel_parameter("r2_start", r2_start, leading_shape)
    theta_start = 2 * np.pi * tr * _voxel_parameter("off_resonance_start", off_resonance_start, leading_shape)

    def chunk_function(signal, r1_chunk, b1_chunk, r2_chunk, theta_chunk, sigma_chunk):
        return _joint_chunk(
            signal, r1_chunk, b1_chunk, r2_chunk, theta_chunk, sigma_chunk, flip_angles, increments, tr, max_iter, tol
        )

    return _joint_fit_in_chunks(
        chunk_function,
        [signals, r1, b1, r2_start, theta_start, sigma],
        leading_shape,
        mask,
        np.complex128,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )


# --------------------------------------------------------------------------------------------
# Joint fit of all phase-cycle magnitudes (DESPOT2-FM: R2 and off-resonance, R1 and B1+ given)
# --------------------------------------------------------------------------------------------
def _finite_pulse_model(r1, nominal_alpha, tr, pulse_duration, off_resonance):
    """Flip angle (n, F), R1 (n, F) and the time of E2 that make :func:`_unit_signal` model finite pulses.

    :func:`finite_pulse_equivalent` gives E2 over ``tr_r2`` and E1 over ``tr_r1`` (per flip):
    the model is evaluated with ``tr = tr_r2`` and R1 scaled by ``tr_r1 / tr_r2``.
    """
    alpha, tr_r2, tr_r1 = finite_pulse_equivalent(nominal_alpha, tr, pulse_duration, off_resonance=off_resonance)
    return alpha, r1[:, None] * tr_r1 / tr_r2, tr_r2


#: The magnitude fit's best grid points (by cost) that a few Levenberg-Marquardt iterations try.
_SCOUTS = 5
#: Levenberg-Marquardt iterations from each of them.
_SCOUT_ITERATIONS = 4


def _subset(function, index):
    """``function`` of the voxels ``index``, called with positions in ``index``."""

    def subset(positions, *args):
        return function(index[positions], *args)

    return subset


@_quiet
def _magnitude_chunk(
    magnitudes,
    r1,
    b1,
    r2_start,
    theta_start,
    sigma,
    flip_angles,
    increments,
    tr,
    pulse_duration,
    n_starts,
    max_iter,
    tol,
):
    n = magnitudes.shape[0]
    magnitudes = np.abs(magnitudes).astype(np.float64, copy=False)
    r1 = np.broadcast_to(np.asarray(r1, dtype=float), (n,))
    nominal_alpha = np.broadcast_to(np.asarray(b1, dtype=float), (n,))[:, None] * flip_angles
    r2_start = np.broadcast_to(np.asarray(r2_start, dtype=float), (n,))
    theta_start = np.broadcast_to(np.asarray(theta_start, dtype=float), (n,))
    r2 = np.where(np.isfinite(r2_start) & (r2_start > 0), r2_start, 15.0)
    frequency = np.where(np.isfinite(theta_start), theta_start, 0.0) / (2 * np.pi * tr)
    alpha, r1_model, tr_model = _finite_pulse_model(r1, nominal_alpha, tr, pulse_duration, frequency[:, None])

    def cost_at(index, r2_values, theta_values):
        return _magnitude_cost(magnitudes[index], r1_model[index], r2_values, theta_values, alpha[index], tr_model,
                               increments)  # fmt: skip

    def linearise(index, r2_values, theta_values):
        _, residual, _, jac = _magnitude_linearisation(
            magnitudes[index], r1_model[index], r2_values, theta_values, alpha[index], tr_model, increments
        )
        return residual, jac

    # Magnitudes alone leave several local minima in (R2, theta), a mirror image of the true one
    # among them. Unless a start is given, a few iterations from each theta of a grid over one
    # period (R2 from its start) pick the search to finish: the best grid point alone can lie in a
    # wrong basin, since the start of R2 is biased (noiseless, cycles 0/30/90/200 or 0/90/180 deg:
    # R2 off by -20 to +16 % at some frequencies, exact with every grid point tried).
    given = np.isfinite(theta_start)
    r2_first, theta, cost = r2.copy(), np.where(given, theta_start, 0.0), np.full(n, np.inf)
    index = np.flatnonzero(~given)
    grid = np.linspace(-np.pi, np.pi, n_starts, endpoint=False)
    scouts = min(_SCOUTS, n_starts) if index.size else 0
    if scouts:
        grid_cost = np.stack([cost_at(index, r2_first[index], np.full(index.size, v)) for v in grid], axis=-1)
        grid_order = np.argsort(np.where(np.isfinite(grid_cost), grid_cost, np.inf), axis=-1, kind="stable")
    for rank in range(scouts):
        trial_r2 = r2_first[index].copy()
        trial_theta = grid[grid_order[:, rank]]
        trial_cost = cost_at(index, trial_r2, trial_theta)
        _levenberg_marquardt(trial_r2, trial_theta, trial_cost, _subset(linearise, index), _subset(cost_at, index),
                             _SCOUT_ITERATIONS, tol)  # fmt: skip
        better = trial_cost < cost[index]
        r2[index[better]], theta[index[better]] = trial_r2[better], trial_theta[better]
        cost[index[better]] = trial_cost[better]
    cost = cost_at(slice(None), r2, theta)
    _levenberg_marquardt(r2, theta, cost, linearise, cost_at, max_iter, tol)
    if pulse_duration > 0:
        # the equivalent flip angle depends on the frequency during the pulse: refit at the one found
        alpha, r1_model, tr_model = _finite_pulse_model(r1, nominal_alpha, tr, pulse_duration,
                                                        (theta / (2 * np.pi * tr))[:, None])  # fmt: skip
        cost = cost_at(slice(None), r2, theta)
        _levenberg_marquardt(r2, theta, cost, linearise, cost_at, max_iter, tol)
    amplitude, _, cost, jac = _magnitude_linearisation(magnitudes, r1_model, r2, theta, alpha, tr_model, increments)
    n_data = magnitudes.shape[1] * magnitudes.shape[2]
    # three unknowns: the amplitude, R2 and theta
    r2_se, det = _r2_standard_error(jac, cost, n_data - 3, sigma)
    frequency = (np.mod(theta + np.pi, 2 * np.pi) - np.pi) / (2 * np.pi * tr)
    if pulse_duration > 0:
        # the ellipse's phase reads the pulse's extra precession as frequency; per flip angle, averaged
        true = finite_pulse_off_resonance(frequency[:, None], nominal_alpha, tr, pulse_duration)
        frequency = np.angle(np.mean(np.exp(2j * np.pi * true * tr), axis=-1)) / (2 * np.pi * tr)
    ok = np.isfinite(r2) & np.isfinite(amplitude) & np.isfinite(cost) & (r1 > 0)
    ok &= np.any(magnitudes > 0, axis=(1, 2))
    return (
        np.where(ok, r2, 0.0),
        np.where(ok & (det > 0), r2_se, np.inf),
        np.where(ok, amplitude, 0.0),
        np.where(ok, frequency, 0.0),
        np.where(ok, np.sqrt(cost / n_data), np.inf),
    )


def fit_bssfp_magnitude(
    magnitudes,
    flip_angles,
    phase_increments,
    tr,
    r1,
    *,
    b1=1.0,
    sigma=None,
    n_coils=None,
    pulse_duration=0.0,
    r2_start=None,
    off_resonance_start=None,
    n_starts=12,
    mask=None,
    max_iter=30,
    tol=1e-6,
    chunk_size=20_000,
    n_jobs=1,
):
    r"""R2 and off-resonance from the magnitudes of every phase cycle and flip angle (DESPOT2-FM).

    Parameters
    ----------
    magnitudes : ndarray, shape (..., n_flip, n_cycle)
        Phase-cycle magnitudes, the same increments at every flip angle.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    phase_increments : array_like, shape (n_cycle,)
        RF phase-cycling increments (rad).
    tr : float
        Repetition time (s).
    r1 : array_like
        R1 (1/s), scalar or of the voxel shape.
    b1 : array_like, optional
        Transmit field ratio, scalar or of the voxel shape.
    sigma : float or array_like, optional
        Per-channel noise SD (that of each magnitude at high SNR), scalar or of the voxel shape:
        ``r2_se`` comes from it; without it, from the residuals.
    n_coils : int, optional
        With ``sigma``: the magnitudes are raw root-sum-of-squares (Rician for 1) images of this
        many channels, and each sample loses its noise floor :math:`2 N \sigma^2` from its square
        (:func:`qmri_workflows.core.noise.correct_noise_floor`) before the fit. None (default):
        the magnitudes carry no floor (denoised, or corrected already).
    pulse_duration : float, optional
        Rectangular RF pulse duration (s): the model takes the first-order equivalent of
        :func:`finite_pulse_equivalent` (refitted once at the frequency found); 0: instantaneous.
    r2_start, off_resonance_start : array_like, optional
        Starting values (1/s, Hz) of the voxel shape. By default R2 comes from non-linear
        :func:`fit_despot2` on the root mean square over the cycles (band-reduced, biased, close
        enough); theta starts from the five best (by cost) of ``n_starts`` values evenly spread over one
        period, each tried for four iterations, and the best of these searches is finished.
    n_starts : int, optional
        Starting values of theta on the grid.
    mask : ndarray of bool, optional
        Voxels to fit; others are 0.
    max_iter, tol : optional
        Levenberg-Marquardt iterations and step tolerance (relative for R2, rad for theta).
    chunk_size : int, optional
        Voxels per chunk (about 3 kB per voxel of temporaries for 2 x 4 samples).
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    JointFit
        ``r2`` (1/s), ``r2_se`` (1/s), ``amplitude`` (real :math:`M_0` >= 0, receive gain
        included), ``off_resonance`` (Hz, in [-1/(2 TR), 1/(2 TR))) and ``rms_residual``
        (signal units).

    Notes
    -----
    DESPOT2-FM (Deoni 2009 [6]_): least squares of
    :math:`M_0 |\mathrm{bssfp\_signal}(M_0 = 1; R_1, R_2, \theta, b_1\alpha, TR, \Delta_n)|` over
    every cycle and flip angle, with :math:`M_0 \ge 0` projected out (variable projection) and
    Levenberg-Marquardt over :math:`(R_2, \theta)`, as :func:`fit_bssfp_joint` does with the
    complex amplitude. The magnitudes of a cycle set fix the position on the ellipse (theta)
    only up to local minima, the mirror image among them, hence the grid of starts. No
    magnitude-only combination is band-free (:func:`magnitude_combination`), so DESPOT2 on
    the root mean square is biased (3 mm phantom, 8 channels, SNR 20, interior medians: -7 % in
    white matter to -22 % in the putamen; this fit -1.2 to +2.9 %); this fit is not, and its R2
    SD is close to the Cramér-Rao bound
    of the magnitude data (``tests/core/test_bssfp_magnitude.py``). Cost: the five short
    searches from the grid make it about 2.7 times the single search from the best grid point
    that it replaced, which missed the global minimum with unevenly spaced or three cycles (20 000
    voxels, 2 x 4 samples, one thread on a shared machine: 85 against 31 microseconds per voxel;
    that search was 1.8 times :func:`fit_bssfp_joint`, 30 times DESPOT2 on a band-free signal);
    with ``pulse_duration`` the second pass adds up to as much as that search again.
    The finite-pulse equivalent is that of the band-free signal: applied to each cycle it is an
    approximation; the per-flip-angle shift of theta the pulses cause is neglected.

    References
    ----------
    .. [6] Deoni SCL. Transverse relaxation time (T2) mapping in the brain with off-resonance
       correction using phase-cycled steady-state free precession imaging. J Magn Reson Imaging
       2009;30:411-417. doi:10.1002/jmri.21849
    """
    magnitudes = np.abs(np.asarray(magnitudes))
    increments, flip_angles, tr, leading_shape, mask, r1, b1, sigma = _joint_inputs(
        "magnitudes", magnitudes, flip_angles, phase_increments, tr, mask, r1, b1, sigma
    )
    pulse_duration = _check_pulse_duration(pulse_duration, tr)
    if sigma is not None and n_coils is not None:
        magnitudes = correct_noise_floor(magnitudes, np.asarray(sigma)[..., None, None], n_coils=n_coils)
    if r2_start is None:
        rms = magnitude_combination(magnitudes, method="rms")
        r2_start = fit_despot2(
            rms, flip_angles, tr, r1, b1=b1, pulse_duration=pulse_duration, mask=mask, n_jobs=n_jobs
        ).r2
    r2_start = _voxel_parameter("r2_start", r2_start, leading_shape)
    theta_start = np.nan
    if off_resonance_start is not None:
        theta_start = 2 * np.pi * tr * _voxel_parameter("off_resonance_start", off_resonance_start, leading_shape)

    def chunk_function(signal, r1_chunk, b1_chunk, r2_chunk, theta_chunk, sigma_chunk):
        return _magnitude_chunk(
            signal, r1_chunk, b1_chunk, r2_chunk, theta_chunk, sigma_chunk, flip_angles, increments, tr,
            pulse_duration, n_starts, max_iter, tol,
        )  # fmt: skip

    return _joint_fit_in_chunks(
        chunk_function,
        [magnitudes, r1, b1, r2_start, theta_start, sigma],
        leading_shape,
        mask,
        np.float64,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )
