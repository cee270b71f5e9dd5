"""A synthetic head for QSM tests: known susceptibility, closed-form fields, wrapped multi-echo phase.

48^3 voxels of 1 mm on an oblique grid (B0 is not an array axis); spheres of known susceptibility
inside a ball-shaped brain, an air-like sphere outside it along B0, fields in closed form
(tests/core/qsm/_analytic.py: no discrete dipole kernel) plus a linear shim residual, a smooth
phase offset that differs between flip angles, wraps at every echo, complex noise (SNR 60-100 at
echo 1), noise only outside the brain.
"""

import numpy as np
from scipy.spatial.transform import Rotation

from qmri_workflows.interfaces.qsm import b0_direction_from_affine
from tests.core.qsm._analytic import ball, sample

SHAPE = (48, 48, 48)
CENTRE = np.array([24.0, 24.0, 24.0])
BRAIN_RADIUS = 16.0
B0_TESLA = 3.0
HZ_PER_PPM = 42.577478518 * B0_TESLA
ECHO_TIMES = (0.004, 0.008, 0.012, 0.016, 0.020)
FLIP_ANGLES = (6.0, 20.0)
LEVELS = (0.6, 1.0)  # magnitude of each flip angle
INTERIOR = [
    ("sphere", dict(centre=CENTRE + offset, radius=radius, chi=chi))
    for offset, radius, chi in [
        ((-6, 0, -4), 4.0, 0.2),
        ((6, 4, 3), 3.5, -0.15),
        ((0, -7, 5), 3.0, 0.3),
        ((2, 5, -6), 4.0, 0.1),
    ]
]


def oblique_affine():
    """1 mm voxels, axes rotated by (20, -12, 8) degrees about the scanner's x, y, z."""
    rotation = Rotation.from_euler("xyz", [20, -12, 8], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = -rotation @ CENTRE
    return affine


def synthetic_head(*, seed=3):
    """Truth and images of the head.

    Returns
    -------
    dict
        ``affine``, ``chi`` (ppm), ``local_hz`` and ``total_hz`` (Hz), ``brain`` (bool),
        ``images``: ``{(flip_index, echo_index): (magnitude, phase)}`` (float32, phase in radians).
    """
    affine = oblique_affine()
    b0 = b0_direction_from_affine(affine)
    chi, local_ppm = sample(SHAPE, 1.0, INTERIOR, b0, supersampling=2)
    air = [("sphere", dict(centre=CENTRE + 23.0 * np.asarray(b0), radius=5.0, chi=-9.4))]
    _, background_ppm = sample(SHAPE, 1.0, air, b0, supersampling=2)
    x, y, z = np.meshgrid(*[np.arange(n) - c for n, c in zip(SHAPE, CENTRE)], indexing="ij")
    total_hz = HZ_PER_PPM * (local_ppm + background_ppm) + 0.5 * x
    brain = ball(SHAPE, CENTRE, BRAIN_RADIUS)
    rng = np.random.default_rng(seed)
    images = {}
    for flip_index, level in enumerate(LEVELS):
        offset = 0.8 * flip_index + 1.5 * np.sin(x / 15.0) * np.cos(y / 19.0) + 0.3 * z / 24
        for echo_index, te in enumerate(ECHO_TIMES):
            magnitude = level * brain * np.exp(-20 * te)
            signal = magnitude * np.exp(1j * (offset + 2 * np.pi * total_hz * te))
            signal += 0.01 * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE))
            images[flip_index, echo_index] = (np.abs(signal).astype(np.float32), np.angle(signal).astype(np.float32))
    return dict(affine=affine, chi=chi, local_hz=HZ_PER_PPM * local_ppm, total_hz=total_hz, brain=brain, images=images)
