"""Streaking around strong sources: TV and iLSQR against TKD.

A ball-shaped brain (1 mm grid, B0 tilted from the grid's third axis) holds a calcification-like
sphere (radius 3 mm, -1.0 ppm) and a vein-like finite cylinder (radius 1.5 mm, 40 mm long,
+0.45 ppm, at 70 degrees to B0) among weak tissue contrasts. The field is made fairly: from a map
twice as fine with the continuous kernel, at every fine voxel (as the phantom's), averaged over each
1 mm voxel, plus noise.

Streaking bound: the RMS error of chi over the brain farther than ``MARGIN_MM`` from the strong
source, relative to the source's |chi|, must stay below ``STREAK_BOUND`` (2.5 %) and below TKD's value
on the same data (it includes the error on the weak contrasts; measured on this phantom: TKD 1.4 %
and 2.8 %, iLSQR 0.9 % and 2.0 %, TV 0.2 % and 0.4 % for the sphere and the cylinder).
"""

import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.core.qsm import invert_ilsqr, invert_tkd, invert_tv_admm
from qmri_workflows.phantom.fields import fine_grid_field

N = 80
FINE = 0.5
CENTRE = np.array([40.0, 40.0, 40.0])
BRAIN_RADIUS = 34.0
MARGIN_MM = 6.0
STREAK_BOUND = 0.025
NOISE_PPM = 0.002
B0 = np.array([np.sin(np.radians(15)), 0.0, np.cos(np.radians(15))])
PHASE_SCALE = 2 * np.pi * 42.577478518 * 3.0 * 0.012  # rad per ppm at TE 12 ms, 3 T


def _fine_axes():
    # fine voxel j (of 2 per coarse voxel m = j // 2) lies at (j + 0.5) * 0.5 - 0.5 mm: coarse voxel
    # centres at integer mm
    return np.meshgrid(*[(np.arange(2 * N) + 0.5) * FINE - 0.5 for _ in range(3)], indexing="ij", sparse=True)


def _source(kind):
    x, y, z = _fine_axes()
    if kind == "calcification":
        centre, chi = CENTRE + (5.0, -4.0, 3.0), -1.0
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 3.0**2
    else:
        chi = 0.45
        axis = np.array([np.sin(np.radians(70 + 15)), 0.0, np.cos(np.radians(70 + 15))])
        px, py, pz = x - CENTRE[0], y - CENTRE[1] - 5.0, z - CENTRE[2]
        along = px * axis[0] + py * axis[1] + pz * axis[2]
        rho2 = px * px + py * py + pz * pz - along * along
        inside = (rho2 <= 1.5**2) & (np.abs(along) <= 20.0)
    return inside.astype(np.float32) * np.float32(chi), chi


def _data(kind):
    x, y, z = _fine_axes()
    background = np.zeros((2 * N,) * 3, np.float32)
    rng = np.random.default_rng(5)
    for _ in range(12):
        c = CENTRE + rng.uniform(-18, 18, 3)
        axes = rng.uniform(3, 8, 3)
        background[((x - c[0]) / axes[0]) ** 2 + ((y - c[1]) / axes[1]) ** 2 + ((z - c[2]) / axes[2]) ** 2 <= 1] = (
            rng.uniform(-0.05, 0.1)
        )
    source, source_chi = _source(kind)
    brain_fine = (x - CENTRE[0]) ** 2 + (y - CENTRE[1]) ** 2 + (z - CENTRE[2]) ** 2 <= BRAIN_RADIUS**2
    chi_fine = np.where(source != 0, source, background) * brain_fine
    block = lambda a: a.reshape(N, 2, N, 2, N, 2).mean(axis=(1, 3, 5))  # noqa: E731
    field = block(fine_grid_field(chi_fine, FINE, 2, b0_direction=B0)).astype(np.float32)
    field += np.random.default_rng(1).normal(0, NOISE_PPM, field.shape).astype(np.float32)
    chi = block(chi_fine)
    strong = block(source != 0) > 0
    mask = np.ones((N,) * 3, bool)
    xc, yc, zc = np.meshgrid(*[np.arange(N) - c for c in CENTRE], indexing="ij", sparse=True)
    mask = xc**2 + yc**2 + zc**2 <= (BRAIN_RADIUS - 2) ** 2
    away = mask & ~ndimage.binary_dilation(strong, iterations=int(MARGIN_MM))
    return field * mask, mask, chi, away, source_chi


def _streaking(estimate, chi, away, source_chi):
    error = (estimate - estimate[away].mean()) - (chi - chi[away].mean())
    return np.sqrt(np.mean(error[away] ** 2)) / abs(source_chi)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["calcification", "vein"])
def test_tv_and_ilsqr_streak_less_than_tkd_and_below_the_bound(kind):
    field, mask, chi, away, source_chi = _data(kind)
    geometry = dict(voxel_size=1.0, b0_direction=B0, workers=2)
    estimates = {
        "tkd": invert_tkd(field, mask, **geometry),
        "ilsqr": invert_ilsqr(field, mask, **geometry),
        "tv": invert_tv_admm(field, mask, phase_scale=PHASE_SCALE, **geometry),
    }
    streaks = {name: _streaking(chi_hat, chi, away, source_chi) for name, chi_hat in estimates.items()}
    figures = ", ".join(f"{name} {value:.2%}" for name, value in streaks.items())
    print(f"\n{kind}: RMS error beyond {MARGIN_MM} mm / |source chi|: {figures}")
    for name in ("ilsqr", "tv"):
        assert streaks[name] < STREAK_BOUND, f"{name} streaks: {streaks[name]:.2%}"
        assert streaks[name] <= streaks["tkd"] * 1.05, f"{name} streaks more than TKD: {streaks}"
