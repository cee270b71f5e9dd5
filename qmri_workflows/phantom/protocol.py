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
    "BSSFPProtocol",
    "Protocol",
    "RB1CORProtocol",
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
    spoiling : {"epg", "ideal"}
        Simulation of the spoiled sequences (VFA, AFI, RB1COR): extended phase graphs of the actual
        RF phase schedule, spoiler and diffusion (default), or ideal spoiling.
    """

    vfa: VFAProtocol = field(default_factory=VFAProtocol)
    bssfp: BSSFPProtocol | None = field(default_factory=BSSFPProtocol)
    afi: AFIProtocol | None = field(default_factory=AFIProtocol)
    rb1cor: RB1CORProtocol | None = field(default_factory=RB1CORProtocol)
    spoiling: str = "epg"

    def __post_init__(self):
        if not isinstance(self.vfa, VFAProtocol):
            raise ValueError(f"Protocol.vfa must be a VFAProtocol, got {type(self.vfa).__name__}")
        if self.spoiling not in SPOILING_MODELS:
            raise ValueError(f"Protocol.spoiling must be one of {SPOILING_MODELS}, got {self.spoiling!r}")

    def to_dict(self):
        """Plain-dict description (for the simulation record); absent sequences are ``None``."""
        sequences = (("vfa", self.vfa), ("bssfp", self.bssfp), ("afi", self.afi), ("rb1cor", self.rb1cor))
        return {
            **{name: (None if value is None else asdict(value)) for name, value in sequences},
            "spoiling": self.spoiling,
        }
