"""Dipole kernel and forward field against closed forms."""

import numpy as np
import pytest

from qmri_workflows.core.dipole import dipole_kernel, forward_field


def _partial_volume_sphere(n, radius, *, supersampling=4):
    """Volume fraction of a sphere centred in an n^3 grid of 1 mm voxels."""
    centre = (n - 1) / 2
    offsets = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    coords = np.arange(n) - centre
    fraction = np.zeros((n, n, n))
    for ox in offsets:
        for oy in offsets:
            for oz in offsets:
                x, y, z = np.meshgrid(coords + ox, coords + oy, coords + oz, indexing="ij", sparse=True)
                fraction += (x * x + y * y + z * z) <= radius**2
    return fraction / supersampling**3


def test_kernel_values_on_axes():
    kernel = dipole_kernel((8, 8, 8), 1.0)
    assert kernel[0, 0, 0] == 0.0
    assert kernel[0, 0, 1] == pytest.approx(1 / 3 - 1)  # k parallel to B0
    assert kernel[1, 0, 0] == pytest.approx(1 / 3)  # k perpendicular to B0
    # Magic angle: k along (1, 0, 1)/sqrt(2) at 45 deg, but with anisotropic voxels the angle moves.
    assert kernel[1, 0, 1] == pytest.approx(1 / 3 - 0.5)
    anisotropic = dipole_kernel((8, 8, 8), (1.0, 1.0, 2.0))
    assert anisotropic[1, 0, 1] == pytest.approx(1 / 3 - 0.25 / 1.25)


def test_kernel_direction_rotation():
    along_z = dipole_kernel((6, 7, 8), 1.0, (0, 0, 1))
    along_x = dipole_kernel((8, 7, 6), 1.0, (3, 0, 0))
    np.testing.assert_allclose(along_x, np.transpose(along_z, (2, 1, 0)), atol=1e-12)
    assert dipole_kernel((4, 4, 4), 1.0, dtype=np.float32).dtype == np.float32


def test_kernel_is_even_at_the_nyquist_planes_for_an_oblique_field():
    """D(-k) = D(k) on every sample, Nyquist planes of even axes included (+k and -k are one sample).

    Off-axis B0 gives (k.b)^2 cross terms whose sign flips with one component; at a Nyquist
    frequency that component has no sign, and the kernel is the average over both. Without it the
    field of a reversed volume was not the reversed field.
    """
    direction = (0.3, -0.2, 1.0)
    kernel = dipole_kernel((8, 7, 6), (1.0, 1.2, 1.5), direction)
    negated = np.roll(np.flip(kernel, (0, 1, 2)), 1, axis=(0, 1, 2))  # index -i, modulo n
    np.testing.assert_allclose(negated, kernel, atol=1e-12)
    # off the Nyquist planes it is the continuous kernel
    b = np.array(direction) / np.linalg.norm(direction)
    k = np.array([1 / 8, 2 / (7 * 1.2), 1 / (6 * 1.5)])
    assert kernel[1, 2, 1] == pytest.approx(1 / 3 - (k @ b) ** 2 / (k @ k))
    # on the first axis's Nyquist plane: the average over +-k_x
    k = np.array([-4 / 8, 2 / (7 * 1.2), 1 / (6 * 1.5)])
    average = ((k @ b) ** 2 + (k * [-1, 1, 1] @ b) ** 2) / 2
    assert kernel[4, 2, 1] == pytest.approx(1 / 3 - average / (k @ k))
    # so the field (half-spectrum kernel, as the inversions use) of a reversed volume is reversed
    chi = np.random.default_rng(0).standard_normal((8, 7, 6))
    forward = forward_field(chi, (1.0, 1.2, 1.5), b0_direction=direction)
    reversed_first = forward_field(np.flip(chi, 0), (1.0, 1.2, 1.5), b0_direction=(-0.3, -0.2, 1.0))
    np.testing.assert_allclose(np.flip(reversed_first, 0), forward, atol=1e-5)


@pytest.mark.parametrize("b0_direction", [(0, 0, 1), (1, 1, 0), (0.3, -0.2, 1.0)])
def test_sphere_field_matches_closed_form(b0_direction):
    n, radius, chi_value = 64, 8.0, 0.5
    chi = chi_value * _partial_volume_sphere(n, radius)
    field = forward_field(chi, 1.0, b0_direction=b0_direction)

    direction = np.asarray(b0_direction, float) / np.linalg.norm(b0_direction)
    coords = np.arange(n) - (n - 1) / 2
    x, y, z = np.meshgrid(coords, coords, coords, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    cos_theta = (x * direction[0] + y * direction[1] + z * direction[2]) / np.maximum(r, 1e-9)
    closed_form = chi_value * radius**3 / 3 * (3 * cos_theta**2 - 1) / np.maximum(r, 1e-9) ** 3
    peak = 2 * chi_value / 3  # field at the sphere's poles

    # Inside, the Lorentz-corrected field of a uniform sphere is 0; the staircase boundary leaves
    # ripples of a few % of chi near the surface, so stay 2 voxels inside.
    inside = r < radius - 2
    assert np.abs(field[inside]).max() < 0.05 * chi_value
    # Outside: closed-form dipole field within 2 % of the peak field from 1.5 radii on; pointwise
    # within 3 % where the field is large (away from the magic-angle cone) from 2 radii on (closer,
    # the discrete kernel's error for oblique B0 reaches ~7 % of the local value).
    outside = (r > 1.5 * radius) & (r < 28)
    assert np.abs(field - closed_form)[outside].max() < 0.02 * peak
    strong = (r > 2 * radius) & (r < 28) & (np.abs(closed_form) > 0.1 * peak)
    relative = np.abs(field[strong] - closed_form[strong]) / np.abs(closed_form[strong])
    assert relative.max() < 0.03


def test_forward_field_is_linear_and_keeps_dtype():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 12, 14)).astype(np.float32)
    b = rng.standard_normal((10, 12, 14)).astype(np.float32)
    fa, fb = forward_field(a, 1.0), forward_field(b, 1.0)
    assert fa.dtype == np.float32 and fa.shape == a.shape
    np.testing.assert_allclose(forward_field(a + 2 * b, 1.0), fa + 2 * fb, atol=1e-4)


def test_padding_removes_wraparound():
    # An off-centre sphere: without padding its periodic image distorts the field on the far side.
    n = 48
    chi = np.roll(_partial_volume_sphere(n, 6.0), 12, axis=2)
    padded = forward_field(chi, 1.0, pad=n)
    default = forward_field(chi, 1.0)
    unpadded = forward_field(chi, 1.0, pad=0)
    assert np.abs(default - padded).max() < 0.02 * np.abs(padded).max()
    assert np.abs(unpadded - padded).max() > 3 * np.abs(default - padded).max()


@pytest.mark.parametrize("bad", [dict(b0_direction=(0, 0, 0)), dict(b0_direction=(1, 0)), dict(pad=-1)])
def test_invalid_arguments(bad):
    with pytest.raises(ValueError):
        forward_field(np.zeros((4, 4, 4)), 1.0, **bad)


def test_invalid_shape():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        forward_field(np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="voxel_size"):
        dipole_kernel((4, 4, 4), (1.0, 0.0, 1.0))


def test_stacked_maps_share_one_kernel():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((9, 10, 11, 2))
    stacked = forward_field(maps, (1.0, 1.2, 0.8), b0_direction=(0.1, 0.2, 1.0))
    for index in range(2):
        single = forward_field(maps[..., index], (1.0, 1.2, 0.8), b0_direction=(0.1, 0.2, 1.0))
        np.testing.assert_allclose(stacked[..., index], single, atol=1e-12)
