r"""RF-spoiled gradient-echo signals of the phantom by extended phase graphs (EPG).

The phantom's scanner does not spoil ideally: it plays the quadratic RF phase schedule of the vendor
(phase of pulse :math:`n` = :math:`\Phi\,n(n+1)/2`), one spoiler gradient per repetition and lets the
spins diffuse. This module simulates that pulse by pulse, as a scanner would, until the
receiver-demodulated signal stops changing, for spoiled gradient echo (SPGR/FLASH) and for actual
flip-angle imaging (AFI, two interleaved TRs).

It is deliberately independent of :mod:`qmri_workflows.core.relaxometry.spoiling` (which solves the
steady state directly in a rotating frame): the two are checked against each other and against a
brute-force isochromat simulation in the tests, so a slip in one does not hide in the other.

Conventions: angles in degrees (as the phantom's protocol and BIDS sidecars), times in seconds,
spoiler dephasing in cycles per mm accumulated over one TR (``gradient_moment``; convert a BIDS
``SpoilingGradientMoment`` in mT s / m with :func:`dephasing_from_gradient_moment`), diffusion
coefficient in mm^2/s. Signals are for M0 = 1 at TE = 0 (the caller multiplies by M0 and by the
T2* decay of its echo).

EPG model (Weigel 2015): states :math:`F^+_k, F^-_k, Z_k`, one unit of :math:`k` per TR of
spoiling. Each TR: RF rotation with the pulse's phase, readout of :math:`F^+_0` demodulated by the
pulse's phase, relaxation over TR with recovery, diffusion damping of a constant gradient spread over
the TR (:math:`b = TR\,\Delta k^2 ((k \pm 1/2)^2 + 1/12)` for transverse, :math:`TR\,\Delta k^2 k^2`
for longitudinal states), then the shift. The magnetisation starts at the ideal-spoiling steady state
(dummy scans), which only shortens the transient.

Whole images: :func:`spgr_ratio_table` and :func:`afi_ratio_table` run the EPG once per protocol on
a (T1, T2, B1+) grid and return a :class:`RatioTable` of the EPG to ideal-spoiling signal ratio that
the simulator interpolates per voxel.

References
----------
.. [1] Weigel M. Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple. J Magn
   Reson Imaging 2015;41:266-295. doi:10.1002/jmri.24619
.. [2] Zur Y, Wood ML, Neuringer LJ. Spoiling of transverse magnetization in steady-state sequences.
   Magn Reson Med 1991;21:251-263.
.. [3] Yarnykh VL. Optimal radiofrequency and gradient spoiling for improved accuracy of T1 and B1
   measurements using fast steady-state techniques. Magn Reson Med 2010;63:1610-1626.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from qmri_workflows.core.signal import afi_signals

__all__ = [
    "GYROMAGNETIC_RATIO_HZ_PER_T",
    "RatioTable",
    "afi_ratio_table",
    "afi_steady_state",
    "dephasing_from_gradient_moment",
    "spgr_ratio_table",
    "spgr_steady_state",
    "spgr_steady_state_table",
]

GYROMAGNETIC_RATIO_HZ_PER_T = 42.577478e6
_CHUNK_COLUMNS = 4096


def dephasing_from_gradient_moment(moment_mt_s_per_m):
    """Spoiler dephasing (cycles/mm) of a gradient moment given in mT s / m (BIDS unit)."""
    return GYROMAGNETIC_RATIO_HZ_PER_T * 1e-3 * float(moment_mt_s_per_m) * 1e-3


def _n_states(t2, tr, intervals_shift, gradient_moment, diffusion, tolerance=1e-7):
    """Number of k states beyond which transverse coherences have decayed below ``tolerance``."""
    longest_t2 = float(np.max(t2))
    per_tr = tr / longest_t2
    n_tr = math.log(1.0 / tolerance) / max(per_tr, 1e-6)
    if diffusion > 0 and gradient_moment > 0:
        dk = 2.0 * math.pi * gradient_moment
        # b grows as k^2: the k at which the diffusion damping alone reaches the tolerance
        n_tr = min(n_tr, (3.0 * math.log(1.0 / tolerance) / (diffusion * tr * dk * dk)) ** (1.0 / 3.0) * 2.0)
    return int(min(max(8, math.ceil(n_tr * max(intervals_shift))) + 2, 400))


class _Graph:
    """EPG state of a batch of columns: arrays (n_columns, n_states)."""

    def __init__(self, n_columns, n_states, z0):
        self.fp = np.zeros((n_columns, n_states), dtype=complex)
        self.fm = np.zeros((n_columns, n_states), dtype=complex)
        self.z = np.zeros((n_columns, n_states), dtype=complex)
        self.z[:, 0] = z0

    def pulse(self, alpha, phase):
        """Rotate by ``alpha`` (rad, per column) about the axis at ``phase`` (rad, scalar)."""
        cos_half2 = (np.cos(alpha / 2.0) ** 2)[:, None]
        sin_half2 = (np.sin(alpha / 2.0) ** 2)[:, None]
        sin_a = np.sin(alpha)[:, None]
        cos_a = np.cos(alpha)[:, None]
        e1 = np.exp(1j * phase)
        e2 = e1 * e1
        fp, fm, z = self.fp, self.fm, self.z
        new_fp = cos_half2 * fp + e2 * sin_half2 * fm - 1j * e1 * sin_a * z
        new_fm = np.conj(e2) * sin_half2 * fp + cos_half2 * fm + 1j * np.conj(e1) * sin_a * z
        new_z = -0.5j * np.conj(e1) * sin_a * fp + 0.5j * e1 * sin_a * fm + cos_a * z
        self.fp, self.fm, self.z = new_fp, new_fm, new_z

    def relax_diffuse_shift(self, e1, e2, damping_fp, damping_fm, damping_z, shift):
        """Relax (per-column E1, E2), damp by diffusion, recover, then dephase by ``shift`` states."""
        self.fp *= e2[:, None] * damping_fp
        self.fm *= e2[:, None] * damping_fm
        self.z *= e1[:, None] * damping_z
        self.z[:, 0] += 1.0 - e1
        for _ in range(shift):
            self.fp = np.roll(self.fp, 1, axis=1)
            self.fm = np.roll(self.fm, -1, axis=1)
            self.fm[:, -1] = 0.0
            self.fp[:, 0] = np.conj(self.fm[:, 0])


def _damping(n_states, tau, shift, gradient_moment, diffusion):
    """Diffusion attenuation of F+, F- and Z states over an interval dephasing by ``shift`` units."""
    k = np.arange(n_states, dtype=float)
    if diffusion <= 0 or gradient_moment <= 0:
        ones = np.ones(n_states)
        return ones, ones, ones
    dk = 2.0 * math.pi * gradient_moment  # rad/mm per unit of k
    scale = diffusion * tau * dk * dk
    fp = np.exp(-scale * ((k + shift / 2.0) ** 2 + shift**2 / 12.0))
    fm = np.exp(-scale * ((k - shift / 2.0) ** 2 + shift**2 / 12.0))
    z = np.exp(-scale * k**2)
    return fp, fm, z


def _simulate(alpha, r1, r2, intervals, phase_increment, gradient_moment, diffusion, z_start, tolerance, max_pulses):
    """Pulse-by-pulse EPG of a periodic pulse train; returns the demodulated signal after each pulse
    of the last period, shape (n_columns, len(intervals)).

    ``intervals`` is a sequence of (tau, shift): time (s) after each pulse and its dephasing in units
    of the smallest spoiler (``gradient_moment`` cycles/mm per unit).
    """
    n_columns = alpha.size
    period = len(intervals)
    shifts = [shift for _, shift in intervals]
    n_states = _n_states(1.0 / r2, min(tau for tau, _ in intervals), shifts, gradient_moment, diffusion)
    graph = _Graph(n_columns, n_states, z_start)
    steps = []
    for tau, shift in intervals:
        damp = _damping(n_states, tau, shift, gradient_moment, diffusion)
        steps.append((np.exp(-tau * r1), np.exp(-tau * r2), damp, shift))
    previous = None
    window_sum = np.zeros((n_columns, period))
    pulse_index = 0
    window = 25 * period
    while pulse_index < max_pulses:
        for interval, (e1, e2, (d_fp, d_fm, d_z), shift) in enumerate(steps):
            phase = math.remainder(phase_increment * pulse_index * (pulse_index + 1) / 2.0, 2.0 * math.pi)
            graph.pulse(alpha, phase)
            # the receiver follows the RF phase, which leaves the magnitude unchanged
            window_sum[:, interval] += np.abs(graph.fp[:, 0])
            graph.relax_diffuse_shift(e1, e2, d_fp, d_fm, d_z, shift)
            pulse_index += 1
        if pulse_index % window == 0:
            # mean over the window: with two intervals (AFI) quadratic spoiling is not exactly
            # stationary and the signal keeps fluctuating (~1e-4 relative)
            signals = window_sum / (window // period)
            window_sum[:] = 0.0
            if previous is not None and np.max(np.abs(signals - previous)) < tolerance:
                break
            previous = signals
    else:
        signals = previous if previous is not None else window_sum
    return signals


def _broadcast_columns(*arrays):
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in arrays])
    return arrays[0].shape, [a.ravel() for a in arrays]


def _check_inputs(t1, t2, tr):
    if np.any(~(np.asarray(t1) > 0)) or np.any(~(np.asarray(t2) > 0)):
        raise ValueError("t1 and t2 must be positive times in seconds")
    if not tr > 0:
        raise ValueError(f"tr must be a positive time in seconds, got {tr!r}")


def spgr_steady_state(
    t1,
    t2,
    flip_deg,
    tr,
    *,
    phase_increment_deg=50.0,
    gradient_moment=1.0,
    diffusion=0.8e-3,
    b1=1.0,
    tolerance=1e-7,
    max_pulses=20000,
):
    """Steady-state RF-spoiled SPGR signal (M0 = 1, TE = 0) by a pulse-by-pulse EPG.

    Parameters
    ----------
    t1, t2 : array_like
        Relaxation times (s); broadcast with ``flip_deg`` and ``b1``.
    flip_deg : array_like
        Nominal flip angle (deg).
    tr : float
        Repetition time (s).
    phase_increment_deg : float, optional
        Quadratic RF-spoiling increment (deg); pulse n has phase increment * n (n + 1) / 2.
        Siemens 50, GE 117, Philips 150.
    gradient_moment : float, optional
        Spoiler dephasing per TR (cycles/mm); 0 means no gradient spoiling (and no diffusion
        damping). Only its product with the diffusion matters once the EPG is truncated.
    diffusion : float, optional
        Apparent diffusion coefficient (mm^2/s); 0 turns diffusion damping off.
    b1 : array_like, optional
        Transmit field ratio; the actual flip angle is ``b1 * flip_deg``.
    tolerance : float, optional
        Convergence (absolute, M0 = 1) of the signal's mean over successive windows of 25 pulses.
    max_pulses : int, optional
        Upper bound on the simulated pulses.

    Returns
    -------
    numpy.ndarray
        Signal magnitude, broadcast shape of the inputs.

    Notes
    -----
    Cost grows with the number of voxels times the pulses to steady state; for whole images use
    :func:`spgr_steady_state_table`.
    """
    _check_inputs(t1, t2, tr)
    shape, (t1, t2, flip, b1) = _broadcast_columns(t1, t2, flip_deg, b1)
    alpha = np.deg2rad(flip * b1)
    r1, r2 = 1.0 / t1, 1.0 / t2
    e1 = np.exp(-tr * r1)
    z_start = (1.0 - e1) / (1.0 - e1 * np.cos(alpha))  # ideal-spoiling steady state: dummy scans
    out = np.empty(t1.size)
    for start in range(0, t1.size, _CHUNK_COLUMNS):
        part = slice(start, start + _CHUNK_COLUMNS)
        out[part] = _simulate(
            alpha[part],
            r1[part],
            r2[part],
            [(tr, 1)],
            math.radians(phase_increment_deg),
            gradient_moment,
            diffusion,
            z_start[part],
            tolerance,
            max_pulses,
        )[:, 0]
    return out.reshape(shape)


def afi_steady_state(
    t1,
    t2,
    flip_deg,
    tr1,
    tr2,
    *,
    phase_increment_deg=50.0,
    gradient_moment=1.0,
    gradient_ratio=None,
    diffusion=0.8e-3,
    b1=1.0,
    tolerance=1e-6,
    max_pulses=4000,
):
    """Steady-state AFI signals (M0 = 1, TE = 0) by a pulse-by-pulse EPG.

    Parameters
    ----------
    t1, t2, flip_deg, b1, phase_increment_deg, diffusion, tolerance, max_pulses
        As in :func:`spgr_steady_state`; the phase schedule runs over all pulses of both intervals.
        With two intervals the quadratic schedule has no exactly stationary state: the signals
        fluctuate by ~1e-4 (relative) and the mean over 25 periods is returned.
    tr1, tr2 : float
        The interleaved repetition times (s), TR1 < TR2.
    gradient_moment : float, optional
        Spoiler dephasing (cycles/mm) in the TR1 interval.
    gradient_ratio : int, optional
        Spoiler area of TR2 over that of TR1 (an integer); default ``round(tr2 / tr1)``, the
        proportional spoiling Yarnykh 2010 recommends.

    Returns
    -------
    s1, s2 : numpy.ndarray
        Signals after the pulse that starts the TR1 and the TR2 interval.
    """
    _check_inputs(t1, t2, tr1)
    if not tr2 > tr1:
        raise ValueError(f"AFI needs tr2 > tr1, got tr1={tr1!r}, tr2={tr2!r}")
    ratio = int(round(tr2 / tr1)) if gradient_ratio is None else int(gradient_ratio)
    if ratio < 1:
        raise ValueError(f"gradient_ratio must be a positive integer, got {gradient_ratio!r}")
    shape, (t1, t2, flip, b1) = _broadcast_columns(t1, t2, flip_deg, b1)
    alpha = np.deg2rad(flip * b1)
    r1, r2 = 1.0 / t1, 1.0 / t2
    e1, e2 = np.exp(-tr1 * r1), np.exp(-tr2 * r1)
    cos_a = np.cos(alpha)
    # ideal-spoiling longitudinal magnetisation before the TR1 pulse (Yarnykh 2007)
    z_start = (1.0 - e2 + (1.0 - e1) * e2 * cos_a) / (1.0 - e1 * e2 * cos_a**2)
    out = np.empty((t1.size, 2))
    for start in range(0, t1.size, _CHUNK_COLUMNS):
        part = slice(start, start + _CHUNK_COLUMNS)
        out[part] = _simulate(
            alpha[part],
            r1[part],
            r2[part],
            [(tr1, 1), (tr2, ratio)],
            math.radians(phase_increment_deg),
            gradient_moment,
            diffusion,
            z_start[part],
            tolerance,
            max_pulses,
        )
    return out[:, 0].reshape(shape), out[:, 1].reshape(shape)


def _ernst(t1, alpha, tr):
    e1 = np.exp(-tr / t1)
    return np.sin(alpha) * (1.0 - e1) / (1.0 - e1 * np.cos(alpha))


#: Default table ranges (s, s, ratio) and points along (T1, T2, B1) of the EPG tables.
TABLE_T1_RANGE = (0.2, 6.0)
TABLE_T2_RANGE = (0.01, 3.0)
TABLE_B1_RANGE = (0.4, 1.6)
TABLE_GRID_SIZE = (14, 16, 13)
#: Refinement of the cubic-spline resampled table that voxels are interpolated from (trilinearly).
TABLE_UPSAMPLING = 6
_TABLE_CHUNK = 1_000_000


class RatioTable:
    """Ratios of EPG to ideal-spoiling signals on a (log T1, log T2, B1) grid, for many voxels.

    The EPG is run on a coarse grid (a few thousand columns); the ratio, smooth and close to 1, is
    resampled by cubic splines onto a grid ``upsampling`` times finer, from which each voxel is
    interpolated trilinearly (about 0.1 us per voxel and signal, 20 times faster than evaluating the
    cubic spline per voxel). Parameters outside the ranges are clamped to the grid's edge.

    Parameters
    ----------
    log_t1, log_t2, b1 : numpy.ndarray
        Evenly spaced axes of ``values`` (log s, log s, ratio).
    values : numpy.ndarray, shape (len(log_t1), len(log_t2), len(b1), n_signals)
        Ratio of each signal (one for SPGR, two for AFI) to its ideal-spoiling value.
    """

    def __init__(self, log_t1, log_t2, b1, values):
        self.axes = tuple(np.asarray(axis, dtype=float) for axis in (log_t1, log_t2, b1))
        self.values = np.asarray(values, dtype=float)
        if self.values.shape[:3] != tuple(axis.size for axis in self.axes) or self.values.ndim != 4:
            raise ValueError("values must have the shape (n_t1, n_t2, n_b1, n_signals) of the axes")

    @classmethod
    def from_coarse(cls, log_t1, log_t2, b1, ratios, upsampling=TABLE_UPSAMPLING):
        """Resample coarse ratios (n_t1, n_t2, n_b1, n_signals) by cubic splines onto a finer grid."""
        coarse_axes = [np.asarray(axis, dtype=float) for axis in (log_t1, log_t2, b1)]
        fine_axes = [np.linspace(axis[0], axis[-1], (axis.size - 1) * upsampling + 1) for axis in coarse_axes]
        points = np.stack(np.meshgrid(*fine_axes, indexing="ij"), axis=-1)
        values = np.stack(
            [
                RegularGridInterpolator(coarse_axes, ratios[..., index], method="cubic")(points)
                for index in range(ratios.shape[-1])
            ],
            axis=-1,
        )
        return cls(*fine_axes, values)

    @property
    def n_signals(self):
        """Number of signals tabulated (1 for SPGR, 2 for AFI)."""
        return self.values.shape[-1]

    def __call__(self, t1, t2, b1):
        """Ratios at the given voxels, shape ``broadcast(t1, t2, b1).shape + (n_signals,)``."""
        t1, t2, b1 = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in (t1, t2, b1)])
        flat = [a.reshape(-1) for a in (t1, t2, b1)]
        out = np.empty((flat[0].size, self.n_signals))
        for start in range(0, out.shape[0], _TABLE_CHUNK):
            part = slice(start, start + _TABLE_CHUNK)
            coordinates = np.empty((3, flat[0][part].size))
            for row, (values, axis, log) in enumerate(zip(flat, self.axes, (True, True, False))):
                values = np.log(values[part]) if log else values[part]
                step = (axis[-1] - axis[0]) / (axis.size - 1)
                np.clip((values - axis[0]) / step, 0.0, axis.size - 1.0, out=coordinates[row])
            for index in range(self.n_signals):
                out[part, index] = ndimage.map_coordinates(
                    self.values[..., index], coordinates, order=1, mode="nearest", prefilter=False
                )
        return out.reshape(t1.shape + (self.n_signals,))


def _grid_axes(t1_range, t2_range, b1_range, grid_size):
    return (
        np.linspace(np.log(t1_range[0]), np.log(t1_range[1]), grid_size[0]),
        np.linspace(np.log(t2_range[0]), np.log(t2_range[1]), grid_size[1]),
        np.linspace(b1_range[0], b1_range[1], grid_size[2]),
    )


@functools.lru_cache(maxsize=32)
def spgr_ratio_table(
    flip_deg,
    tr,
    *,
    phase_increment_deg=50.0,
    gradient_moment=1.0,
    diffusion=0.8e-3,
    t1_range=TABLE_T1_RANGE,
    t2_range=TABLE_T2_RANGE,
    b1_range=TABLE_B1_RANGE,
    grid_size=TABLE_GRID_SIZE,
):
    """EPG / Ernst signal ratio of an RF-spoiled SPGR protocol, tabulated (cached per protocol).

    Parameters
    ----------
    flip_deg, tr, phase_increment_deg, gradient_moment, diffusion
        As in :func:`spgr_steady_state` (scalars).
    t1_range, t2_range, b1_range : tuple of float
        Table ranges (s, s, ratio); T1 and T2 are log-spaced.
    grid_size : tuple of int
        EPG columns along T1, T2 and B1.

    Returns
    -------
    RatioTable
        One signal: the ratio of the TE = 0 EPG signal to the Ernst signal at the actual flip angle.
    """
    _check_inputs(t1_range[0], t2_range[0], tr)
    axes = _grid_axes(t1_range, t2_range, b1_range, grid_size)
    t1, t2, b1 = np.meshgrid(np.exp(axes[0]), np.exp(axes[1]), axes[2], indexing="ij")
    signal = spgr_steady_state(
        t1,
        t2,
        flip_deg,
        tr,
        phase_increment_deg=phase_increment_deg,
        gradient_moment=gradient_moment,
        diffusion=diffusion,
        b1=b1,
    )
    ratio = signal / _ernst(t1, np.deg2rad(flip_deg * b1), tr)
    return RatioTable.from_coarse(*axes, ratio[..., None])


@functools.lru_cache(maxsize=16)
def afi_ratio_table(
    flip_deg,
    tr1,
    tr2,
    *,
    phase_increment_deg=50.0,
    gradient_moment=1.0,
    gradient_ratio=None,
    diffusion=0.8e-3,
    t1_range=TABLE_T1_RANGE,
    t2_range=TABLE_T2_RANGE,
    b1_range=TABLE_B1_RANGE,
    grid_size=TABLE_GRID_SIZE,
):
    """EPG / ideal AFI signal ratios (TR1 and TR2 signals), tabulated (cached per protocol).

    Parameters
    ----------
    flip_deg, tr1, tr2, phase_increment_deg, gradient_moment, gradient_ratio, diffusion
        As in :func:`afi_steady_state` (scalars).
    t1_range, t2_range, b1_range, grid_size
        As in :func:`spgr_ratio_table`.

    Returns
    -------
    RatioTable
        Two signals: the ratios of the TR1 and TR2 signals to the ideal-spoiling ones (Yarnykh 2007).
    """
    _check_inputs(t1_range[0], t2_range[0], tr1)
    axes = _grid_axes(t1_range, t2_range, b1_range, grid_size)
    t1, t2, b1 = np.meshgrid(np.exp(axes[0]), np.exp(axes[1]), axes[2], indexing="ij")
    s1, s2 = afi_steady_state(
        t1,
        t2,
        flip_deg,
        tr1,
        tr2,
        phase_increment_deg=phase_increment_deg,
        gradient_moment=gradient_moment,
        gradient_ratio=gradient_ratio,
        diffusion=diffusion,
        b1=b1,
    )
    ideal_1, ideal_2 = afi_signals(1.0, 1.0 / t1, 0.0, np.deg2rad(flip_deg), tr1, tr2, 0.0, b1=b1)
    return RatioTable.from_coarse(*axes, np.stack([s1 / ideal_1, s2 / ideal_2], axis=-1))


def spgr_steady_state_table(
    t1,
    t2,
    flip_deg,
    tr,
    *,
    phase_increment_deg=50.0,
    gradient_moment=1.0,
    diffusion=0.8e-3,
    b1=1.0,
    t1_range=TABLE_T1_RANGE,
    t2_range=TABLE_T2_RANGE,
    b1_range=TABLE_B1_RANGE,
    grid_size=TABLE_GRID_SIZE,
):
    """Fast RF-spoiled SPGR signal of many voxels: the EPG tabulated over (T1, T2, B1) and interpolated.

    The ratio of the EPG signal to the Ernst signal (smooth, close to 1) comes from
    :func:`spgr_ratio_table` (built once per protocol and grid, cached) and is multiplied by the exact
    Ernst signal of each voxel. Parameters outside the grid ranges take the ratio at the grid's edge
    (keep the ranges wide).

    Parameters
    ----------
    t1, t2, flip_deg, tr, phase_increment_deg, gradient_moment, diffusion, b1
        As in :func:`spgr_steady_state`; ``flip_deg`` and ``tr`` are scalars here.
    t1_range, t2_range, b1_range : tuple of float
        Table ranges (s, s, ratio).
    grid_size : tuple of int
        Points along T1 (log-spaced), T2 (log-spaced) and B1.

    Returns
    -------
    numpy.ndarray
        Signal magnitude (M0 = 1, TE = 0), broadcast shape of ``t1``, ``t2`` and ``b1``.
    """
    _check_inputs(t1, t2, tr)
    table = spgr_ratio_table(
        float(flip_deg),
        float(tr),
        phase_increment_deg=float(phase_increment_deg),
        gradient_moment=float(gradient_moment),
        diffusion=float(diffusion),
        t1_range=tuple(float(v) for v in t1_range),
        t2_range=tuple(float(v) for v in t2_range),
        b1_range=tuple(float(v) for v in b1_range),
        grid_size=tuple(int(v) for v in grid_size),
    )
    t1, t2, b1 = np.broadcast_arrays(*[np.asarray(a, dtype=float) for a in (t1, t2, b1)])
    return table(t1, t2, b1)[..., 0] * _ernst(t1, np.deg2rad(flip_deg * b1), tr)
