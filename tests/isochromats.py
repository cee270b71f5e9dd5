"""Brute-force isochromat simulation of RF-spoiled sequences, the reference for both EPGs.

Many isochromats spread over one cycle of spoiler dephasing, hard pulses with the quadratic RF phase
schedule (phase of pulse n = increment * n (n + 1) / 2), exact rotations (Rodrigues), relaxation and
recovery between pulses, no diffusion. The signal is the average transverse magnetisation just after
each pulse, demodulated by the pulse's phase, averaged over the last 25 periods of a long train.
"""

import math

import numpy as np


def _rotate(mx, my, mz, alpha, phase):
    """Rotate by alpha about the transverse axis at ``phase`` (left-handed like the scanner: a pulse
    about x tips +z towards -y, as in the EPG convention F+ = -i sin(alpha) after a pulse)."""
    ux, uy = math.cos(phase), math.sin(phase)
    c, s = np.cos(alpha), np.sin(alpha)
    # Rodrigues with axis (ux, uy, 0): v' = v c + (u x v) s + u (u.v)(1 - c)
    dot = ux * mx + uy * my
    cross_x = uy * mz
    cross_y = -ux * mz
    cross_z = ux * my - uy * mx
    new_x = mx * c + cross_x * s + ux * dot * (1 - c)
    new_y = my * c + cross_y * s + uy * dot * (1 - c)
    new_z = mz * c + cross_z * s
    return new_x, new_y, new_z


def simulate(t1, t2, alpha, intervals, phase_increment, *, n_isochromats=720, n_pulses=3000):
    """Steady-state signals after each pulse of a periodic train.

    Parameters
    ----------
    t1, t2, alpha : array_like
        Per column (s, s, rad actual flip angle).
    intervals : sequence of (tau, cycles)
        Time after each pulse (s) and spoiler dephasing in cycles across the isochromats.
    phase_increment : float
        RF-spoiling increment (rad).

    Returns
    -------
    numpy.ndarray, shape (n_columns, len(intervals))
    """
    t1, t2, alpha = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (t1, t2, alpha))
    position = 2 * np.pi * (np.arange(n_isochromats) + 0.5) / n_isochromats
    shape = (n_isochromats, t1.size)
    mx, my, mz = np.zeros(shape), np.zeros(shape), np.ones(shape)
    precession = [(np.cos(cycles * position)[:, None], np.sin(cycles * position)[:, None]) for _, cycles in intervals]
    decay = [(np.exp(-tau / t1), np.exp(-tau / t2)) for tau, _ in intervals]
    signals = np.zeros((t1.size, len(intervals)))
    # average the last 25 periods: with two intervals (AFI) the quadratic schedule keeps fluctuating
    averaged_from = n_pulses - 25 * len(intervals)
    pulse = 0
    while pulse < n_pulses:
        for index in range(len(intervals)):
            phase = math.remainder(phase_increment * pulse * (pulse + 1) / 2.0, 2 * math.pi)
            mx, my, mz = _rotate(mx, my, mz, alpha, phase)
            transverse = (mx + 1j * my).mean(axis=0) * np.exp(-1j * phase)
            if pulse >= averaged_from:
                signals[:, index] += np.abs(transverse) / 25
            e1, e2 = decay[index]
            cos_p, sin_p = precession[index]
            mx, my = e2 * (mx * cos_p - my * sin_p), e2 * (mx * sin_p + my * cos_p)
            mz = e1 * mz + (1 - e1)
            pulse += 1
    return signals
