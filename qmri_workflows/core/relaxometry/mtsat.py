r"""Magnetisation-transfer saturation (MTsat, Helms 2008) from MT-, PD- and T1-weighted FLASH.

With the rational approximation of the Ernst equation (small flip angles, Helms 2008a), the PD- and
T1-weighted signals give the apparent R1 and amplitude

.. math::

    R_1 = \frac{1}{2}\,\frac{S_{T1}\alpha_{T1}/TR_{T1} - S_{PD}\alpha_{PD}/TR_{PD}}
                        {S_{PD}/\alpha_{PD} - S_{T1}/\alpha_{T1}}, \qquad
    A = S_{PD} S_{T1}\,\frac{TR_{PD}\,\alpha_{T1}/\alpha_{PD} - TR_{T1}\,\alpha_{PD}/\alpha_{T1}}
                          {S_{T1}\,TR_{PD}\,\alpha_{T1} - S_{PD}\,TR_{T1}\,\alpha_{PD}},

and the MT-weighted signal, where the MT pulse removes a fraction :math:`\delta` of the longitudinal
magnetisation each TR, gives

.. math:: \delta = \left(\frac{A\,\alpha_{MT}}{S_{MT}} - 1\right) R_1\,TR_{MT} - \frac{\alpha_{MT}^2}{2}.

**Transmit field.** Computed with the *nominal* angles, all three steps scale together: an actual
angle :math:`B_1` times the nominal one gives :math:`R_1/B_1^2`, :math:`A B_1`, and
:math:`\delta_{true}/B_1^2`. Since the saturation of the MT pulse itself grows about like
:math:`B_1^2`, the nominal-angle :math:`\delta` is to first order free of B1 (Helms' "inherent
correction"). The remaining dependence is removed by the empirical correction of Helms et al.
(erratum 2010) and Weiskopf et al. 2013,

.. math:: \delta_{corr} = \delta\,\frac{1 - C}{1 - C\,B_1}, \qquad C = 0.4 \text{ (3 T)},

which applies to the nominal-angle :math:`\delta` (as in the hMRI toolbox's ``helms`` model and
qMRLab's ``MTSAT_exec``). The coefficient is empirical and protocol dependent (Olsson 2021 fitted
other values at 7 T; Lipp 2023 proposes a linear model): it is a parameter here.

Output in percent units (p.u.), as hMRI writes ``MTsat``.

References
----------
.. [1] Helms G, Dathe H, Kallenberg K, Dechent P. High-resolution maps of magnetization transfer
   with inherent correction for RF inhomogeneity and T1 relaxation obtained from 3D FLASH MRI.
   Magn Reson Med 2008;60:1396-1407; erratum Magn Reson Med 2010;64:1856.
.. [2] Helms G, Dathe H, Dechent P. Quantitative FLASH MRI at 3T using a rational approximation of
   the Ernst equation. Magn Reson Med 2008;59:667-672.
.. [3] Weiskopf N, Suckling J, Williams G, et al. Quantitative multi-parameter mapping of R1, PD*,
   MT, and R2* at 3T: a multi-center validation. Front Neurosci 2013;7:95.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["HELMS_B1_COEFFICIENT", "MTsatMap", "mtsat"]

#: Coefficient C of the empirical B1 correction (1 - C) / (1 - C B1) at 3 T (Weiskopf 2013).
HELMS_B1_COEFFICIENT = 0.4


class MTsatMap(NamedTuple):
    """MTsat (p.u.), and the apparent R1 (1/s, nominal angles) and amplitude A used for it."""

    mtsat: np.ndarray
    r1: np.ndarray
    amplitude: np.ndarray


def _check_angle(name, value):
    if not 0 < value < np.pi / 2:
        raise ValueError(f"{name} must be a flip angle in (0, pi/2) rad, got {value!r}; give radians, not degrees")


def mtsat(
    mt_signal,
    pd_signal,
    t1_signal,
    flip_angles,
    repetition_times,
    *,
    b1=None,
    b1_coefficient=HELMS_B1_COEFFICIENT,
):
    """MT saturation from MT-, PD- and T1-weighted FLASH signals (Helms 2008).

    Parameters
    ----------
    mt_signal, pd_signal, t1_signal : array_like
        Signals (same shape; TE = 0 intercepts or the same echo of each contrast).
    flip_angles : sequence of 3 float
        Nominal flip angles (rad) of the MT-, PD- and T1-weighted images.
    repetition_times : sequence of 3 float
        TRs (s) of the MT-, PD- and T1-weighted images.
    b1 : array_like, optional
        Transmit ratio map; when given, the empirical correction ``(1 - C) / (1 - C B1)`` is applied.
    b1_coefficient : float, optional
        ``C`` of that correction.

    Returns
    -------
    MTsatMap
        NaN where a signal is not positive or the PD/T1 pair gives no positive R1.
    """
    alpha_mt, alpha_pd, alpha_t1 = (float(a) for a in flip_angles)
    for name, value in (("MT flip angle", alpha_mt), ("PD flip angle", alpha_pd), ("T1 flip angle", alpha_t1)):
        _check_angle(name, value)
    tr_mt, tr_pd, tr_t1 = (float(t) for t in repetition_times)
    if not min(tr_mt, tr_pd, tr_t1) > 0:
        raise ValueError(f"repetition times must be positive seconds, got {repetition_times!r}")
    if alpha_t1 <= alpha_pd:
        raise ValueError("the T1-weighted flip angle must be larger than the PD-weighted one: check acq-T1w / acq-PDw")
    s_mt = np.asarray(mt_signal, dtype=float)
    s_pd = np.asarray(pd_signal, dtype=float)
    s_t1 = np.asarray(t1_signal, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = 0.5 * (s_t1 * alpha_t1 / tr_t1 - s_pd * alpha_pd / tr_pd) / (s_pd / alpha_pd - s_t1 / alpha_t1)
        amplitude = (
            s_pd
            * s_t1
            * (tr_pd * alpha_t1 / alpha_pd - tr_t1 * alpha_pd / alpha_t1)
            / (s_t1 * tr_pd * alpha_t1 - s_pd * tr_t1 * alpha_pd)
        )
        saturation = (amplitude * alpha_mt / s_mt - 1.0) * r1 * tr_mt - alpha_mt**2 / 2.0
        if b1 is not None:
            saturation = saturation * (1.0 - b1_coefficient) / (1.0 - b1_coefficient * np.asarray(b1, dtype=float))
    valid = (s_mt > 0) & (s_pd > 0) & (s_t1 > 0) & np.isfinite(r1) & (r1 > 0) & np.isfinite(saturation)
    return MTsatMap(
        np.where(valid, 100.0 * saturation, np.nan), np.where(valid, r1, np.nan), np.where(valid, amplitude, np.nan)
    )
