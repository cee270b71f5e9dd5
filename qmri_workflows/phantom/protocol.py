"""Acquisition protocol of the digital phantom: what the simulated scanner runs.

Each sequence is a frozen dataclass with realistic 3 T defaults; :class:`Protocol` groups them.
Times are in seconds and angles in degrees (as in BIDS sidecars); the simulator converts the angles to
radians before calling :mod:`qmri_workflows.core.signal`. A sequence set to ``None`` in
:class:`Protocol` is not simulated (for small examples).

Defaults
--------
* Multi-echo spoiled gradient echo at two flip angles (variable flip angle, VFA; the hMRI/MPM style
  "PDw + T1w" pair): flip 6 and 21 degrees, TR 25 ms, 8 echoes from 2.3 to 18.4 ms in steps of
  2.3 ms, RF spoiling increment 50 degrees (Siemens) and a spoiler of 0.09 mT s/m (30 mT/m for
  3 ms) per TR, magnitude and phase.
* Phase-cycled balanced SSFP: flip 15 and 50 degrees, TR 5 ms, TE = TR/2, RF phase-cycling
  increments 0, 90, 180 and 270 degrees, rectangular (non-selective) RF pulses of 1 ms, magnitude
  and phase.
* Actual flip-angle imaging (AFI, Yarnykh 2007): flip 60 degrees, TR1 20 ms, TR2 100 ms (n = 5),
  TE 2.5 ms, spoiled as Yarnykh 2010 recommends for AFI: RF increment 39 degrees and strong spoilers
  proportional to the TRs (0.45 mT s/m after the first pulse, 5 times that after the second).
* Receive-field pair (RB1COR, Papp 2016): a low-resolution PD-weighted spoiled gradient echo (flip 6
  degrees, TR 25 ms, TE 2.3 ms) acquired once with the head coil and once with the body coil, at
  4 mm isotropic (4 x the voxel of a 1 mm protocol, never finer than the main images), spoiled as
  the VFA images.

Multi-parameter mapping (``Protocol.mpm``, off by default): the VFA pair is written as the mt-off
contrasts of an hMRI-style ``MPM`` collection (``acq-PDw_flip-1_mt-off`` at the first VFA flip angle,
``acq-T1w_flip-2_mt-off`` at the second) and an MT-weighted contrast is added
(``acq-MTw_flip-1_mt-on``: flip 6 degrees, TR 25 ms, the first 6 echoes of the VFA). See
:class:`MPMProtocol` for how the MT pulse is simulated.

Spoiling: ``Protocol.spoiling`` chooses how the simulator treats the spoiled sequences: ``"epg"``
(default) runs the quadratic RF phase schedule, spoiler and diffusion through the extended phase
graphs of :mod:`qmri_workflows.phantom.epg`, as a scanner spoils; ``"ideal"`` uses the ideal-spoiling
equations (Ernst, Yarnykh 2007).

References
----------
.. [1] Yarnykh VL. Optimal radiofrequency and gradient spoiling for improved accuracy of T1 and B1
   measurements using fast steady-state techniques. Magn Reson Med 2010;63:1610-1626.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = [
    "SPOILING_MODELS",
    "AFIProtocol",
    "DAMProtocol",
    "BSSFPProtocol",
    "MPMProtocol",
    "Protocol",
    "RB1CORProtocol",
    "TFLProtocol",
    "VFAProtocol",
]


#: How the simulator spoils: extended phase graphs of the actual protocol, or ideal spoiling.
SPOILING_MODELS = ("epg", "ideal")


def _check_spoiler(name, moment, duration):
    if not (math.isfinite(moment) and moment >= 0) or not (math.isfinite(duration) and duration > 0):
        raise ValueError(
            f"{name} spoiling_gradient_moment must be >= 0 mT s/m and spoiling_gradient_duration > 0 s, got "
            f"{moment!r} and {duration!r}"
        )


def _check_times(name, values):
    if len(values) == 0 or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, finite times in seconds, got {values!r}")


def _check_angles(name, values, *, minimum_count):
    if len(values) < minimum_count:
        raise ValueError(f"{name} needs at least {minimum_count} values, got {len(values)}: {values!r}")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite angles in degrees, got {values!r}")


@dataclass(frozen=True)
class VFAProtocol:
    """Multi-echo spoiled gradient echo at several flip angles (BIDS ``VFA``, ``PulseSequenceType`` SPGR).

    Parameters
    ----------
    flip_angles : tuple of float
        Nominal flip angles (deg), at least two; file index ``flip-<i>`` follows this order.
    repetition_time : float
        TR (s).
    echo_times : tuple of float
        Echo times (s), increasing.
    spoiling_rf_phase_increment : float
        Quadratic RF-spoiling phase increment (deg): pulse n has the phase increment * n (n + 1) / 2.
    spoiling_gradient_moment : float
        Zeroth moment of the spoiler per TR (mT s / m, the BIDS unit).
    spoiling_gradient_duration : float
        Duration of the spoiler (s); recorded in the sidecars only (the EPG needs the moment).
    """

    flip_angles: tuple = (6.0, 21.0)
    repetition_time: float = 0.025
    echo_times: tuple = tuple(round(0.0023 * (i + 1), 6) for i in range(8))
    spoiling_rf_phase_increment: float = 50.0
    spoiling_gradient_moment: float = 0.09
    spoiling_gradient_duration: float = 0.003

    def __post_init__(self):
        _check_spoiler("VFA", self.spoiling_gradient_moment, self.spoiling_gradient_duration)
        _check_angles("VFA flip_angles", self.flip_angles, minimum_count=2)
        _check_times("VFA repetition_time", [self.repetition_time])
        _check_times("VFA echo_times", self.echo_times)
        if any(b <= a for a, b in zip(self.echo_times, self.echo_times[1:])):
            raise ValueError(f"VFA echo_times must increase, got {self.echo_times!r}")
        if max(self.echo_times) >= self.repetition_time:
            raise ValueError(
                f"VFA echo_times must be shorter than the TR {self.repetition_time} s, got {self.echo_times!r}"
            )


@dataclass(frozen=True)
class BSSFPProtocol:
    """Phase-cycled balanced SSFP at several flip angles (project convention ``acq-bssfp<deg>``).

    Parameters
    ----------
    flip_angles : tuple of float
        Nominal flip angles (deg), at least two (DESPOT2-style R2 needs two).
    repetition_time : float
        TR (s); the echo is at TE = TR/2.
    phase_increments : tuple of float
        RF phase-cycling increments (deg), at least four (geometric solution), each in [0, 360).
        Increment 0 is conventional bSSFP (RF phase alternating by 180 degrees, pass band centred on
        resonance); see :func:`qmri_workflows.core.signal.bssfp_signal`.
    pulse_duration : float
        Duration (s) of the rectangular RF pulse, in [0, TR); 0 is an instantaneous pulse. Real 3 T
        bSSFP at TR 5 ms uses 0.5-1 ms pulses; 1 ms shifts R2 by about -8 % when a fit ignores it
        (:mod:`qmri_workflows.phantom.bssfp_steady_state`). Written to the sidecars as
        ``RFPulseDuration`` (s; project convention, BIDS has no key for it).
    """

    flip_angles: tuple = (15.0, 50.0)
    repetition_time: float = 0.005
    phase_increments: tuple = (0.0, 90.0, 180.0, 270.0)
    pulse_duration: float = 0.001

    def __post_init__(self):
        _check_angles("bSSFP flip_angles", self.flip_angles, minimum_count=2)
        _check_times("bSSFP repetition_time", [self.repetition_time])
        if not (math.isfinite(self.pulse_duration) and 0 <= self.pulse_duration < self.repetition_time):
            raise ValueError(
                f"bSSFP pulse_duration must be in [0, repetition_time = {self.repetition_time}) s, got "
                f"{self.pulse_duration!r}"
            )
        _check_angles("bSSFP phase_increments", self.phase_increments, minimum_count=4)
        if any(not 0 <= p < 360 for p in self.phase_increments) or len(set(self.phase_increments)) != len(
            self.phase_increments
        ):
            raise ValueError(f"bSSFP phase_increments must be distinct, in [0, 360) deg, got {self.phase_increments!r}")
        if any(p != round(p) for p in self.phase_increments):
            raise ValueError(
                f"bSSFP phase_increments must be whole degrees (they name the files), got {self.phase_increments!r}"
            )

    @property
    def echo_time(self):
        """Echo time TR/2 (s)."""
        return self.repetition_time / 2.0


@dataclass(frozen=True)
class AFIProtocol:
    """Actual flip-angle imaging B1+ map (BIDS ``TB1AFI``, ``acq-tr1``/``acq-tr2``).

    Parameters
    ----------
    flip_angle : float
        Nominal flip angle (deg) of both pulses.
    repetition_time_1, repetition_time_2 : float
        The interleaved TRs (s), TR2 > TR1.
    echo_time : float
        TE (s).
    spoiling_rf_phase_increment : float
        Quadratic RF-spoiling increment (deg) over the pulse train of both TRs; 39 degrees is the
        optimum of Yarnykh 2010 for n = TR2 / TR1 = 5 with strong spoilers (with the VFA's 50
        degrees and these spoilers the AFI B1+ is 1-2.5 % low, with 39 degrees within 0.8 %).
    spoiling_gradient_moment : float
        Spoiler moment (mT s / m) after the first pulse (TR1 interval); the TR2 interval has
        ``round(TR2 / TR1)`` times that (proportional spoiling, Yarnykh 2010).
    spoiling_gradient_duration : float
        Duration (s) of the TR1 spoiler; recorded in the sidecars only.
    """

    flip_angle: float = 60.0
    repetition_time_1: float = 0.020
    repetition_time_2: float = 0.100
    echo_time: float = 0.0025
    spoiling_rf_phase_increment: float = 39.0
    spoiling_gradient_moment: float = 0.45
    spoiling_gradient_duration: float = 0.005

    def __post_init__(self):
        _check_spoiler("AFI", self.spoiling_gradient_moment, self.spoiling_gradient_duration)
        _check_angles("AFI flip_angle", [self.flip_angle], minimum_count=1)
        _check_times("AFI repetition times", [self.repetition_time_1, self.repetition_time_2, self.echo_time])
        if self.repetition_time_2 <= self.repetition_time_1:
            raise ValueError(
                f"AFI needs repetition_time_2 > repetition_time_1, got {self.repetition_time_2} <= "
                f"{self.repetition_time_1}"
            )


@dataclass(frozen=True)
class RB1CORProtocol:
    """Head-coil / body-coil receive-field pair (BIDS ``RB1COR``, ``acq-headPDw``/``acq-bodyPDw``).

    Parameters
    ----------
    flip_angle : float
        Flip angle (deg) of the PD-weighted spoiled gradient echo.
    repetition_time, echo_time : float
        TR and TE (s).
    voxel_size : float
        Target isotropic voxel size (mm). The grid is the main grid coarsened by the integer factor
        ``max(1, round(voxel_size / resolution))``, so it is never finer than the main images.
    """

    flip_angle: float = 6.0
    repetition_time: float = 0.025
    echo_time: float = 0.0023
    voxel_size: float = 4.0

    def __post_init__(self):
        _check_angles("RB1COR flip_angle", [self.flip_angle], minimum_count=1)
        _check_times("RB1COR times and voxel size", [self.repetition_time, self.echo_time, self.voxel_size])

    def coarsening_factor(self, resolution):
        """Integer factor from the main grid (``resolution`` mm) to the RB1COR grid."""
        return max(1, int(round(self.voxel_size / float(resolution))))


@dataclass(frozen=True)
class DAMProtocol:
    """Double-angle B1+ map (BIDS ``TB1DAM``, ``flip-1``/``flip-2``): two spoiled gradient echoes at
    ``a`` and ``2a`` with a long TR, on the main grid.

    Parameters
    ----------
    flip_angles : tuple of float
        The two nominal flip angles (deg).
    repetition_time : float
        TR (s). 2 s is not long against every T1 (the long-TR reading is about 4 % high in grey
        matter and 25 % in CSF at the nominal field): the App must remove that bias.
    echo_time : float
        TE (s).
    """

    flip_angles: tuple = (60.0, 120.0)
    repetition_time: float = 2.0
    echo_time: float = 0.003

    def __post_init__(self):
        _check_angles("DAM flip_angles", self.flip_angles, minimum_count=2)
        _check_times("DAM times", [self.repetition_time, self.echo_time])
        if len(self.flip_angles) != 2 or not self.flip_angles[0] < self.flip_angles[1] < 180:
            raise ValueError(f"DAM needs two increasing flip angles below 180 deg, got {self.flip_angles!r}")


@dataclass(frozen=True)
class TFLProtocol:
    """Siemens product B1+ map ``tfl_b1map`` (BIDS ``TB1TFL``: ``acq-anat`` and ``acq-famp``), on the
    main grid (Chung et al. 2010).

    Two single-shot TurboFLASH images from full relaxation: a reference, and one after a
    non-selective saturation pulse of ``prep_angle`` whose transverse magnetisation is spoiled.
    Between the pulse and the centre of k-space (centric order) the longitudinal magnetisation
    recovers for ``prep_delay``; both images are read by one readout pulse of
    ``readout_flip_angle`` at the centre of k-space. The scanner's map is
    ``10 x degrees(arccos(Re(saturated / reference)))``, stored as integers.

    Parameters
    ----------
    prep_angle : float
        Nominal preparation angle (deg); hard-coded in VE/XA software (80 deg here).
    readout_flip_angle : float
        Readout FLASH angle (deg).
    prep_delay : float
        From the preparation pulse to the centre of k-space (s).
    echo_time, repetition_time : float
        TE and the time between the shots (s), for the sidecars.
    sidecar_angle : {"readout", "preparation"}
        Which angle the sidecar's ``FlipAngle`` holds: the readout angle, as VE/XA software writes
        (the App then needs ``--tb1tfl-prep-angle``), or the preparation angle, as VB does.
    """

    prep_angle: float = 80.0
    readout_flip_angle: float = 8.0
    prep_delay: float = 0.004
    echo_time: float = 0.0019
    repetition_time: float = 5.0
    sidecar_angle: str = "readout"

    def __post_init__(self):
        _check_angles("TFL angles", [self.prep_angle, self.readout_flip_angle], minimum_count=2)
        _check_times("TFL times", [self.prep_delay, self.echo_time, self.repetition_time])
        if not self.prep_angle < 180:
            raise ValueError(f"TFL prep_angle must be below 180 deg, got {self.prep_angle!r}")
        if self.sidecar_angle not in ("readout", "preparation"):
            raise ValueError(f"TFL sidecar_angle must be 'readout' or 'preparation', got {self.sidecar_angle!r}")

    @property
    def sidecar_flip_angle(self):
        """The sidecar's ``FlipAngle`` (deg)."""
        return self.prep_angle if self.sidecar_angle == "preparation" else self.readout_flip_angle


@dataclass(frozen=True)
class MPMProtocol:
    """MT-weighted contrast of a multi-parameter-mapping protocol (BIDS ``MPM``, ``mt-on``).

    The MT pulse before each excitation removes a fraction ``delta`` of the free water's longitudinal
    magnetisation; the simulator solves the exact steady state of that pulsed sequence,

    .. math:: S = M_0 \\sin\\alpha\\,\\frac{(1 - E_1)(1 - \\delta)}{1 - (1 - \\delta) E_1 \\cos\\alpha},

    times the same EPG imperfect-spoiling ratio as the mt-off image at that flip angle and TR (not
    the small-angle rational approximation the MTsat fit inverts). ``delta`` at the nominal field is
    the tissue's MTsat; it changes with the actual field ``b1`` as the steady-state saturation of
    the macromolecular pool does: a pulse saturating ``1 - exp(-k b1^2)`` of it (its absorbed energy
    scales with ``b1^2``), which recovers by ``1 - exp(-rho)`` between pulses:

    .. math:: \\delta(b_1) = \\delta_{ref}\\,\\frac{s(b_1)}{s(1)}, \\qquad
              s(b) = \\frac{e^{-\\rho}\\,(1 - e^{-k b^2})}{1 - e^{-\\rho - k b^2}}.

    This grows more slowly than ``b1^2``, which is why Helms' nominal-angle MTsat keeps a residual
    B1 dependence that his empirical correction addresses; the correction is not this model.

    Parameters
    ----------
    flip_angle : float
        Nominal flip angle (deg) of the MT-weighted image.
    repetition_time : float
        TR (s).
    n_echoes : int
        Echoes (the first ``n_echoes`` of the VFA echo times).
    pulse_saturation : float
        ``k``: the fraction ``1 - exp(-k)`` of the macromolecular pool one MT pulse saturates at the
        nominal field; 0.18 is ``pi w1^2 G tau`` of a 220 degree, 4 ms Gaussian pulse 2 kHz off
        resonance on a super-Lorentzian line with T2 = 12 us (Morrison & Henkelman 1995).
    bound_recovery_rate : float
        Rate (1/s) at which the macromolecular pool recovers between pulses: its R1 (about 1/s)
        plus its exchange rate with free water (about 28/s in white matter: k_f 4.45/s over a
        pool-size ratio of 0.157, Gloor et al. 2008); ``rho = rate x TR``.

    References
    ----------
    .. [1] Morrison C, Henkelman RM. A model for magnetization transfer in tissues. Magn Reson Med
       1995;33:475-482.
    .. [2] Gloor M, Scheffler K, Bieri O. Quantitative magnetization transfer imaging using balanced
       SSFP. Magn Reson Med 2008;60:691-700.
    """

    flip_angle: float = 6.0
    repetition_time: float = 0.025
    n_echoes: int = 6
    pulse_saturation: float = 0.18
    bound_recovery_rate: float = 29.0

    def __post_init__(self):
        _check_angles("MPM flip_angle", [self.flip_angle], minimum_count=1)
        _check_times("MPM repetition_time", [self.repetition_time])
        if isinstance(self.n_echoes, bool) or not isinstance(self.n_echoes, int) or self.n_echoes < 1:
            raise ValueError(f"MPM n_echoes must be a positive integer, got {self.n_echoes!r}")
        _check_times("MPM pulse_saturation and bound_recovery_rate", [self.pulse_saturation, self.bound_recovery_rate])

    def saturation(self, mtsat_percent, b1):
        """Fraction of Mz the MT pulse removes per TR at transmit ratio ``b1`` (see the class notes)."""
        import numpy as np

        rho = self.bound_recovery_rate * self.repetition_time

        def steady(b):
            k = self.pulse_saturation * np.square(b)
            return np.exp(-rho) * -np.expm1(-k) / -np.expm1(-rho - k)

        return np.asarray(mtsat_percent, dtype=float) / 100.0 * steady(np.asarray(b1, dtype=float)) / steady(1.0)


@dataclass(frozen=True)
class Protocol:
    """The full phantom protocol; set a sequence to ``None`` to leave it out.

    Parameters
    ----------
    vfa : VFAProtocol
        Required: it defines the noise reference (see :mod:`qmri_workflows.phantom.simulate`).
    bssfp : BSSFPProtocol or None
    afi : AFIProtocol or None
    rb1cor : RB1CORProtocol or None
        Spoiled like the VFA images (same increment and spoiler).
    mpm : MPMProtocol or None
        With one, the VFA pair is written as the mt-off contrasts of an ``MPM`` collection and an
        MT-weighted (``mt-on``) contrast is added (needs exactly two VFA flip angles).
    dam : DAMProtocol or None
        A double-angle B1+ pair (spoiled like the VFA images); none by default.
    tfl : TFLProtocol or None
        A Siemens tfl_b1map (``TB1TFL``); none by default.
    spoiling : {"epg", "ideal"}
        Simulation of the spoiled sequences (VFA, AFI, RB1COR): extended phase graphs of the actual
        RF phase schedule, spoiler and diffusion (default), or ideal spoiling.
    """

    vfa: VFAProtocol = field(default_factory=VFAProtocol)
    bssfp: BSSFPProtocol | None = field(default_factory=BSSFPProtocol)
    afi: AFIProtocol | None = field(default_factory=AFIProtocol)
    rb1cor: RB1CORProtocol | None = field(default_factory=RB1CORProtocol)
    spoiling: str = "epg"
    mpm: MPMProtocol | None = None
    dam: DAMProtocol | None = None
    tfl: TFLProtocol | None = None

    def __post_init__(self):
        if not isinstance(self.vfa, VFAProtocol):
            raise ValueError(f"Protocol.vfa must be a VFAProtocol, got {type(self.vfa).__name__}")
        if self.spoiling not in SPOILING_MODELS:
            raise ValueError(f"Protocol.spoiling must be one of {SPOILING_MODELS}, got {self.spoiling!r}")
        if self.mpm is not None:
            if len(self.vfa.flip_angles) != 2 or self.vfa.flip_angles[0] >= self.vfa.flip_angles[1]:
                raise ValueError(
                    "Protocol.mpm writes the VFA pair as PDw and T1w: give two increasing flip angles, got "
                    f"{self.vfa.flip_angles!r}"
                )
            if self.mpm.n_echoes > len(self.vfa.echo_times):
                raise ValueError(
                    f"MPM n_echoes {self.mpm.n_echoes} exceeds the {len(self.vfa.echo_times)} VFA echo times"
                )

    def to_dict(self):
        """Plain-dict description (for the simulation record); absent sequences are ``None``."""
        sequences = (("vfa", self.vfa), ("bssfp", self.bssfp), ("afi", self.afi), ("rb1cor", self.rb1cor))
        described = {
            **{name: (None if value is None else asdict(value)) for name, value in sequences},
            "spoiling": self.spoiling,
        }
        for name in ("mpm", "dam", "tfl"):  # absent from the default record, which stays as it was
            if getattr(self, name) is not None:
                described[name] = asdict(getattr(self, name))
        return described
