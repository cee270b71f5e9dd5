"""Steady-state signal models of the gradient-echo sequences used for qMRI.

All functions are pure numpy and broadcast over voxels: every argument may be
a scalar or an array, and the result has the broadcast shape of the inputs
(plus a trailing echo axis for :func:`multi_echo_phase`).

Units: angles in radians, times in seconds, relaxation rates in 1/s, fields
in Hz. ``b1`` is the transmit field as a ratio (1 = nominal), so the actual
flip angle is ``b1 * flip_angle``.

Phase convention: transverse magnetisation is the complex number
``Mx + i My`` and free precession at a positive frequency offset ``f``
advances its phase by ``+2 pi f t``. The constant phase of the excitation axis
is dropped (it belongs to the transceive phase), so that an on-resonance
signal is real and positive.
"""

import numpy as np

__all__ = [
    "afi_signals",
    "bssfp_signal",
    "multi_echo_phase",
    "spgr_signal",
]


def _check_positive(name, value):
    value = np.asarray(value, dtype=float)
    if np.any(value <= 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def spgr_signal(m0, r1, r2star, flip_angle, tr, te, *, b1=1.0):
    """Spoiled gradient-echo (SPGR/FLASH) steady-state magnitude.

    Parameters
    ----------
    m0 : array_like
        Equilibrium magnetisation (signal amplitude at full relaxation, TE = 0,
        90 degree flip), including any receive sensitivity.
    r1 : array_like
        Longitudinal relaxation rate R1 (1/s).
    r2star : array_like
        Effective transverse relaxation rate R2* (1/s).
    flip_angle : array_like
        Nominal flip angle (rad).
    tr : float or array_like
        Repetition time (s), > 0.
    te : array_like
        Echo time (s). Broadcasts with the other arguments; to get an echo
        axis pass e.g. ``te[np.newaxis, :]`` and ``r1[..., np.newaxis]``.
    b1 : array_like, optional
        Transmit field ratio (1 = nominal); the actual flip angle is
        ``b1 * flip_angle``.

    Returns
    -------
    numpy.ndarray
        Signal magnitude, broadcast shape of the inputs.

    Notes
    -----
    Ideal spoiling (Ernst equation) with mono-exponential T2* decay:

    .. math::

        S = M_0 \\sin\\alpha \\frac{1 - E_1}{1 - E_1\\cos\\alpha}
            e^{-TE\\,R_2^*}, \\qquad E_1 = e^{-TR\\,R_1},\\ \\alpha = B_1 \\alpha_{nom}.

    References
    ----------
    .. [1] Ernst RR, Anderson WA. Application of Fourier transform
       spectroscopy to magnetic resonance. Rev Sci Instrum 1966;37:93-102.
    .. [2] Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping
       using gradient recalled acquisition in the steady state. Magn Reson Med
       2003;49:515-526.
    """
    tr = _check_positive("tr", tr)
    alpha = np.asarray(b1, dtype=float) * np.asarray(flip_angle, dtype=float)
    e1 = np.exp(-tr * np.asarray(r1, dtype=float))
    steady_state = np.sin(alpha) * (1.0 - e1) / (1.0 - e1 * np.cos(alpha))
    decay = np.exp(-np.asarray(te, dtype=float) * np.asarray(r2star, dtype=float))
    return np.asarray(m0, dtype=float) * steady_state * decay


def bssfp_signal(m0, r1, r2, flip_angle, tr, *, off_resonance=0.0, phase_increment=0.0, b1=1.0):
    """Balanced SSFP complex steady-state signal at TE = TR/2.

    Parameters
    ----------
    m0 : array_like
        Equilibrium magnetisation (including receive sensitivity).
    r1 : array_like
        Longitudinal relaxation rate (1/s).
    r2 : array_like
        Transverse relaxation rate R2 (1/s); balanced gradients refocus the
        static dephasing, so R2 (not R2*) governs the steady state.
    flip_angle : array_like
        Nominal flip angle (rad).
    tr : float or array_like
        Repetition time (s), > 0. The echo is read at TE = TR/2.
    off_resonance : array_like, optional
        Free-precession angle per TR from the frequency offset,
        ``theta = 2 pi f TR`` (rad).
    phase_increment : array_like, optional
        RF phase-cycling increment ``Delta`` (rad) added to the conventional
        alternation of the RF phase: pulse ``n`` has RF phase
        ``n (pi + Delta)`` and the receiver follows the RF phase. ``Delta = 0``
        is conventional bSSFP (the pass band is centred on resonance); the
        pattern shifts by ``Delta`` along the off-resonance axis.
    b1 : array_like, optional
        Transmit field ratio (1 = nominal).

    Returns
    -------
    numpy.ndarray of complex
        Complex signal, broadcast shape of the inputs.

    Notes
    -----
    With :math:`E_{1,2} = e^{-TR\\,R_{1,2}}`, :math:`\\alpha = B_1\\alpha_{nom}`
    and :math:`\\psi = \\theta - \\Delta`, the steady state (Bloch equations,
    instantaneous pulses, perfect balancing) is the ellipse [1]_ [2]_

    .. math::

        I = M \\sqrt{E_2}\\, e^{i\\theta/2}
            \\frac{1 + E_2 e^{-i\\psi}}{1 + b\\cos\\psi},\\quad
        M = \\frac{M_0 (1 - E_1)\\sin\\alpha}{1 - E_1\\cos\\alpha - E_2^2(E_1 - \\cos\\alpha)},\\quad
        b = \\frac{E_2 (1 - E_1)(1 + \\cos\\alpha)}{1 - E_1\\cos\\alpha - E_2^2(E_1 - \\cos\\alpha)}.

    On resonance (:math:`\\theta = \\Delta = 0`) it reduces to the familiar
    :math:`M_0 (1 - E_1)\\sin\\alpha\\sqrt{E_2} / (1 - E_1E_2 - (E_1 - E_2)\\cos\\alpha)`.
    The form of [1]_ with their angle :math:`\\theta_{XH}` is recovered with
    :math:`\\theta_{XH} = \\pi - \\psi` (their frame includes the RF
    alternation), up to the constant excitation phase.

    References
    ----------
    .. [1] Xiang QS, Hoff MN. Banding artifact removal for bSSFP imaging with
       an elliptical signal model. Magn Reson Med 2014;71:927-933.
    .. [2] Freeman R, Hill HDW. Phase and intensity anomalies in Fourier
       transform NMR. J Magn Reson 1971;4:366-383.
    """
    tr = _check_positive("tr", tr)
    alpha = np.asarray(b1, dtype=float) * np.asarray(flip_angle, dtype=float)
    e1 = np.exp(-tr * np.asarray(r1, dtype=float))
    e2 = np.exp(-tr * np.asarray(r2, dtype=float))
    theta = np.asarray(off_resonance, dtype=float)
    psi = theta - np.asarray(phase_increment, dtype=float)
    cos_a = np.cos(alpha)
    denominator = 1.0 - e1 * cos_a - e2**2 * (e1 - cos_a)
    amplitude = np.asarray(m0, dtype=float) * (1.0 - e1) * np.sin(alpha) / denominator
    b = e2 * (1.0 - e1) * (1.0 + cos_a) / denominator
    ellipse = (1.0 + e2 * np.exp(-1j * psi)) / (1.0 + b * np.cos(psi))
    return amplitude * np.sqrt(e2) * np.exp(0.5j * theta) * ellipse


def afi_signals(m0, r1, r2star, flip_angle, tr1, tr2, te, *, b1=1.0):
    """Actual flip-angle imaging (AFI) dual-TR steady-state magnitudes.

    Parameters
    ----------
    m0 : array_like
        Equilibrium magnetisation (including receive sensitivity).
    r1 : array_like
        Longitudinal relaxation rate (1/s).
    r2star : array_like
        R2* (1/s), for the decay to the echo time.
    flip_angle : array_like
        Nominal flip angle of both pulses (rad).
    tr1, tr2 : float
        The two interleaved repetition times (s); the first signal is
        acquired after the pulse that follows TR2 and precedes TR1.
    te : float or array_like
        Echo time (s) of both signals.
    b1 : array_like, optional
        Transmit field ratio (1 = nominal).

    Returns
    -------
    s1, s2 : numpy.ndarray
        Signals of the TR1 and TR2 intervals.

    Notes
    -----
    Ideal spoiling of the transverse magnetisation before each pulse [1]_.
    With :math:`E_{1,2} = e^{-TR_{1,2} R_1}`:

    .. math::

        S_{1} = M_0\\sin\\alpha\\,\\frac{1 - E_2 + (1 - E_1)E_2\\cos\\alpha}
            {1 - E_1E_2\\cos^2\\alpha} e^{-TE R_2^*},\\quad
        S_{2} = M_0\\sin\\alpha\\,\\frac{1 - E_1 + (1 - E_2)E_1\\cos\\alpha}
            {1 - E_1E_2\\cos^2\\alpha} e^{-TE R_2^*}.

    To first order in :math:`TR/T_1` the ratio :math:`r = S_2/S_1` gives
    :math:`\\alpha = \\arccos((rn - 1)/(n - r))` with :math:`n = TR_2/TR_1`.

    References
    ----------
    .. [1] Yarnykh VL. Actual flip-angle imaging in the pulsed steady state:
       a method for rapid three-dimensional mapping of the transmitted
       radiofrequency field. Magn Reson Med 2007;57:192-200.
    """
    tr1 = _check_positive("tr1", tr1)
    tr2 = _check_positive("tr2", tr2)
    alpha = np.asarray(b1, dtype=float) * np.asarray(flip_angle, dtype=float)
    r1 = np.asarray(r1, dtype=float)
    e1 = np.exp(-tr1 * r1)
    e2 = np.exp(-tr2 * r1)
    cos_a = np.cos(alpha)
    scale = (
        np.asarray(m0, dtype=float)
        * np.sin(alpha)
        * np.exp(-np.asarray(te, dtype=float) * np.asarray(r2star, dtype=float))
        / (1.0 - e1 * e2 * cos_a**2)
    )
    s1 = scale * (1.0 - e2 + (1.0 - e1) * e2 * cos_a)
    s2 = scale * (1.0 - e1 + (1.0 - e2) * e1 * cos_a)
    return s1, s2


def multi_echo_phase(field_hz, te, phase_offset=0.0):
    """Wrapped gradient-echo phase of a multi-echo acquisition.

    Parameters
    ----------
    field_hz : array_like
        Frequency offset per voxel (Hz), shape ``(...)``.
    te : array_like
        Echo times (s), shape ``(n_echo,)`` (a scalar gives one echo).
    phase_offset : array_like, optional
        Echo-independent (transceive) phase (rad), broadcastable to
        ``field_hz``.

    Returns
    -------
    numpy.ndarray
        Phase ``phase_offset + 2 pi f TE`` wrapped to (-pi, pi], shape
        ``(..., n_echo)``.

    Notes
    -----
    Linear phase evolution holds for a single frequency per voxel; QSM
    pipelines estimate ``field_hz`` from its slope over TE [1]_.

    References
    ----------
    .. [1] Deistung A, Schweser F, Reichenbach JR. Overview of quantitative
       susceptibility mapping. NMR Biomed 2017;30:e3569.
    """
    te = np.atleast_1d(np.asarray(te, dtype=float))
    if te.ndim != 1:
        raise ValueError(f"te must be a scalar or 1-D array of echo times, got shape {te.shape}")
    field_hz = np.asarray(field_hz, dtype=float)[..., np.newaxis]
    offset = np.asarray(phase_offset, dtype=float)[..., np.newaxis]
    phase = offset + 2.0 * np.pi * field_hz * te
    wrapped = np.angle(np.exp(1j * phase))
    # np.angle gives -pi for a negative real with imaginary part -0.0; the interval is (-pi, pi]
    wrapped[wrapped <= -np.pi] = np.pi
    return wrapped
