"""Time-stepped Bloch simulation of phase-cycled bSSFP, independent of ``core.signal``.

Each repetition is cut into time steps: during the RF pulse (rectangular, duration ``pulse_duration``)
every step rotates the magnetisation about the effective field (RF amplitude along the RF phase
axis, off-resonance along z) and relaxes it (symmetric splitting: half relaxation, rotation, half
relaxation); outside the pulse every step is free precession plus exact relaxation and recovery.
The RF phase of pulse ``n`` is ``n (pi + increment)`` and the receiver follows it. The simulation
works in the frame that rotates with the RF phase (exact: relaxation and precession commute with
rotations about z), so the same affine map applies each repetition; it is iterated pulse by pulse
until the echo no longer changes (the steady state).

Conventions match ``core.signal``: a positive off-resonance advances the transverse phase, the
excitation turns +z towards +y and the signal is rotated by -i (excitation axis), so an
on-resonance signal is real and positive.
"""

import numpy as np


def _rotation(axis, angle):
    """Right-handed rotation matrices (n, 3, 3) about unit ``axis`` (n, 3) by ``angle`` (n,)."""
    x, y, z = axis[:, 0], axis[:, 1], axis[:, 2]
    c, s = np.cos(angle), np.sin(angle)
    t = 1.0 - c
    return np.stack(
        [
            np.stack([c + x * x * t, x * y * t - z * s, x * z * t + y * s], -1),
            np.stack([y * x * t + z * s, c + y * y * t, y * z * t - x * s], -1),
            np.stack([z * x * t - y * s, z * y * t + x * s, c + z * z * t], -1),
        ],
        axis=-2,
    )


def _affine(linear, offset):
    """Homogeneous 4x4 maps (n, 4, 4) of ``M -> linear M + offset``."""
    n = linear.shape[0]
    out = np.zeros((n, 4, 4))
    out[:, :3, :3] = linear
    out[:, :3, 3] = offset
    out[:, 3, 3] = 1.0
    return out


def _relaxation(duration, r1, r2, m0, n):
    e1, e2 = np.exp(-duration * r1), np.exp(-duration * r2)
    linear = np.broadcast_to(np.diag([e2, e2, e1]), (n, 3, 3))
    return _affine(linear, np.broadcast_to([0.0, 0.0, m0 * (1.0 - e1)], (n, 3)))


def _free_precession(duration, omega, r1, r2, m0, n_steps):
    n = omega.size
    step = duration / n_steps
    z_axis = np.broadcast_to([0.0, 0.0, 1.0], (n, 3))
    one_step = _relaxation(step, r1, r2, m0, n) @ _affine(_rotation(z_axis, omega * step), 0.0)
    total = np.broadcast_to(np.eye(4), (n, 4, 4)).copy()
    for _ in range(n_steps):
        total = one_step @ total
    return total


def _rf_pulse(alpha, duration, omega, r1, r2, m0, n_steps):
    n = omega.size
    if duration == 0.0:
        # Hard pulse: the excitation turns +z towards +y, a left-handed turn about +x.
        x_axis = np.broadcast_to([1.0, 0.0, 0.0], (n, 3))
        return _affine(_rotation(x_axis, np.full(n, -alpha)), 0.0)
    step = duration / n_steps
    omega_rf = alpha / duration
    field = np.stack([np.full(n, -omega_rf), np.zeros(n), omega], axis=-1)
    strength = np.linalg.norm(field, axis=-1)
    rotation = _affine(_rotation(field / strength[:, None], strength * step), 0.0)
    half = _relaxation(step / 2, r1, r2, m0, n)
    one_step = half @ rotation @ half
    total = np.broadcast_to(np.eye(4), (n, 4, 4)).copy()
    for _ in range(n_steps):
        total = one_step @ total
    return total


def simulate_bssfp(
    m0,
    r1,
    r2,
    alpha,
    tr,
    frequencies,
    increment,
    *,
    pulse_duration=0.0,
    rf_steps=32,
    free_steps=8,
    max_pulses=20000,
    tolerance=1e-12,
):
    """Steady-state complex echo (TE = TR/2 from the pulse centre) of isochromats.

    Parameters
    ----------
    m0, r1, r2 : float
        Tissue parameters (1/s).
    alpha : float
        Actual flip angle (rad).
    tr : float
        Repetition time (s).
    frequencies : array_like
        Off-resonance of each isochromat (Hz).
    increment : float
        RF phase-cycling increment (rad).
    pulse_duration : float, optional
        Rectangular pulse duration (s); 0 is an instantaneous pulse.

    Returns
    -------
    ndarray of complex, shape of ``frequencies``
    """
    frequencies = np.asarray(frequencies, dtype=float)
    omega = 2 * np.pi * frequencies.reshape(-1)
    n = omega.size
    half_gap = tr / 2 - pulse_duration / 2
    pulse = _rf_pulse(alpha, pulse_duration, omega, r1, r2, m0, rf_steps)
    to_echo = _free_precession(half_gap, omega, r1, r2, m0, free_steps)
    from_echo = _free_precession(half_gap, omega, r1, r2, m0, free_steps)
    # Next pulse's RF phase is (pi + increment) further: rotate the frame back by that much.
    z_axis = np.broadcast_to([0.0, 0.0, 1.0], (n, 3))
    frame = _affine(_rotation(z_axis, np.full(n, -(np.pi + increment))), 0.0)
    excite_to_echo = to_echo @ pulse
    echo_to_excite = frame @ from_echo
    state = np.zeros((n, 4))
    state[:, 2] = m0
    state[:, 3] = 1.0
    previous = None
    for count in range(max_pulses):
        echo = np.einsum("nij,nj->ni", excite_to_echo, state)
        signal = -1j * (echo[:, 0] + 1j * echo[:, 1])
        if previous is not None and count % 100 == 0:
            if np.max(np.abs(signal - previous)) < tolerance * m0:
                break
        previous = signal
        state = np.einsum("nij,nj->ni", echo_to_excite, echo)
    else:
        raise RuntimeError("the Bloch simulation did not reach a steady state")
    return signal.reshape(frequencies.shape)
