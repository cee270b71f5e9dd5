"""The brain mask on heads that are not the phantom's: skull 2-10 mm, bright, dark or no scalp,
cropped and skull-stripped inputs, receive bias, lesions, 1-5 mm voxels, SNR 20 to noiseless.

Each head is an ellipsoidal brain (CSF rim, cortex, white matter, ventricles, dark and bright
lesions) inside shells of skull and scalp of constant thickness. Partial volume is computed
analytically (the fraction of each voxel on either side of every surface, plane approximation),
so a 2 mm skull at 2 mm voxels is one dark voxel where it is centred on one and two half-dark
voxels where it straddles two, as in a real acquisition. The truth is the set of voxels at least
half intracranial, the definition the mask follows. The sanity checks must pass on every correct
mask and fire on deliberately wrong ones.
"""

import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.core.masking import brain_mask, check_brain_mask

# Relative intensities of an RSS of PD- and T1-weighted first echoes (white matter = 1).
WM, GM, CSF, BONE = 1.0, 0.85, 0.6, 0.02
SCALP = {"bright": 1.2, "fat": 2.0, "dark": 0.1, "none": 0.0}
DARK_LESION, BRIGHT_LESION = 0.35, 1.4


def _inside_fraction(signed_distance_mm, extent_mm):
    """Fraction of a voxel on the inner side of a surface (plane through the voxel)."""
    return np.clip(0.5 - signed_distance_mm / extent_mm, 0.0, 1.0)


def ellipsoidal_head(
    voxel_mm=2.0,
    *,
    skull_mm=7.0,
    scalp="bright",
    scalp_mm=6.0,
    semi_axes_mm=(66.0, 80.0, 56.0),
    bias=0.3,
    snr=20.0,
    crop_top_mm=None,
    skull_stripped=False,
    neck_mm=0.0,
    brainless=False,
    seed=0,
):
    """Magnitude image of an ellipsoidal head, its intracranial truth and its lesion voxels.

    Parameters
    ----------
    voxel_mm : float or sequence of 3 floats
        Voxel size.
    skull_mm, scalp_mm : float
        Thickness of the dark bone and of the scalp shells.
    scalp : {"bright", "fat", "dark", "none"}
        Scalp intensity (1.2, 2.0, 0.1 times white matter) or no scalp at all.
    semi_axes_mm : sequence of 3 floats
        Brain semi-axes.
    bias : float
        Amplitude of a smooth Gaussian-shaped receive bias (1 +- bias over the head).
    snr : float
        White-matter signal over the complex noise SD (Rician magnitude); ``np.inf`` for none.
    crop_top_mm : float, optional
        Cut the field of view this far below the top of the brain (the brain touches the edge).
    skull_stripped : bool
        Keep the brain only, with exact zeros elsewhere.
    neck_mm : float
        Length of a neck below the head: an elliptic cylinder of muscle (0.7) in a 6 mm layer of
        fat (twice white matter) joining the bottom of the scalp; the field of view is extended
        down to its end, which it cuts.
    brainless : bool
        No brain: the intracranial space holds nothing but noise (the truth stays the brain's).
    """
    voxel = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,))
    semi = np.asarray(semi_axes_mm, dtype=float)
    extent = semi + skull_mm + (scalp_mm if scalp != "none" else 0.0) + 10.0
    axes = [np.arange(-np.ceil(e / v), np.ceil(e / v) + 1) * v for e, v in zip(extent, voxel)]
    if neck_mm:
        bottom = semi[2] + neck_mm
        axes[2] = np.arange(-np.ceil(bottom / voxel[2]), np.ceil(extent[2] / voxel[2]) + 1) * voxel[2]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    # Signed distance to the brain surface, to first order (level set over its gradient), and
    # the voxel's extent along the surface normal, for the partial volume of every shell.
    level = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    gradient = [c / s**2 for c, s in zip((x, y, z), semi)]
    gradient_norm = np.maximum(np.sqrt(sum(g**2 for g in gradient)), 1e-9)
    distance = (level - 1.0) * level / gradient_norm
    normal_extent = np.maximum(np.sqrt(sum((g * v) ** 2 for g, v in zip(gradient, voxel))) / gradient_norm, voxel.min())

    def within(offset_mm):
        return _inside_fraction(distance - offset_mm, normal_extent)

    brain, grey, white = within(0.0), within(-2.0), within(-5.0)
    within_skull = within(skull_mm)
    within_scalp = within(skull_mm + scalp_mm) if scalp != "none" else within_skull
    intensity = CSF * (brain - grey) + GM * (grey - white) + WM * white
    if brainless:
        intensity = 0.0 * intensity
    intensity = intensity + BONE * (within_skull - brain)
    intensity = intensity + SCALP[scalp] * (within_scalp - within_skull)
    if neck_mm:
        # Elliptic cylinder under the back half of the head, up to its centre, outside the head.
        neck_semi = np.array([0.6 * semi[0], 0.5 * semi[1]])
        radial = np.sqrt((x / neck_semi[0]) ** 2 + ((y + 0.2 * semi[1]) / neck_semi[1]) ** 2)
        below_centre = _inside_fraction(z, voxel[2])

        def in_neck(offset_mm):
            return _inside_fraction((radial - 1.0) * neck_semi.min() - offset_mm, voxel[:2].min()) * below_centre

        outside_head = 1.0 - within_scalp
        intensity = intensity + outside_head * (0.7 * in_neck(0.0) + 2.0 * (in_neck(6.0) - in_neck(0.0)))

    def blob(centre, radii):
        r = np.sqrt(sum(((c - o) / s) ** 2 for c, o, s in zip((x, y, z), centre, radii)))
        return _inside_fraction((r - 1.0) * min(radii), voxel.min())

    for side in (-1, 1):  # lateral ventricles, inside the white matter
        intensity = intensity + (CSF - WM) * blob((side * 12.0, 5.0, 8.0), (6.0, 25.0, 10.0)) * white
    lesions = np.zeros(intensity.shape, dtype=bool)
    for centre, radius, value in [
        ((25, 20, 15), 6, DARK_LESION),
        ((-30, -25, 5), 5, BRIGHT_LESION),
        ((10, -40, -10), 4, DARK_LESION),
        ((-20, 35, 25), 7, BRIGHT_LESION),
        # juxtacortical: 3 mm (or one voxel) of cortex and CSF over it
        ((semi[0] - 5 - max(3.0, voxel.max()), 0, 0), 5, DARK_LESION),
    ]:
        fraction = blob(centre, (radius,) * 3) * brain
        intensity = intensity * (1 - fraction) + value * fraction
        lesions |= fraction >= 0.5
    truth = brain >= 0.5
    if skull_stripped:
        intensity = np.where(truth, intensity, 0.0)
    if bias:
        field = np.exp(-((x - 40) ** 2 + (y + 50) ** 2 + (z - 30) ** 2) / (2 * 90.0**2))
        field = np.broadcast_to(field, truth.shape)
        head = within_scalp >= 0.5
        low, high = field[head].min(), field[head].max()
        intensity = intensity * (1 - bias + 2 * bias * (field - low) / (high - low))
    if np.isfinite(snr):
        noise = np.random.default_rng(seed).normal(scale=1.0 / snr, size=(2,) + truth.shape)
        image = np.hypot(intensity + noise[0], noise[1])
        if skull_stripped:
            image = np.where(truth, image, 0.0)
    else:
        image = intensity
    if crop_top_mm is not None:
        top = int(np.searchsorted(axes[2], semi[2] - crop_top_mm))
        image, truth, lesions = (v[:, :, :top] for v in (image, truth, lesions))
    return image.astype(np.float32), truth, lesions


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def grid_affine(voxel_mm):
    """Voxel-to-world affine of the heads built here: axes x, y, z are right, anterior, superior."""
    return np.diag([*np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,)), 1.0])


def check_mask(image, truth, lesions, voxel_mm, affine=None):
    voxel_size = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,))
    affine = grid_affine(voxel_mm) if affine is None else affine
    mask = brain_mask(image, voxel_size=voxel_size)
    assert mask.dtype == bool and mask.shape == image.shape
    score = dice(mask, truth)
    assert score >= 0.95, f"Dice {score:.3f}"
    # Every lesion voxel under the brain's outermost layer of voxels is kept (a dark lesion in
    # that layer is indistinguishable from a dent of the surface).
    missed = np.count_nonzero(lesions & ndimage.binary_erosion(truth) & ~mask)
    assert missed == 0, f"{missed} lesion voxels missed"
    # Every check, the mask's position along the affine's superior axis included, passes.
    assert check_brain_mask(mask, image, voxel_size=voxel_size, affine=affine) == []
    return mask


@pytest.mark.parametrize("scalp", ["bright", "dark", "none"])
@pytest.mark.parametrize("skull_mm", [2.0, 4.0, 7.0, 10.0])
def test_skull_and_scalp_at_2mm(skull_mm, scalp):
    image, truth, lesions = ellipsoidal_head(2.0, skull_mm=skull_mm, scalp=scalp, seed=1)
    check_mask(image, truth, lesions, 2.0)


def test_thin_skull_under_thick_fat_scalp_and_small_brain():
    # The old mask kept the largest component after its opening: here the 20 mm scalp, twice as
    # bright as white matter, outweighed the brain (Dice 0.51).
    image, truth, lesions = ellipsoidal_head(
        2.0, skull_mm=2.0, scalp="fat", scalp_mm=20.0, semi_axes_mm=(50.0, 60.0, 45.0), seed=2
    )
    check_mask(image, truth, lesions, 2.0)


def test_slab_through_thin_skull_and_thick_scalp():
    # An 80 mm slab through the same head: the old mask kept the scalp ring (open at the slab's
    # faces, so no hole filling recovered the brain) and none of the brain, Dice 0.
    image, truth, lesions = ellipsoidal_head(
        2.0, skull_mm=2.0, scalp="fat", scalp_mm=20.0, semi_axes_mm=(50.0, 60.0, 45.0), seed=2
    )
    slab = slice(image.shape[2] // 2 - 20, image.shape[2] // 2 + 20)
    check_mask(image[:, :, slab], truth[:, :, slab], lesions[:, :, slab], 2.0)


@pytest.mark.parametrize(
    "skull_mm, scalp",
    [
        (2.0, "bright"),
        pytest.param(10.0, "dark", marks=pytest.mark.slow),
        pytest.param(2.0, "fat", marks=pytest.mark.slow),
    ],
)
def test_1mm_heads(skull_mm, scalp):
    fat = scalp == "fat"
    image, truth, lesions = ellipsoidal_head(
        1.0,
        skull_mm=skull_mm,
        scalp=scalp,
        scalp_mm=20.0 if fat else 6.0,
        semi_axes_mm=(50.0, 60.0, 45.0) if fat else (66.0, 80.0, 56.0),
        seed=3,
    )
    check_mask(image, truth, lesions, 1.0)


@pytest.mark.parametrize(
    "voxel_mm, skull_mm, scalp",
    [
        (3.0, 2.0, "bright"),
        (3.0, 7.0, "dark"),
        (4.0, 4.0, "bright"),
        (4.0, 10.0, "none"),
        (5.0, 4.0, "bright"),
        (5.0, 7.0, "dark"),
        (5.0, 2.0, "none"),
    ],
)
def test_coarse_voxels(voxel_mm, skull_mm, scalp):
    image, truth, lesions = ellipsoidal_head(voxel_mm, skull_mm=skull_mm, scalp=scalp, seed=4)
    check_mask(image, truth, lesions, voxel_mm)


def test_anisotropic_voxels_thin_skull():
    image, truth, lesions = ellipsoidal_head((1.5, 1.5, 3.0), skull_mm=4.0, seed=5)
    check_mask(image, truth, lesions, (1.5, 1.5, 3.0))


@pytest.mark.parametrize("snr", [np.inf, 20.0, 60.0])
@pytest.mark.parametrize("voxel_mm", [2.0, 4.0])
def test_skull_stripped_input(voxel_mm, snr):
    image, truth, lesions = ellipsoidal_head(voxel_mm, skull_stripped=True, snr=snr, seed=6)
    check_mask(image, truth, lesions, voxel_mm)


@pytest.mark.parametrize("skull_mm", [2.0, 7.0])
@pytest.mark.parametrize("voxel_mm", [2.0, 4.0])
def test_field_of_view_cutting_the_brain(voxel_mm, skull_mm):
    if voxel_mm == 4.0 and skull_mm == 2.0:
        skull_mm = 4.0  # see test_limit_thin_skull_at_coarse_voxels
    image, truth, lesions = ellipsoidal_head(voxel_mm, skull_mm=skull_mm, crop_top_mm=10.0, seed=7)
    assert truth[:, :, -1].any()  # the brain touches the edge
    check_mask(image, truth, lesions, voxel_mm)


@pytest.mark.parametrize("snr", [np.inf, 60.0, 20.0])
def test_noise_levels_with_strong_bias(snr):
    image, truth, lesions = ellipsoidal_head(2.0, skull_mm=4.0, bias=0.5, snr=snr, seed=8)
    check_mask(image, truth, lesions, 2.0)


def test_limit_thin_skull_at_coarse_voxels():
    """Documented limit: a skull under half a voxel thick between CSF and a bright scalp leaves no
    voxel dark enough to separate them; the mask then holds the scalp. Kept as a test so that a
    future method that solves it updates the documentation."""
    image, truth, _ = ellipsoidal_head(4.0, skull_mm=2.0, scalp="bright", seed=9)
    mask = brain_mask(image, voxel_size=(4.0,) * 3)
    assert dice(mask, truth) < 0.95


# --- sanity checks: wrong masks are flagged ---------------------------------------------------


@pytest.fixture(scope="module")
def head_and_mask():
    image, truth, _ = ellipsoidal_head(2.0, skull_mm=7.0, seed=10)
    return image, truth


def test_sanity_check_accepts_the_truth(head_and_mask):
    image, truth = head_and_mask
    assert check_brain_mask(truth, image, voxel_size=(2.0,) * 3) == []


def test_sanity_check_flags_a_shell(head_and_mask):
    image, truth = head_and_mask
    shell = truth & ~ndimage.binary_erosion(truth, iterations=2)
    problems = check_brain_mask(shell, image, voxel_size=(2.0,) * 3)
    assert any("hollow shell" in p for p in problems), problems


def test_sanity_check_flags_an_open_shell_cut_by_the_field_of_view(head_and_mask):
    # A scalp ring cut open at the top does not fill in 3-D; it fills slice by slice.
    image, truth = head_and_mask
    shell = (truth & ~ndimage.binary_erosion(truth, iterations=2))[:, :, : truth.shape[2] // 2 + 5]
    problems = check_brain_mask(shell, image[:, :, : truth.shape[2] // 2 + 5])
    assert any("hollow shell" in p for p in problems), problems


def test_sanity_check_flags_the_whole_field_of_view(head_and_mask):
    image, truth = head_and_mask
    problems = check_brain_mask(np.ones(truth.shape, dtype=bool), image)
    assert any("all round" in p for p in problems), problems
    assert any("outside the head" in p for p in problems), problems


def test_sanity_check_flags_a_tiny_mask(head_and_mask):
    image, truth = head_and_mask
    tiny = truth & ~ndimage.binary_erosion(truth, iterations=0)
    centre = tuple(n // 2 for n in truth.shape)
    tiny = np.zeros(truth.shape, dtype=bool)
    tiny[tuple(slice(c - 4, c + 4) for c in centre)] = True
    problems = check_brain_mask(tiny, image, voxel_size=(2.0,) * 3)
    assert any("% of the head" in p for p in problems), problems
    assert check_brain_mask(np.zeros(truth.shape, dtype=bool), truth) == ["the mask is empty"]


def test_sanity_check_flags_a_mask_holding_the_skull(head_and_mask):
    image, truth = head_and_mask
    with_skull_and_scalp = ndimage.binary_fill_holes(image > 0.5)
    problems = check_brain_mask(with_skull_and_scalp, image, voxel_size=(2.0,) * 3)
    assert any("skull" in p for p in problems), problems


def test_sanity_check_takes_a_head_mask(head_and_mask):
    _, truth = head_and_mask
    head = ndimage.binary_dilation(truth, iterations=6)
    assert check_brain_mask(truth, head) == []
    shell = truth & ~ndimage.binary_erosion(truth, iterations=2)
    assert check_brain_mask(shell, head) != []
    with pytest.raises(ValueError, match="one shape"):
        check_brain_mask(truth, head[:-1])


def test_sanity_check_flags_a_mask_holding_a_thin_skull_and_the_scalp():
    # A 2 mm skull is ~2 % of the head: too few dark voxels for the fraction check, but one dark
    # layer spanning the mask (the old mask's failure on the fatty scalp, Dice 0.51).
    image, truth, _ = ellipsoidal_head(
        2.0, skull_mm=2.0, scalp="fat", scalp_mm=20.0, semi_axes_mm=(50.0, 60.0, 45.0), seed=2
    )
    head = ndimage.binary_fill_holes(image > 0.5)
    problems = check_brain_mask(head, image, voxel_size=(2.0,) * 3)
    assert any("dark layer" in p for p in problems), problems
    assert check_brain_mask(truth, image, voxel_size=(2.0,) * 3) == []


# --- sanity checks: the mask's position in the head -------------------------------------------


def _stored_superior_first(volume, voxel_mm):
    """The same head stored with the superior axis first and reversed (inferior at index -1),
    and the affine that says so; world coordinates are unchanged."""
    stored = np.ascontiguousarray(np.moveaxis(volume, 2, 0)[::-1])
    affine = np.zeros((4, 4))
    affine[0, 1] = affine[1, 2] = voxel_mm
    affine[2, 0] = -voxel_mm
    affine[2, 3] = (stored.shape[0] - 1) * voxel_mm
    affine[3, 3] = 1.0
    return stored, affine


def _tilted(affine, pitch_deg, roll_deg):
    """The affine of a head tilted in the scanner (rotations about the x and y axes)."""
    pitch, roll = np.radians([pitch_deg, roll_deg])
    about_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    about_y = np.array([[np.cos(roll), 0, np.sin(roll)], [0, 1, 0], [-np.sin(roll), 0, np.cos(roll)]])
    tilted = affine.copy()
    tilted[:3] = about_y @ about_x @ affine[:3]
    return tilted


@pytest.fixture(scope="module", params=[2.0, 4.0], ids=["2mm", "4mm"])
def heads_with_a_neck(request):
    """A head with a 100 mm neck, and the same head without a brain (noise inside the skull)."""
    voxel_mm = request.param
    with_brain = ellipsoidal_head(voxel_mm, neck_mm=100.0, seed=11)
    brainless, _, _ = ellipsoidal_head(voxel_mm, neck_mm=100.0, brainless=True, seed=11)
    return voxel_mm, with_brain, brainless


def test_head_with_a_neck(heads_with_a_neck):
    voxel_mm, (image, truth, lesions), _ = heads_with_a_neck
    check_mask(image, truth, lesions, voxel_mm)


def test_brainless_head_with_a_neck_is_flagged(heads_with_a_neck):
    # The automatic mask of a head without a visible brain is the neck: a solid, compact block
    # well inside the head, that passes every shape check. The whole cranium lies above it.
    voxel_mm, (_, truth, _), brainless = heads_with_a_neck
    mask = brain_mask(brainless, voxel_size=(voxel_mm,) * 3)
    assert dice(mask, truth) < 0.1
    problems = check_brain_mask(mask, brainless, voxel_size=(voxel_mm,) * 3, affine=grid_affine(voxel_mm))
    assert any("lies low in the head" in p for p in problems), problems


@pytest.mark.parametrize("pitch_deg, roll_deg", [(0.0, 0.0), (30.0, 0.0), (-25.0, 15.0)])
def test_position_check_follows_the_affine(heads_with_a_neck, pitch_deg, roll_deg):
    # Superior along the first array axis, reversed, and the head tilted in the scanner: the
    # brain's mask passes and the brainless head's is flagged all the same.
    voxel_mm, (image, truth, lesions), brainless = heads_with_a_neck
    stored, affine = _stored_superior_first(image, voxel_mm)
    affine = _tilted(affine, pitch_deg, roll_deg)
    check_mask(stored, *(_stored_superior_first(v, voxel_mm)[0] for v in (truth, lesions)), voxel_mm, affine)
    stored_brainless, _ = _stored_superior_first(brainless, voxel_mm)
    mask = brain_mask(stored_brainless, voxel_size=(voxel_mm,) * 3)
    problems = check_brain_mask(mask, stored_brainless, voxel_size=(voxel_mm,) * 3, affine=affine)
    assert any("lies low in the head" in p for p in problems), problems


def test_position_check_names_a_wrong_orientation(heads_with_a_neck):
    # An affine that turns the head upside down puts the neck on top: the brain's mask is then
    # "low in the head", and the message names the header as a possible cause.
    voxel_mm, (image, truth, _), _ = heads_with_a_neck
    upside_down = grid_affine(voxel_mm) @ np.diag([1.0, -1.0, -1.0, 1.0])
    problems = check_brain_mask(truth, image, voxel_size=(voxel_mm,) * 3, affine=upside_down)
    assert any("orientation" in p for p in problems), problems


def test_position_check_flags_the_lower_half_of_a_brain(head_and_mask):
    image, truth = head_and_mask
    lower = truth.copy()
    lower[:, :, truth.shape[2] // 2 :] = False
    problems = check_brain_mask(lower, image, voxel_size=(2.0,) * 3, affine=grid_affine(2.0))
    assert any("lies low in the head" in p for p in problems), problems
    upper = truth & ~lower  # the top half sits where a brain does: only the other checks apply
    assert not any("low in the head" in p for p in check_brain_mask(upper, image, affine=grid_affine(2.0)))
