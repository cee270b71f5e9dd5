"""Dipole inversion against closed-form fields (no inversion shares the data's discretisation).

Susceptibility maps are volume fractions of spheres and cylinders; their fields are the closed
forms averaged over 2^3 points per voxel (tests/core/qsm/_analytic.py), plus Gaussian noise.
Figures (NRMSE per method, streaking) are printed; run with ``-s`` to see them.
"""

import numpy as np
import pytest

from qmri_workflows.core.qsm.inversion import (
    invert_ilsqr,
    invert_l2_gradient,
    invert_tkd,
    invert_tv_admm,
)
from tests.core.qsm._analytic import ball, nrmse, sample

N = 64
CENTRE = np.array([31.5, 31.5, 31.5])
PHASE_SCALE = 2 * np.pi * 42.577478518 * 3.0 * 0.02  # rad/ppm at 3 T, TE 20 ms
MIX = [
    ("sphere", dict(centre=CENTRE + offset, radius=radius, chi=chi))
    for offset, radius, chi in [
        ((-10, 0, -8), 6, 0.15),
        ((10, 8, 6), 5, -0.1),
        ((0, -12, 10), 4, 0.2),
        ((4, 10, -12), 3, 0.3),
        ((-8, -10, 0), 5, 0.08),
        ((12, -6, -6), 4, 0.12),
    ]
]
MIX += [("cylinder", dict(point_on_axis=CENTRE + (0, 3, 0), axis=(1, 0.3, 0.5), radius=1.5, chi=0.4))]
OBLIQUE = (0.3, 0.2, 1.0)

METHODS = {
    "tkd": lambda field, mask, b0: invert_tkd(field, mask, b0_direction=b0),
    "l2_gradient": lambda field, mask, b0: invert_l2_gradient(field, mask, b0_direction=b0, regularization=0.005),
    "ilsqr": lambda field, mask, b0: invert_ilsqr(field, mask, b0_direction=b0),
    "tv_admm": lambda field, mask, b0: invert_tv_admm(field, mask, b0_direction=b0, phase_scale=PHASE_SCALE),
}
# Upper bounds of the NRMSE (%) on the mixed phantom; measured values are about 2/3 of these.
BOUNDS = {"tkd": 60, "l2_gradient": 50, "ilsqr": 45, "tv_admm": 15}


def _phantom(sources, b0_direction, noise_sd=0.001, seed=1):
    chi, field = sample((N,) * 3, 1.0, sources, b0_direction, supersampling=2)
    rng = np.random.default_rng(seed)
    return chi, field + noise_sd * rng.standard_normal(field.shape)


@pytest.fixture(scope="module", params=[(0, 0, 1), OBLIQUE], ids=["axial", "oblique"])
def mix(request):
    chi, field = _phantom(MIX, request.param)
    return dict(chi=chi, field=field, mask=ball((N,) * 3, CENTRE, 27), b0=request.param)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nrmse_per_method(mix, method):
    estimate = METHODS[method](mix["field"], mix["mask"], mix["b0"])
    error = nrmse(estimate, mix["chi"], mix["mask"])
    trivial = nrmse(3 * mix["field"], mix["chi"], mix["mask"])
    print(f"\n{method} B0 {mix['b0']}: NRMSE {error:.1f} % (trivial chi = 3 x field: {trivial:.0f} %)")
    assert error < BOUNDS[method]
    assert error < trivial / 2
    assert estimate.dtype == np.float32 and np.all(estimate[~mix["mask"]] == 0)


def test_b0_direction_is_used():
    chi, field = _phantom(MIX, OBLIQUE)
    mask = ball((N,) * 3, CENTRE, 27)
    right = invert_tv_admm(field, mask, b0_direction=OBLIQUE, data_term="linear")
    wrong = invert_tv_admm(field, mask, b0_direction=(0, 0, 1), data_term="linear")
    assert 2 * nrmse(right, chi, mask) < nrmse(wrong, chi, mask)


def _region_slope(estimate, chi, mask):
    """Slope of estimated vs true mean over each source's core (1 voxel inside its surface)."""
    true_means, estimated_means = [], []
    estimate = estimate - estimate[mask].mean() + chi[mask].mean()
    for _, parameters in MIX[:-1]:
        core = ball(chi.shape, parameters["centre"], parameters["radius"] - 1)
        true_means.append(parameters["chi"])
        estimated_means.append(estimate[core].mean())
    return np.polyfit(true_means, estimated_means, 1)[0]


def test_tkd_correction_removes_underestimation(mix):
    corrected = invert_tkd(mix["field"], mix["mask"], b0_direction=mix["b0"])
    plain = invert_tkd(mix["field"], mix["mask"], b0_direction=mix["b0"], correct_underestimation=False)
    slope_corrected = _region_slope(corrected, mix["chi"], mix["mask"])
    slope_plain = _region_slope(plain, mix["chi"], mix["mask"])
    print(f"\nTKD slope of region means: plain {slope_plain:.3f}, corrected {slope_corrected:.3f}")
    assert slope_plain < 0.95
    assert abs(slope_corrected - 1) < abs(slope_plain - 1)


def _streaking(estimate, chi, mask, shell):
    """RMS of the (mask-demeaned) error in a shell outside the source, in ppm."""
    error = estimate - chi
    error = error - error[mask].mean()
    return float(np.sqrt(np.mean(error[shell & mask] ** 2)))


def _sphere_cone_shell(centre, radius, b0_direction):
    """Voxels 2-12 mm outside a sphere within 12 degrees of the magic-angle cone."""
    axes = [np.arange(N) - c for c in centre]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    b = np.asarray(b0_direction, float) / np.linalg.norm(b0_direction)
    r = np.sqrt(x * x + y * y + z * z)
    angle = np.degrees(np.arccos(np.abs(x * b[0] + y * b[1] + z * b[2]) / np.maximum(r, 1e-9)))
    return (r >= radius + 2) & (r <= radius + 12) & (np.abs(angle - 54.74) < 12)


def _cylinder_shell(point, axis, radius):
    axes = [np.arange(N) - c for c in point]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    u = np.asarray(axis, float) / np.linalg.norm(axis)
    rho_vec = grid - np.tensordot(u, grid, axes=1) * u.reshape(3, 1, 1, 1)
    rho = np.sqrt((rho_vec**2).sum(0))
    return (rho >= radius + 2) & (rho <= radius + 12)


STRONG = {
    "calcification": (
        [("sphere", dict(centre=CENTRE, radius=4.0, chi=-1.0))],
        lambda b0: _sphere_cone_shell(CENTRE, 4.0, b0),
    ),
    "vein": (
        [("cylinder", dict(point_on_axis=CENTRE, axis=(1, 0, 0.6), radius=2.0, chi=0.45))],
        lambda b0: _cylinder_shell(CENTRE, (1, 0, 0.6), 2.0),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(STRONG))
@pytest.mark.parametrize("b0", [(0, 0, 1), OBLIQUE], ids=["axial", "oblique"])
def test_streaking_bound(source, b0):
    sources, shell_of = STRONG[source]
    chi, field = _phantom(sources, b0, noise_sd=0.002)
    mask = ball((N,) * 3, CENTRE, 27)
    shell = shell_of(b0)
    amplitude = abs(sources[0][1]["chi"])
    streaks = {
        method: _streaking(METHODS[method](field, mask, b0), chi, mask, shell) / amplitude
        for method in ("tkd", "ilsqr", "tv_admm")
    }
    print(
        f"\n{source} B0 {b0}: streaking (RMS error in the shell / chi) "
        + ", ".join(f"{m} {100 * v:.2f} %" for m, v in streaks.items())
    )
    # The bound: at most 3 % of the source's susceptibility, and at most 0.6 of TKD's streaking.
    for method in ("ilsqr", "tv_admm"):
        assert streaks[method] < 0.03
        assert streaks[method] < 0.6 * streaks["tkd"]


def test_bad_input():
    field = np.zeros((8, 8, 8))
    mask = np.ones((8, 8, 8), bool)
    with pytest.raises(ValueError, match="phase_scale"):
        invert_tv_admm(field, mask)
    with pytest.raises(ValueError, match="data_term"):
        invert_tv_admm(field, mask, data_term="l1")
    with pytest.raises(ValueError, match="b0_direction"):
        invert_tkd(field, mask, b0_direction=(0, 0, 0))
    field[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        invert_l2_gradient(field, mask)


def test_tv_recovers_the_field_background_removal_took_from_an_edge_vein():
    """Free sources around the mask take up the harmonic part LBV removed from the local field.

    A vein-like cylinder (0.45 ppm) runs just inside the mask's edge, as the superior sagittal sinus
    does in a head. LBV on the exact local field removes the harmonic extension of its edge values,
    part of the vein's own field. With the total variation in the mask only (the default) the
    inversion puts that part back on sources outside the mask and keeps the vein: NRMSE 14.6 %
    against 12.9 % without vein or LBV. With the same total variation outside: 20.4 %.
    """
    from qmri_workflows.core.qsm import remove_background_lbv

    mask = ball((N,) * 3, CENTRE, 27)
    vein = ("cylinder", dict(point_on_axis=CENTRE + (0, -24, 0), axis=(1, 0, 0.2), radius=1.5, chi=0.45))
    chi, field = _phantom(MIX + [vein], OBLIQUE)
    local, interior = remove_background_lbv(field, mask)
    free = invert_tv_admm(local, interior, b0_direction=OBLIQUE, phase_scale=PHASE_SCALE)
    same = invert_tv_admm(local, interior, b0_direction=OBLIQUE, phase_scale=PHASE_SCALE, outside_regularization=1.0)
    free_error, same_error = nrmse(free, chi, interior), nrmse(same, chi, interior)
    print(f"\nedge vein after LBV: TV NRMSE {free_error:.1f} % (free outside), {same_error:.1f} % (same TV outside)")
    assert free_error < 0.8 * same_error
    assert free_error < BOUNDS["tv_admm"]
    assert np.all(free[~interior] == 0)


def test_tv_refuses_a_negative_outside_regularization():
    field = np.zeros((8, 8, 8), np.float32)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    with pytest.raises(ValueError, match="outside_regularization"):
        invert_tv_admm(field, mask, data_term="linear", outside_regularization=-1.0)
