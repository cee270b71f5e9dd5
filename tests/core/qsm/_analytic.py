"""Closed-form fields of a uniformly magnetised sphere and infinite cylinder, sampled on a grid.

The fields are Lorentz-corrected (the convention of :mod:`qmri_workflows.core.dipole`): in ppm of B0
for susceptibility in ppm, relative to the surrounding medium.

* sphere of radius R: 0 inside; ``chi R^3 / 3 (3 cos^2 theta - 1) / r^3`` outside;
* infinite cylinder of radius a, axis at angle theta to B0: ``chi / 6 (3 cos^2 theta - 1)`` inside;
  ``chi / 2 sin^2 theta (a / rho)^2 cos(2 phi)`` outside (rho the distance to the axis, phi the
  azimuth from the projection of B0 on the plane normal to the axis).

Each voxel's value is the mean over ``supersampling^3`` points inside it, so the susceptibility map
is the volume fraction and the field the voxel-average field: neither uses the dipole kernel of the
inversion.
"""

import numpy as np


def _unit(vector):
    vector = np.asarray(vector, dtype=float)
    return vector / np.linalg.norm(vector)


def sphere(points, centre, radius, chi, b0_direction):
    """(inside indicator, field) of a sphere at points of shape (3, ...) in mm."""
    b = _unit(b0_direction)
    r_vec = points - np.reshape(centre, (3,) + (1,) * (points.ndim - 1))
    r = np.sqrt((r_vec**2).sum(0))
    inside = r <= radius
    safe = np.maximum(r, 1e-9)
    cos_theta = np.tensordot(b, r_vec, axes=1) / safe
    field = np.where(inside, 0.0, chi * radius**3 / 3 * (3 * cos_theta**2 - 1) / safe**3)
    return inside.astype(float), field


def cylinder(points, point_on_axis, axis, radius, chi, b0_direction):
    """(inside indicator, field) of an infinite cylinder at points of shape (3, ...) in mm."""
    b = _unit(b0_direction)
    u = _unit(axis)
    r_vec = points - np.reshape(point_on_axis, (3,) + (1,) * (points.ndim - 1))
    along = np.tensordot(u, r_vec, axes=1)
    rho_vec = r_vec - u.reshape((3,) + (1,) * (points.ndim - 1)) * along
    rho = np.sqrt((rho_vec**2).sum(0))
    inside = rho <= radius
    cos_theta = float(u @ b)
    sin2_theta = 1 - cos_theta**2
    b_perp = b - cos_theta * u
    if np.linalg.norm(b_perp) < 1e-12:
        outside = np.zeros_like(rho)
    else:
        cos_phi = np.tensordot(_unit(b_perp), rho_vec, axes=1) / np.maximum(rho, 1e-9)
        outside = chi / 2 * sin2_theta * radius**2 / np.maximum(rho, 1e-9) ** 2 * (2 * cos_phi**2 - 1)
    field = np.where(inside, chi / 6 * (3 * cos_theta**2 - 1), outside)
    return inside.astype(float), field


def sample(shape, voxel_size, sources, b0_direction, *, supersampling=3):
    """Volume-fraction susceptibility and voxel-averaged field of a list of sources.

    Parameters
    ----------
    sources : list of (kind, kwargs)
        ``("sphere", dict(centre=, radius=, chi=))`` or
        ``("cylinder", dict(point_on_axis=, axis=, radius=, chi=))``, positions in mm with voxel
        (i, j, k) centred at (i, j, k) * voxel_size.

    Returns
    -------
    chi, field : ndarray, shape ``shape``
        Susceptibility (ppm) and field (ppm of B0).
    """
    voxel_size = np.broadcast_to(np.asarray(voxel_size, float), (3,))
    offsets = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    grid = np.stack(np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, voxel_size)], indexing="ij"))
    chi = np.zeros(shape)
    field = np.zeros(shape)
    functions = {"sphere": sphere, "cylinder": cylinder}
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                points = grid + (np.array([ox, oy, oz]) * voxel_size).reshape(3, 1, 1, 1)
                for kind, parameters in sources:
                    inside, part = functions[kind](points, b0_direction=b0_direction, **parameters)
                    chi += parameters["chi"] * inside
                    field += part
    n = supersampling**3
    return chi / n, field / n


def ball(shape, centre, radius, voxel_size=1.0):
    """Boolean ball (radius and centre in mm)."""
    voxel_size = np.broadcast_to(np.asarray(voxel_size, float), (3,))
    axes = [np.arange(n) * h - c for n, h, c in zip(shape, voxel_size, centre)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    return x * x + y * y + z * z <= radius * radius


def nrmse(estimate, truth, mask, *, demean=True):
    """100 * ||x - x_true|| / ||x_true|| over the mask (both demeaned there by default), percent."""
    estimate, truth = estimate[mask], truth[mask]
    if demean:
        estimate = estimate - estimate.mean()
        truth = truth - truth.mean()
    return 100 * np.linalg.norm(estimate - truth) / np.linalg.norm(truth)
