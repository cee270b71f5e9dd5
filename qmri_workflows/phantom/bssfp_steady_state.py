r"""Phase-cycled balanced SSFP steady state of the phantom, with finite RF pulses.

The phantom's own bSSFP physics, written apart from the closed form the R2 fit inverts
(:func:`qmri_workflows.core.signal.bssfp_signal`): each voxel's magnetisation is propagated
through one repetition by the exact solution of the Bloch equations, and the steady state is the
fixed point of that affine map, found by one 3 x 3 linear solve per voxel.

One repetition, starting at the echo (TE = TR/2 from the centre of the pulse):

1. free precession and relaxation for :math:`(TR - T_{RF})/2` (exact: a rotation about z by
   :math:`2\pi f t` and the decays :math:`e^{-R_2t}`, :math:`e^{-R_1t}` with recovery to
   :math:`M_0`);
2. the step of the RF phase to the next pulse: the simulation works in the frame that turns with
   the RF phase, and pulse ``n`` has RF phase :math:`n(\pi + \Delta)` (as in
   :func:`~qmri_workflows.core.signal.bssfp_signal`), so the magnetisation turns by
   :math:`-(\pi + \Delta)` about z; the receiver follows the RF phase;
3. a rectangular RF pulse of duration :math:`T_{RF}` (``pulse_duration``): rotation about the
   effective field :math:`(-\alpha/T_{RF}, 0, 2\pi f)` (the RF along the RF phase axis, turning
   +z towards +y; off-resonance along z) with relaxation and recovery during it. The Bloch
   equation is linear with a constant generator over the pulse, so its exact propagator is a
   4 x 4 (homogeneous) matrix exponential, computed by scaling and squaring of a Taylor series to
   double precision. :math:`T_{RF} = 0` is the instantaneous rotation by :math:`\alpha` about -x;
4. free precession and relaxation for :math:`(TR - T_{RF})/2` to the next echo.

The echo is :math:`-i(M_x + iM_y)`, so an on-resonance signal is real and positive, and a positive
frequency advances the transverse phase: the conventions of
:func:`~qmri_workflows.core.signal.bssfp_signal`, which this equals for instantaneous pulses (see
``tests/phantom/test_bssfp_steady_state.py``; both are also checked against the time-stepped Bloch
simulation of ``tests/core/bssfp_bloch.py``).

Finite pulses lengthen the apparent T2 (the magnetisation is partly longitudinal while the pulse
turns it) and, at large flip angles, change the signal by several percent (Bieri & Scheffler
2009 [1]_): :mod:`qmri_workflows.core.bssfp` corrects DESPOT2 for it when the pulse duration is
known.

References
----------
.. [1] Bieri O, Scheffler K. SSFP signal with finite RF pulses. Magn Reson Med 2009;62:1232-1241.
   doi:10.1002/mrm.22116
"""

from __future__ import annotations

import numpy as np

__all__ = ["bssfp_steady_state", "CHUNK_VOXELS"]

#: Voxels per chunk: a few hundred temporaries of one float64 per voxel, about 100 MB at 50 000.
CHUNK_VOXELS = 50_000

# The Taylor series of exp(G h) is summed to this order once ||G h|| <= _TAYLOR_NORM: the remainder
# is below 0.1**9 / 9! ~ 3e-15, so the propagator is exact to double precision.
_TAYLOR_ORDER = 8
_TAYLOR_NORM = 0.1

# Affine maps M -> L M + o of many voxels are kept as (L, o) with L of shape (3, 3, n) and o of
# shape (3, n): every product is then a few dozen whole-array operations, several times faster
# than numpy's batched products of small matrices.


def _compose(first, second):
    """The map ``first`` after ``second``: ``(L1 L2, L1 o2 + o1)``."""
    (l1, o1), (l2, o2) = first, second
    linear = np.einsum("ikn,kjn->ijn", l1, l2)
    offset = np.einsum("ikn,kn->in", l1, o2) + o1
    return linear, offset


def _free_precession(duration, omega, r1, r2, *, frame_turn=0.0):
    """Free precession and relaxation for ``duration`` (M0 = 1), then a turn of the frame about z.

    Rotations about z commute with free precession, so the step of the RF phase (``frame_turn``,
    rad) just adds to the precession angle.
    """
    e1, e2 = np.exp(-duration * r1), np.exp(-duration * r2)
    angle = omega * duration + frame_turn
    cosine, sine = np.cos(angle), np.sin(angle)
    linear = np.zeros((3, 3, omega.size))
    offset = np.zeros((3, omega.size))
    linear[0, 0] = linear[1, 1] = e2 * cosine
    linear[0, 1] = -e2 * sine
    linear[1, 0] = e2 * sine
    linear[2, 2] = e1
    offset[2] = 1.0 - e1
    return linear, offset


def _hard_pulse(alpha):
    """Instantaneous rotation turning +z towards +y by ``alpha`` (about -x)."""
    linear = np.zeros((3, 3, alpha.size))
    linear[0, 0] = 1.0
    linear[1, 1] = linear[2, 2] = np.cos(alpha)
    linear[1, 2] = np.sin(alpha)
    linear[2, 1] = -np.sin(alpha)
    return linear, np.zeros((3, alpha.size))


def _finite_pulse(alpha, duration, omega, r1, r2):
    """Exact propagator of a rectangular pulse with off-resonance and relaxation (M0 = 1).

    The Bloch equation ``dM/dt = W x M - R (M - M0 z)`` with the constant effective field
    ``W = (-alpha / duration, 0, omega)`` is affine with a constant generator ``(G, g)``; its
    propagator is ``exp`` of the homogeneous generator, by scaling and squaring of the Taylor series.
    """
    n = alpha.size
    wx = -alpha / duration
    generator = np.zeros((3, 3, n))
    # W x M: rows (wy Mz - wz My, wz Mx - wx Mz, wx My - wy Mx), with wy = 0
    generator[0, 1] = -omega * duration
    generator[1, 0] = omega * duration
    generator[1, 2] = -wx * duration
    generator[2, 1] = wx * duration
    generator[0, 0] = generator[1, 1] = -r2 * duration
    generator[2, 2] = -r1 * duration
    drive = np.zeros((3, n))
    drive[2] = r1 * duration
    norm = float(np.max(np.abs(generator).sum(axis=1).max(axis=0) + np.abs(drive).max(axis=0), initial=0.0))
    squarings = max(0, int(np.ceil(np.log2(norm / _TAYLOR_NORM)))) if norm > 0 else 0
    generator /= 2.0**squarings
    drive /= 2.0**squarings
    step = (generator, drive)
    # Horner: exp(X) = I + X (I + X/2 (I + X/3 (...))), X the homogeneous step generator
    propagator = (generator / _TAYLOR_ORDER, drive / _TAYLOR_ORDER)
    _add_identity(propagator[0])
    for order in range(_TAYLOR_ORDER - 1, 0, -1):
        # X (L, o) = (G L, G o + g): what _compose gives
        linear, offset = _compose(step, propagator)
        linear /= order
        offset /= order
        _add_identity(linear)
        propagator = (linear, offset)
    for _ in range(squarings):
        propagator = _compose(propagator, propagator)
    return propagator


def _add_identity(linear):
    """``linear += I`` in place for (3, 3, n)."""
    for axis in range(3):
        linear[axis, axis] += 1.0


def _solve_3x3(matrix, vector):
    """Solve ``matrix x = vector`` for (3, 3, n) and (3, n) by Cramer's rule (well conditioned here)."""
    a, b, c = matrix[0]
    d, e, f = matrix[1]
    g, h, i = matrix[2]
    cofactor_a, cofactor_b, cofactor_c = e * i - f * h, f * g - d * i, d * h - e * g
    determinant = a * cofactor_a + b * cofactor_b + c * cofactor_c
    x, y, z = vector
    first = (x * cofactor_a + y * (c * h - b * i) + z * (b * f - c * e)) / determinant
    second = (x * cofactor_b + y * (a * i - c * g) + z * (c * d - a * f)) / determinant
    third = (x * cofactor_c + y * (b * g - a * h) + z * (a * e - b * d)) / determinant
    return first, second, third


def _steady_state_chunk(r1, r2, alpha, omega, tr, increment, pulse_duration):
    """Complex echo (n,) of unit M0 at TE = TR/2 for 1-d parameter arrays."""
    half_gap = 0.5 * (tr - pulse_duration)
    if pulse_duration > 0:
        pulse = _finite_pulse(alpha, pulse_duration, omega, r1, r2)
    else:
        pulse = _hard_pulse(alpha)
    # echo -> next pulse (with the step of the RF phase, see the module notes) -> next echo
    to_pulse = _free_precession(half_gap, omega, r1, r2, frame_turn=-(np.pi + increment))
    repetition = _compose(_free_precession(half_gap, omega, r1, r2), _compose(pulse, to_pulse))
    # fixed point M = L M + o  <=>  (I - L) M = o
    mx, my, _ = _solve_3x3(np.eye(3)[:, :, None] - repetition[0], repetition[1])
    return my - 1j * mx


def bssfp_steady_state(
    m0,
    r1,
    r2,
    flip_angle,
    tr,
    *,
    off_resonance=0.0,
    phase_increment=0.0,
    b1=1.0,
    pulse_duration=0.0,
    chunk_voxels=CHUNK_VOXELS,
):
    """Complex bSSFP steady-state echo (TE = TR/2) of every voxel, finite rectangular pulses allowed.

    Parameters
    ----------
    m0 : array_like
        Equilibrium magnetisation (including receive sensitivity).
    r1, r2 : array_like
        Relaxation rates (1/s).
    flip_angle : float
        Nominal flip angle (rad).
    tr : float
        Repetition time (s).
    off_resonance : array_like, optional
        Frequency offset (Hz); positive advances the transverse phase.
    phase_increment : float, optional
        RF phase-cycling increment (rad): pulse ``n`` has RF phase ``n (pi + increment)``.
    b1 : array_like, optional
        Transmit field ratio (actual / nominal flip angle).
    pulse_duration : float, optional
        Duration of the rectangular RF pulse (s), ``0 <= pulse_duration < tr``; 0 is instantaneous.
    chunk_voxels : int, optional
        Voxels solved at a time (bounds the memory, see :data:`CHUNK_VOXELS`).

    Returns
    -------
    numpy.ndarray of complex128
        Broadcast shape of the voxel inputs; NaN where R1 or R2 is not positive and finite (no
        steady state to speak of, e.g. air) and 0 where ``m0`` is 0.
    """
    tr = float(tr)
    pulse_duration = float(pulse_duration)
    if not (np.isfinite(tr) and tr > 0):
        raise ValueError(f"tr must be a positive time in seconds, got {tr!r}")
    if not (0.0 <= pulse_duration < tr):
        raise ValueError(f"pulse_duration must be in [0, TR = {tr:g}) s, got {pulse_duration!r}")
    m0, r1, r2, b1, frequency = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (m0, r1, r2, b1, off_resonance))
    )
    shape = m0.shape
    m0, r1, r2, b1, frequency = (v.reshape(-1) for v in (m0, r1, r2, b1, frequency))
    alpha = b1 * float(flip_angle)
    omega = 2.0 * np.pi * frequency
    valid = np.isfinite(r1) & np.isfinite(r2) & np.isfinite(alpha) & np.isfinite(omega) & (r1 > 0) & (r2 > 0)
    valid &= np.isfinite(m0) & (m0 != 0)
    out = np.where(m0 == 0, 0.0, np.nan).astype(np.complex128)
    index = np.flatnonzero(valid)
    chunk_voxels = max(1, int(chunk_voxels))
    for start in range(0, index.size, chunk_voxels):
        chunk = index[start : start + chunk_voxels]
        unit = _steady_state_chunk(
            r1[chunk], r2[chunk], alpha[chunk], omega[chunk], tr, float(phase_increment), pulse_duration
        )
        out[chunk] = m0[chunk] * unit
    return out.reshape(shape)
