"""Brain (intracranial) masking of magnitude images.

The mask is meant to contain every voxel that is *at least half intracranial* (brain, CSF and
lesions), the definition used by partial-volume ground truths, and no extracranial tissue. It is
built from a magnitude image in which the brain is bright, the skull dark and the scalp bright,
e.g. the root-sum-of-squares of the first echoes of all flip angles of a multi-parameter mapping
protocol.

Partial-volume model
--------------------
A voxel at the edge of the brain holds a fraction ``f`` of intracranial tissue of local intensity
``T`` and ``1 - f`` of bone or air, whose signal is negligible (cortical bone has little
MR-visible water and a T2* of a few ms: below ~5 % of brain at a TE of a few ms). On the
noise-corrected, bias-corrected *linear* intensity ``S`` the voxel is at least half intracranial
when ``S >= T / 2``. The method applies this rule with ``T`` estimated locally:

1. **Noise floor.** Magnitude (Rician or non-central chi) noise adds a floor that lifts dark
   voxels. Its power ``P`` is the mean of ``M**2`` over air voxels away from the head and is
   removed as ``S = sqrt(max(M**2 - P, 0))`` [1]_; the bias of ``M**2`` is exactly ``P``.
2. **Receive bias.** A smooth multiplicative bias is fitted to the log-intensities of a first,
   ~3 mm block-averaged mask (low-order polynomial in mm; robust Tukey-biweight reweighting so
   CSF and lesions do not pull it [4]_) and divided out.
3. **Conservative seed.** Voxels above half of the global tissue level are opened with a ball of
   radius ``max(erosion_mm, 1.5 voxels)`` (erosion, one connected component, dilation restricted
   to the thresholded voxels) [3]_. The erosion cuts partial-volume bridges through the skull.
   The component kept is the *deepest* one, holding the voxel farthest from any dark voxel (the
   centre of the largest inscribed ball): the brain is ~10 cm across, whereas scalp, fat and
   neck tissue are layers a few mm to ~2 cm thick, so this assumes no skull or scalp thickness
   (the largest component can be a thick bright scalp around a small brain). The global level
   is then taken again from this component alone, since a fatty scalp may be twice as bright as
   the brain. On the full-resolution grid the component overlapping the first pass's deep core
   (its voxels at least half as deep as the deepest) is kept: that core lies inside the brain
   even where a skull too thin for the ~3 mm first-pass grid let the scalp join the brain.
4. **Local tissue level.** ``T`` is the normalised-convolution average (Gaussian,
   ``level_mm``) of the intensities of the seed eroded by one voxel, i.e. of nearby tissue that
   is certainly intracranial, so it follows the CSF and cortex at the surface and any residual
   bias [5]_.
5. **Growth with competition.** Voxels with ``S >= tissue_fraction * T`` are *candidates*. The
   brain grows from the seed through candidates (6-connected geodesic dilation, at most
   ``2 * opening radius``, enough to restore what the opening removed). Bright extracranial
   tissue, i.e. candidates out of that reach that are connected to the air outside the head
   (the scalp), grows at the same time; a voxel goes to whichever region reaches it first
   (ties to the outside). A noisy partial-volume skull voxel that bridges brain and scalp thus
   cannot carry the brain into the scalp: the scalp behind it is claimed from outside first.
6. **Holes and dents.** Holes are filled (ventricles, dark lesions). A small closing
   (``closing_mm``, at least one voxel) re-encloses dark juxtacortical lesions whose thin tissue
   cover lost a voxel to noise; it may only add voxels brighter than a quarter of ``T``
   (dark lesions), never bone or air in a concavity of the brain. Holes are filled again.

All sizes are in millimetres and converted with ``voxel_size``, so the same defaults work from
1 mm to 5 mm; every morphological radius is at least one voxel.

Validity and checks
-------------------
Tested (``tests/core/test_mask_geometries.py``, ``tests/phantom/test_masking_phantom.py``) on
ellipsoidal heads with skulls of 2-10 mm, bright, fatty, dark or no scalp, fields of view cutting
the brain, skull-stripped inputs, +-30-50 % receive bias, dark and bright lesions, 1-5 mm voxels
and SNR 20 to noiseless, and on the phantom with its skull thinned to 2 mm or its scalp or skull
removed: Dice >= 0.95 against the voxels at least half intracranial. Limit: a skull thinner
than about half a voxel (2 mm at 4-5 mm voxels) between the CSF and a bright scalp leaves no
voxel darker than half the tissue level, and the mask then holds the scalp.
:func:`check_brain_mask` flags the ways a mask fails (a hollow shell, the whole field of view,
a speck, a dark skull-like layer inside, and, given the image's affine, a mask low in the head:
the brain is the top of the head, covered by the skull and scalp only, whereas the mask of a head
without a visible brain is a solid chunk of neck or skull base with the cranium above it); the
pipeline's interface stops on them.

References
----------
.. [1] McGibney G, Smith MR. An unbiased signal-to-noise ratio measure for magnetic resonance
   images. Med Phys. 1993;20(4):1077-1078. doi:10.1118/1.597004
.. [2] Smith SM. Fast robust automated brain extraction. Hum Brain Mapp. 2002;17(3):143-155.
   doi:10.1002/hbm.10062
.. [3] Serra J. Image Analysis and Mathematical Morphology. Academic Press; 1982.
.. [4] Holland PW, Welsch RE. Robust regression using iteratively reweighted least-squares. Commun
   Stat Theory Methods. 1977;6(9):813-827. doi:10.1080/03610927708827533
.. [5] Knutsson H, Westin CF. Normalized and differential convolution. Proc IEEE CVPR.
   1993:515-523. doi:10.1109/CVPR.1993.341081
.. [6] Vincent L. Morphological grayscale reconstruction in image analysis: applications and
   efficient algorithms. IEEE Trans Image Process. 1993;2(2):176-201. doi:10.1109/83.217222
"""

import numpy as np
from scipy import linalg, ndimage

from .noise import zero_filled_regions

__all__ = ["brain_mask", "check_brain_mask", "air_mask", "otsu_threshold", "fit_smooth_bias", "robust_linear_fit"]

# Voxel size (mm) of the first, bias-finding pass.
_FIRST_PASS_MM = 3.0
# Typical adult skull thickness (mm), only used to size the working box around the brain.
_SKULL_MM = 7.0
# Bone and air are darker than this fraction of the head's median tissue intensity; lesions,
# CSF and every other tissue are brighter.
_DARK_FRACTION = 0.25


def _ball_steps(radius_mm, voxel_size):
    """Structuring elements whose successive application approximates a ball of ``radius_mm``.

    Alternating 6-connected crosses and 26-connected cubes (an octahedron-cube Minkowski sum) is
    within ~15 % of a Euclidean ball in every direction and costs a few 3x3x3 passes instead of a
    distance transform. Axis i takes part in ``round(radius_mm / voxel_size[i])`` steps; at least
    one step is made along the finest axis, so no operation is silently a no-op, and along every
    axis as fine as it (to 0.1 %), so that the result does not depend on the storage order of an
    isotropic grid.
    """
    voxel_size = np.asarray(voxel_size, dtype=float)
    counts = np.rint(float(radius_mm) / voxel_size).astype(int)
    if counts.max() < 1:
        counts[voxel_size <= 1.001 * voxel_size.min()] = 1
    offsets = np.indices((3, 3, 3)) - 1
    steps = []
    for step in range(int(counts.max())):
        inactive_axes = counts <= step
        if step % 2 == 0:
            element = np.abs(offsets).sum(axis=0) <= 1
        else:
            element = np.ones((3, 3, 3), dtype=bool)
        for axis in np.flatnonzero(inactive_axes):
            element &= offsets[axis] == 0
        steps.append(element)
    return steps


def _erode(binary, radius_mm, voxel_size):
    for element in _ball_steps(radius_mm, voxel_size):
        binary = ndimage.binary_erosion(binary, structure=element)
    return binary


def _dilate(binary, radius_mm, voxel_size):
    for element in _ball_steps(radius_mm, voxel_size):
        binary = ndimage.binary_dilation(binary, structure=element)
    return binary


def otsu_threshold(values, *, n_bins=512):
    """Otsu's threshold of a 1-D sample (maximises the between-class variance).

    Parameters
    ----------
    values : array_like
        Sample (finite values are used).
    n_bins : int, optional
        Histogram bins.

    Returns
    -------
    threshold : float
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("otsu_threshold received no finite value")
    counts, edges = np.histogram(values, bins=n_bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    sum_high = sum_low[-1] - sum_low
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_low = sum_low / weight_low
        mean_high = sum_high / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.where(np.isfinite(between), between, -1.0)
    return float(edges[np.argmax(between) + 1])


def _exponents(degree):
    return [
        (i, j, total - i - j) for total in range(degree + 1) for i in range(total + 1) for j in range(total - i + 1)
    ]


class _LogPolynomial:
    """Polynomial in physical coordinates (mm), normalised for conditioning."""

    def __init__(self, degree, centre_mm, scale_mm):
        self.degree = int(degree)
        self.centre_mm = np.asarray(centre_mm, dtype=float)
        self.scale_mm = np.asarray(scale_mm, dtype=float)
        self.coefficients = np.zeros(len(_exponents(self.degree)))

    @classmethod
    def around(cls, positions_mm, degree):
        """A zero polynomial centred on, and scaled to, the points ``positions_mm`` (shape (3, n))."""
        centre = positions_mm.mean(axis=1)
        scale = np.maximum(np.abs(positions_mm - centre[:, None]).max(axis=1), 1e-3)
        return cls(degree, centre, scale)

    def design(self, positions_mm):
        u = (positions_mm - self.centre_mm[:, None]) / self.scale_mm[:, None]
        columns = [u[0] ** i * u[1] ** j * u[2] ** k for i, j, k in _exponents(self.degree)]
        return np.stack(columns, axis=-1)

    def evaluate_grid(self, shape, voxel_size, origin_mm=(0.0, 0.0, 0.0)):
        """Values on a grid whose voxel (0, 0, 0) centre is at ``origin_mm``; separable, cheap."""
        axes = [
            (o + np.arange(n) * v - c) / s
            for n, v, o, c, s in zip(shape, voxel_size, origin_mm, self.centre_mm, self.scale_mm)
        ]
        out = np.zeros(shape)
        for (i, j), group in _group_xy(_exponents(self.degree), self.coefficients).items():
            z_poly = sum(c * axes[2] ** k for k, c in group)
            out += np.multiply.outer(np.multiply.outer(axes[0] ** i, axes[1] ** j), z_poly)
        return out


def _group_xy(exponents, coefficients):
    groups = {}
    for (i, j, k), c in zip(exponents, coefficients):
        groups.setdefault((i, j), []).append((k, c))
    return groups


def sample_voxels(indices, shape, voxel_size, *, max_samples, seed=0):
    """At most ``max_samples`` of the flat voxel ``indices`` (random, sorted) and their positions (mm).

    Returns
    -------
    indices : ndarray of int
    positions : ndarray, shape (3, n)
        Voxel centres in mm (voxel (0, 0, 0) at the origin, as ``_LogPolynomial.evaluate_grid``).
    """
    if indices.size > max_samples:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_samples, replace=False))
    positions = np.array(np.unravel_index(indices, shape), dtype=float)
    positions *= np.asarray(voxel_size, dtype=float)[:, None]
    return indices, positions


def _fit_log_bias(image, mask, voxel_size, *, degree, n_iter=6, max_samples=50_000, seed=0):
    """Robust (Tukey biweight IRLS) polynomial fit to log(image) inside mask; None if too few."""
    mask = mask & (image > 0) & np.isfinite(image)
    indices = np.flatnonzero(mask)
    if indices.size < 20 * len(_exponents(degree)):
        return None
    indices, positions = sample_voxels(indices, image.shape, voxel_size, max_samples=max_samples, seed=seed)
    model = _LogPolynomial.around(positions, degree)
    design = model.design(positions)
    target = np.log(image.ravel()[indices])
    model.coefficients, _, _ = robust_linear_fit(design, target, n_iter=n_iter)
    return model


def weighted_least_squares(design, target, weights):
    """Coefficients minimising ``sum(weights * (target - design @ c)**2)``, by the normal equations.

    Meant for small, well-conditioned designs (polynomials of normalised coordinates): a Cholesky
    solve of the ``p x p`` normal equations is many times faster than an SVD of the ``n x p`` design.
    Falls back to ``lstsq`` when the normal matrix is singular.
    """
    weighted = design * weights[:, None]
    # einsum, not BLAS: multithreaded OpenBLAS slows such thin products 10-25 x on a loaded machine
    normal = np.einsum("ni,nj->ij", weighted, design)
    right = np.einsum("ni,n->i", weighted, target)
    try:
        return linalg.solve(normal, right, assume_a="pos")
    except (linalg.LinAlgError, ValueError):
        return np.linalg.lstsq(normal, right, rcond=None)[0]


def robust_linear_fit(design, target, *, n_iter=6):
    """Least squares with Tukey's biweight, iteratively reweighted (scale from the MAD).

    Parameters
    ----------
    design : ndarray, shape (n, p)
    target : ndarray, shape (n,)
    n_iter : int, optional
        Reweighting iterations.

    Returns
    -------
    coefficients : ndarray, shape (p,)
    weights : ndarray, shape (n,)
        Final biweights (0 for outliers).
    spread : float
        Robust standard deviation of the residuals (1.4826 x MAD).
    """
    weights = np.ones(target.size)
    coefficients = np.zeros(design.shape[1])
    spread = np.nan
    for _ in range(int(n_iter)):
        coefficients = weighted_least_squares(design, target, weights)
        residual = target - design @ coefficients
        residual -= np.median(residual)
        spread = 1.4826 * np.median(np.abs(residual))
        if not spread > 0:
            break
        u = residual / (4.685 * spread)
        weights = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
    return coefficients, weights, float(spread)


def fit_smooth_bias(image, mask, *, voxel_size=(1.0, 1.0, 1.0), degree=2, n_iter=6, seed=0):
    """Fit a smooth multiplicative bias ``exp(polynomial)`` to an image inside a mask.

    The log-intensities of the masked voxels are regressed on a polynomial of the physical voxel
    coordinates by iteratively reweighted least squares with Tukey's biweight (scale from the median
    absolute deviation), so tissue classes other than the dominant one act as outliers.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Positive magnitude image.
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels used in the fit.
    voxel_size : sequence of 3 floats, optional
        Voxel dimensions in mm.
    degree : int, optional
        Total polynomial degree.
    n_iter : int, optional
        Reweighting iterations.
    seed : int, optional
        Seed of the random subset (at most 50 000 voxels) used for speed.

    Returns
    -------
    bias : ndarray, shape (X, Y, Z)
        Bias field with median 1 inside the mask (ones if the mask is too small to fit).

    References
    ----------
    .. [1] Holland PW, Welsch RE. Commun Stat Theory Methods. 1977;6:813-827.
    """
    image = np.asarray(image, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    model = _fit_log_bias(image, mask, voxel_size, degree=degree, n_iter=n_iter, seed=seed)
    if model is None:
        return np.ones(image.shape)
    log_bias = model.evaluate_grid(image.shape, voxel_size)
    return np.exp(log_bias - np.median(log_bias[mask]))


def _block_average(image, factors):
    """Average non-overlapping blocks (trailing partial blocks are dropped)."""
    shape = [n // f for n, f in zip(image.shape, factors)]
    cropped = image[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    return cropped.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))


def _threshold_log_otsu(image, *, n_bins=512):
    positive = image[(image > 0) & np.isfinite(image)]
    floor = np.percentile(positive, 0.1)
    log_values = np.log(np.maximum(positive, floor))
    return float(np.exp(otsu_threshold(log_values, n_bins=n_bins)))


def _largest_component(binary):
    labels, n_labels = ndimage.label(binary)
    if n_labels == 0:
        return binary
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _opening_radius(erosion_mm, voxel_size):
    """Opening radius (mm): ``erosion_mm``, but at least 1.5 of the largest voxel dimension."""
    return max(float(erosion_mm), 1.5 * float(np.max(voxel_size)))


def air_mask(image, *, voxel_size=(1.0, 1.0, 1.0), margin_mm=5.0):
    """Voxels of air away from the head, where the magnitude is pure noise.

    Air and bone lie below a log-Otsu threshold (see :func:`brain_mask`); voxels within
    ``margin_mm`` (at least one voxel) of anything above it are dropped, which keeps ringing and
    partial volume at the head's surface out. Regions of exact zeros (background masked by the
    scanner or the converter, a zero-filled part of the field of view, :func:`zero_filled_regions`)
    are dropped too: they hold no noise, and counting them as air would make the noise level 0 or
    too low. Isolated zeros, which an integer-stored magnitude rounds low noise to, are kept.

    An image without noisy air (background zero-filled up to the head, as in skull-stripped or
    tightly masked images; or cropped to the head) has only tissue above 0, and the threshold then
    splits tissue classes: the "air" would be the darkest tissue. Air and bone are darker than a
    quarter of the head's median (the convention of :func:`check_brain_mask`), and noise in the
    air is: its median is about ``1.2 sigma`` (one channel), against ``20-100 sigma`` for tissue.
    When the median of the air found is not, the mask is empty.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Magnitude image.
    voxel_size : sequence of 3 floats
        Voxel size in mm.
    margin_mm : float
        Distance kept from the head.

    Returns
    -------
    ndarray of bool
    """
    image = np.asarray(image, dtype=np.float32)
    voxel_size = np.asarray(voxel_size, dtype=float)
    head = image > _threshold_log_otsu(image)
    air = ~_dilate(head, max(float(margin_mm), float(voxel_size.max())), voxel_size) & ~zero_filled_regions(image)
    samples = image[air & np.isfinite(image)]
    if samples.size and np.median(samples) >= _DARK_FRACTION * np.median(image[head]):
        return np.zeros(image.shape, dtype=bool)  # tissue, not noise: there is no air
    return air


def _noise_power(image, voxel_size):
    """Mean squared magnitude of the air, away from the head (0 if there is too little air).

    Outliers above 10x the median power (ghosts) are dropped. A subsample on a ~2 mm grid is
    used: plain sub-sampling, not averaging, keeps the noise statistics.
    """
    steps = [max(1, int(2.0 // v)) for v in voxel_size]
    sample = image[:: steps[0], :: steps[1], :: steps[2]]
    sample_size = np.asarray(voxel_size) * steps
    power = np.square(sample[air_mask(sample, voxel_size=sample_size)], dtype=float)
    if power.size < 100:
        return 0.0
    power = power[power <= 10.0 * np.median(power)]
    return float(power.mean()) if power.size else 0.0


def _fill_small_holes(binary, radius_mm, voxel_size):
    """Fill dark clusters smaller than a ball of ``radius_mm``, wherever they are.

    Dark speckle from noise or tissue texture would otherwise make an opening erode the whole
    tissue away; the skull, a dark shell connected over the whole head, is far larger and stays.
    """
    holes, n_holes = ndimage.label(~binary)
    if n_holes == 0:
        return binary
    sizes = np.bincount(holes.ravel())
    largest_small = 4.0 / 3.0 * np.pi * float(radius_mm) ** 3 / float(np.prod(voxel_size))
    small = sizes <= largest_small
    small[0] = False
    return binary | small[holes]


def _open_brain(candidate, radius_mm, voxel_size, *, near=None):
    """Opening by a ball that keeps the brain's eroded component (small dark holes filled first).

    The brain is the *deepest* component: the one holding the candidate voxel farthest from any
    dark voxel (largest inscribed ball). Scalp, neck fat and other extracranial tissue are layers a
    few mm to ~2 cm thick, whereas the brain is ~10 cm across, so this holds for any skull and scalp
    thickness; the largest component does not (a thick bright scalp outweighs a small eroded brain).
    With ``near`` (a region found on a coarser grid), the component overlapping it most is kept
    (the deepest if it overlaps none).

    Returns the opened region and its deep part (voxels at least half as deep as its deepest
    voxel): even when a skull too thin for this grid lets the scalp join the brain, the deep part
    of the union lies inside the brain, as long as the scalp is thinner than the brain's radius.
    """
    candidate = _fill_small_holes(candidate, radius_mm, voxel_size)
    core = _erode(candidate, radius_mm, voxel_size)
    if not core.any():
        core = candidate
    labels, n_labels = ndimage.label(core)
    depth = None
    if n_labels > 1:
        index = np.arange(1, n_labels + 1)
        score = ndimage.sum(near, labels, index) if near is not None else np.zeros(n_labels)
        if not score.max() > 0:  # no coarse guide, or it missed every component
            depth = ndimage.distance_transform_edt(candidate, sampling=voxel_size)
            score = ndimage.maximum(depth, labels, index)
        core = labels == index[int(np.argmax(score))]
    opened = _largest_component(_dilate(core, radius_mm, voxel_size) & candidate)
    if near is not None:
        return opened, None
    if depth is None:
        depth = ndimage.distance_transform_edt(candidate, sampling=voxel_size)
    deep = opened & (depth >= 0.5 * depth[opened].max())
    return opened, deep


def _local_level(image, tissue, voxel_size, sigma_mm, default):
    """Normalised convolution: Gaussian-weighted mean of ``image`` over ``tissue`` voxels."""
    sigma = np.maximum(float(sigma_mm) / np.asarray(voxel_size), 1.0)
    weight = ndimage.gaussian_filter(tissue.astype(np.float32), sigma, truncate=3.0)
    total = ndimage.gaussian_filter(np.where(tissue, image, 0.0).astype(np.float32), sigma, truncate=3.0)
    level = np.full(image.shape, default, dtype=np.float32)
    np.divide(total, weight, out=level, where=weight > 1e-3)
    return level


def _faces(volume):
    """The six faces (boundary slices) of a 3-D array."""
    return [volume[0], volume[-1], volume[:, 0], volume[:, -1], volume[:, :, 0], volume[:, :, -1]]


def _labels_on_faces(labels):
    """Labels that occur on the array's faces (sorted, may include 0)."""
    return np.unique(np.concatenate([face.ravel() for face in _faces(labels)]))


def _exterior(candidate):
    """Non-candidate voxels connected to the array border (air around the head)."""
    labels, _ = ndimage.label(~candidate)
    border_labels = _labels_on_faces(labels)
    return np.isin(labels, border_labels[border_labels > 0])


def _grow_against_outside(seed, candidate, n_steps):
    """Grow ``seed`` through ``candidate`` while the extracranial candidates grow against it.

    The outside region starts from the candidates that the seed cannot reach in ``n_steps``
    6-connected steps and that touch the air (or the array border): the scalp. Both regions then
    take, one 6-connected step at a time, the free candidates next to them; a voxel reached by both
    in the same step goes to the outside. Returns the grown brain region.
    """
    cross = ndimage.generate_binary_structure(3, 1)
    brain = seed & candidate
    reach = ndimage.binary_dilation(brain, cross, iterations=n_steps, mask=candidate)
    beyond = candidate & ~reach
    on_border = np.zeros(candidate.shape, dtype=bool)
    on_border[[0, -1]] = on_border[:, [0, -1]] = on_border[:, :, [0, -1]] = True
    touching_air = beyond & (ndimage.binary_dilation(_exterior(candidate), cross) | on_border)
    outside = ndimage.binary_dilation(touching_air, cross, iterations=-1, mask=beyond)
    for _ in range(n_steps):
        free = reach & ~brain & ~outside
        new_outside = ndimage.binary_dilation(outside, cross, mask=free) & free
        new_brain = ndimage.binary_dilation(brain, cross, mask=free) & free & ~new_outside
        if not new_brain.any():
            break
        brain |= new_brain
        outside |= new_outside
    return brain


def _upsample(coarse, factors, shape):
    """Nearest-neighbour copy of a block-averaged mask on the full grid (trailing voxels False)."""
    full = np.zeros(shape, dtype=bool)
    repeated = coarse
    for axis, factor in enumerate(factors):
        repeated = np.repeat(repeated, factor, axis)
    full[: repeated.shape[0], : repeated.shape[1], : repeated.shape[2]] = repeated
    return full


def _crop_box(region, margin, shape):
    """Slices of the bounding box of ``region`` grown by ``margin`` voxels per axis."""
    box = []
    for axis in range(3):
        hits = np.flatnonzero(np.any(region, axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin[axis], 0), min(int(hits[-1]) + 1 + margin[axis], shape[axis])))
    return tuple(box)


def brain_mask(
    image,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    erosion_mm=4.0,
    closing_mm=2.0,
    bias_degree=2,
    tissue_fraction=0.5,
    level_mm=6.0,
    threshold=None,
    return_threshold=False,
):
    """Boolean intracranial mask from a magnitude image.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Magnitude image with bright brain, dark skull and air (e.g. RSS of the first echoes of all
        flip angles). Non-finite values are treated as background.
    voxel_size : sequence of 3 floats, optional
        Voxel dimensions in mm.
    erosion_mm : float, optional
        Radius of the opening that makes the conservative seed and cuts partial-volume bridges
        between brain and scalp; the radius used is ``max(erosion_mm, 1.5 * max(voxel_size))``.
        The brain is then chosen as the deepest component, so this need not match the skull's
        thickness (tested with skulls of 2-10 mm).
    closing_mm : float, optional
        Radius of the final closing (at least one voxel; 0 disables it). It re-encloses dark
        juxtacortical lesions whose thin cover lost voxels to noise; it only adds voxels brighter
        than a quarter of the local tissue level, so bone and air in concavities stay out.
    bias_degree : int, optional
        Degree of the polynomial receive-bias model (0 disables the correction).
    tissue_fraction : float, optional
        Intracranial fraction above which a partial-volume voxel is in the mask (in (0, 1)); the
        threshold is this fraction of the local tissue level.
    level_mm : float, optional
        Width (Gaussian sigma, mm) over which the local tissue level is averaged.
    threshold : float, optional
        Fixed threshold on the noise- and bias-corrected intensity (bias normalised to median 1
        over the first-pass mask) used instead of ``tissue_fraction`` times the tissue level.
    return_threshold : bool, optional
        Also return the global threshold (``tissue_fraction`` times the median tissue level, or
        ``threshold``), in noise- and bias-corrected units.

    Returns
    -------
    mask : ndarray of bool, shape (X, Y, Z)
    threshold : float
        Only if ``return_threshold``.

    Notes
    -----
    The mask contains brain tissue, lesions, ventricles and CSF, with enclosed holes filled, and
    every partial-volume voxel whose intracranial fraction is about ``tissue_fraction`` or more;
    skull, scalp and air are excluded. See the module docstring for the method.

    References
    ----------
    .. [1] McGibney G, Smith MR. Med Phys. 1993;20:1077-1078.
    .. [2] Smith SM. Hum Brain Mapp. 2002;17:143-155.
    .. [3] Vincent L. IEEE Trans Image Process. 1993;2:176-201.
    """
    image = np.asarray(image, dtype=float)
    if image.ndim != 3:
        raise ValueError(f"image must be 3-D, got shape {image.shape}")
    voxel_size = np.asarray(voxel_size, dtype=float)
    if voxel_size.shape != (3,) or np.any(~(voxel_size > 0)):
        raise ValueError(f"voxel_size must be 3 positive values in mm, got {voxel_size}")
    if not 0 < float(tissue_fraction) < 1:
        raise ValueError(f"tissue_fraction must be in (0, 1), got {tissue_fraction!r}")
    image = np.where(np.isfinite(image), image, 0.0)
    if not np.any(image > 0):
        raise ValueError("image has no positive voxel")
    fraction = float(tissue_fraction)
    opening = _opening_radius(erosion_mm, voxel_size)

    noise_power = _noise_power(image, voxel_size)
    if noise_power > 0:
        image = np.sqrt(np.maximum(np.square(image) - noise_power, 0.0))

    # First pass on a ~3 mm grid: find the brain (not the scalp) for the bias fit and the level.
    factors = [max(1, int(_FIRST_PASS_MM // v)) for v in voxel_size]
    coarse = _block_average(image, factors) if max(factors) > 1 else image
    coarse_size = voxel_size * factors
    if threshold is None:
        rough = _threshold_log_otsu(coarse)
        coarse_level = fraction * float(np.median(coarse[coarse > rough]))
        coarse_seed, coarse_deep = _open_brain(coarse > coarse_level, opening, coarse_size)
        # The first level mixes brain with the scalp, which may be much brighter (fat): take the
        # level again from the brain alone.
        brain_level = fraction * float(np.median(coarse[coarse_seed & (coarse > coarse_level)]))
        if abs(brain_level - coarse_level) > 0.1 * coarse_level:
            coarse_level = brain_level
            coarse_seed, coarse_deep = _open_brain(coarse > coarse_level, opening, coarse_size)
    else:
        coarse_level = float(threshold)
        coarse_seed, coarse_deep = _open_brain(coarse > coarse_level, opening, coarse_size)
    coarse_tissue = ndimage.binary_erosion(coarse_seed) & (coarse > coarse_level)
    if not coarse_tissue.any():
        coarse_tissue = coarse_seed & (coarse > coarse_level)
    if not coarse_tissue.any():
        raise ValueError("no tissue found above the threshold: is this a magnitude image?")
    bias_model = None
    if bias_degree and bias_degree > 0:
        bias_model = _fit_log_bias(coarse, coarse_tissue, coarse_size, degree=int(bias_degree))
    log_bias_offset = 0.0
    if bias_model is not None:
        coarse_log_bias = bias_model.evaluate_grid(coarse.shape, coarse_size)
        log_bias_offset = float(np.median(coarse_log_bias[coarse_tissue]))
        coarse = coarse * np.exp(-(coarse_log_bias - log_bias_offset))
    tissue_level = float(np.median(coarse[coarse_tissue]))
    global_threshold = fraction * tissue_level if threshold is None else float(threshold)

    # Second pass at full resolution, in a box around the brain: everything the mask can reach
    # (growth, closing), one coarse voxel for the first pass's coarseness and a typical skull
    # thickness, so that the box edge lies in the scalp or the air, not in the skull.
    steps_growth = max(1, int(np.ceil(2.0 * opening / np.min(voxel_size))))
    margin_mm = 2.0 * opening + max(float(closing_mm), 0.0) + _FIRST_PASS_MM + _SKULL_MM
    margin = [int(np.ceil(margin_mm / v)) + 2 for v in voxel_size]
    box = _crop_box(_upsample(coarse_seed, factors, image.shape), margin, image.shape)
    local_image = image[box]
    if bias_model is not None:
        # Centre of coarse voxel 0 sits at (f - 1) / 2 fine voxels; the box starts further on.
        origin = (np.array([s.start for s in box]) - (np.asarray(factors) - 1) / 2.0) * voxel_size
        log_bias = bias_model.evaluate_grid(local_image.shape, voxel_size, origin_mm=origin)
        local_image = local_image * np.exp(-(log_bias - log_bias_offset))

    deep = _upsample(coarse_deep, factors, image.shape)[box]
    seed, _ = _open_brain(local_image > global_threshold, opening, voxel_size, near=deep)
    if threshold is None:
        tissue = ndimage.binary_erosion(seed)
        if not tissue.any():
            tissue = seed
        level = _local_level(local_image, tissue, voxel_size, level_mm, tissue_level)
        candidate = local_image >= fraction * level
    else:
        level = np.full(local_image.shape, global_threshold / fraction, dtype=np.float32)
        candidate = local_image >= global_threshold
    local_mask = _grow_against_outside(seed, candidate, steps_growth)
    local_mask = ndimage.binary_fill_holes(_largest_component(local_mask))
    if closing_mm > 0:
        pad = len(_ball_steps(closing_mm, voxel_size)) + 1
        closed = np.pad(local_mask, pad)
        closed = _erode(_dilate(closed, closing_mm, voxel_size), closing_mm, voxel_size)
        closed = closed[pad:-pad, pad:-pad, pad:-pad]
        # Dark lesions are several times brighter than bone; dents of bone or air stay out.
        local_mask |= closed & (local_image >= 0.25 * level)
        local_mask = ndimage.binary_fill_holes(local_mask)
    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = local_mask
    if return_threshold:
        return mask, global_threshold
    return mask


def _fill_holes_in_slices(binary):
    """Holes filled in 3-D and in every 2-D slice along each axis (open shells fill too).

    A hole is a connected part of the complement that does not reach the array's border; labelling
    the complement once per connectivity is much faster than ``binary_fill_holes``' propagation.
    """
    filled = binary.copy()
    structures = [ndimage.generate_binary_structure(3, 1)]
    for axis in range(3):
        in_slice = ndimage.generate_binary_structure(3, 1)
        np.moveaxis(in_slice, axis, 0)[[0, 2]] = False
        structures.append(in_slice)
    for structure in structures:
        labels, _ = ndimage.label(~binary, structure=structure)
        filled |= (labels > 0) & ~np.isin(labels, _labels_on_faces(labels))
    return filled


def _faces_touched(mask, min_fraction):
    """Number of the 6 faces of the array on which the mask covers at least ``min_fraction``."""
    return sum(np.count_nonzero(face) >= max(1.0, min_fraction * face.size) for face in _faces(mask))


def _highest_point_mm(region, affine):
    """Height (mm, along the world superior axis of a voxel-to-RAS ``affine``) of the highest voxel
    centre of ``region``, whatever the storage order or obliquity.

    The height is linear in the voxel indices, so in every column along the last axis the highest
    voxel is the column's first or last one: only those are evaluated (no full-size array).
    """
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}")
    row = affine[2]
    n_last = region.shape[2]
    if row[2] >= 0:
        last = n_last - 1 - np.argmax(region[:, :, ::-1], axis=2)
    else:
        last = np.argmax(region, axis=2)
    i, j = np.nonzero(region.any(axis=2))
    return float(np.max(row[0] * i + row[1] * j + row[2] * last[i, j]) + row[3])


def _head_above_mask_mm(mask, head, affine):
    """How far (mm) the head component holding most of the mask rises above the mask's top.

    Only the component holding the mask counts, so a marker, a ghost or a second object in the
    field of view does not.
    """
    labels, _ = ndimage.label(head | mask)
    overlap = np.bincount(labels[mask])
    overlap[0] = 0
    component = labels == int(np.argmax(overlap))
    return _highest_point_mm(component, affine) - _highest_point_mm(mask, affine)


def check_brain_mask(
    mask,
    reference,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    min_head_fraction=0.05,
    max_hollow_ratio=1.5,
    max_faces=3,
    max_dark_fraction=0.05,
    affine=None,
    max_cover_mm=50.0,
):
    """Sanity checks of a brain mask; returns the problems found (empty if none).

    A brain mask is a compact solid (filled holes), well inside the field of view or cut by it on
    a few sides only, holding a sizeable part of the head and little of the dark skull. The checks
    catch the ways an automatic mask fails: picking the scalp ring (a hollow shell), spreading over
    the background (touching the field of view all round, lying outside the head), finding a
    speck (under 5 % of the head), or swallowing the skull and scalp (many dark voxels inside, or
    one dark layer spanning the mask along every axis, as even a thin skull does). With the
    image's ``affine``, a mask low in the head is caught too: the brain is the top of the head,
    covered only by the skull and scalp, whereas a solid chunk of neck or skull base (what a head
    without a visible brain yields) has the whole cranium above it.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask to check.
    reference : ndarray, shape (X, Y, Z)
        Either the head mask (bool) or the magnitude image the mask was made from (float); the
        head is then the voxels above a log-Otsu threshold with holes filled, and the image also
        allows the dark-layer check.
    voxel_size : sequence of 3 floats, optional
        Voxel dimensions in mm (the volumes in the messages are in mL).
    min_head_fraction : float, optional
        Smallest acceptable mask volume as a fraction of the head's.
    max_hollow_ratio : float, optional
        Largest acceptable ratio of the mask's volume with its holes filled (in 3-D and in every
        slice, so that shells cut open by the field of view fill too) to its own volume.
    max_faces : int, optional
        Largest number of the six faces of the field of view the mask may cover (at least 5 % of
        the face each); a brain cut by the field of view on one side, or a slab cut at the top and
        bottom, covers one or two.
    max_dark_fraction : float, optional
        Largest acceptable fraction of mask voxels darker than a quarter of the head's median
        tissue intensity (above the log-Otsu threshold): bone and air; lesions are brighter. Only
        checked when ``reference`` is an image.
    affine : ndarray, shape (4, 4), optional
        Voxel-to-world (RAS+ mm) matrix of the image, whose third row gives each voxel's height
        along the superior axis, whatever the storage order or obliquity. Without it the
        position check is skipped.
    max_cover_mm : float, optional
        Largest acceptable height (mm, along the superior axis) of the head above the mask's
        top: the head component holding the mask (``reference``'s head, holes filled) may rise
        above a brain by its skull and scalp only (each at most 10-20 mm, plus a voxel of partial
        volume either side). A field of view cutting the brain at the top, or a skull-stripped
        input, gives about 0.

    Returns
    -------
    problems : list of str
        One sentence per failed check, with the measured value.

    Examples
    --------
    >>> import numpy as np
    >>> head = np.zeros((40, 40, 40), dtype=bool)
    >>> head[5:35, 5:35, 5:35] = True
    >>> shell = head & ~np.pad(np.ones((26, 26, 26), dtype=bool), 7)
    >>> check_brain_mask(shell, head)[0].startswith("the mask is a hollow shell")
    True
    >>> check_brain_mask(np.pad(np.ones((20, 20, 20), dtype=bool), 10), head)
    []
    """
    mask = np.asarray(mask, dtype=bool)
    reference = np.asarray(reference)
    if mask.ndim != 3 or mask.shape != reference.shape:
        raise ValueError(f"mask and reference must be 3-D arrays of one shape, got {mask.shape} and {reference.shape}")
    voxel_ml = float(np.prod(np.asarray(voxel_size, dtype=float))) / 1000.0
    image = None
    if reference.dtype == bool:
        head = reference
    else:
        image = np.where(np.isfinite(reference), reference, 0.0).astype(np.float32)
        if not np.any(image > 0):
            raise ValueError("the reference image has no positive voxel")
        tissue = image > _threshold_log_otsu(image)
        tissue_level = float(np.median(image[tissue]))
        head = ndimage.binary_fill_holes(tissue)
    n_mask = np.count_nonzero(mask)
    if n_mask == 0:
        return ["the mask is empty"]
    problems = []
    n_head = max(np.count_nonzero(head), 1)
    inside_head = np.count_nonzero(mask & head)
    if inside_head < min_head_fraction * n_head:
        problems.append(
            f"the mask holds {100.0 * inside_head / n_head:.1f} % of the head "
            f"({inside_head * voxel_ml:.0f} of {n_head * voxel_ml:.0f} mL; expected at least "
            f"{100.0 * min_head_fraction:.0f} %)"
        )
    if n_mask - inside_head > 0.5 * n_mask:
        problems.append(
            f"{100.0 * (n_mask - inside_head) / n_mask:.0f} % of the mask lies outside the head, in the background"
        )
    hollow_ratio = np.count_nonzero(_fill_holes_in_slices(mask)) / n_mask
    if hollow_ratio > max_hollow_ratio:
        problems.append(
            f"the mask is a hollow shell: filling its holes makes it {hollow_ratio:.1f} times "
            f"larger (expected at most {max_hollow_ratio:g})"
        )
    n_faces = _faces_touched(mask, 0.05)
    if n_faces > max_faces:
        problems.append(
            f"the mask touches the edge of the field of view all round ({n_faces} of 6 faces; "
            f"expected at most {max_faces})"
        )
    if affine is not None:
        cover_mm = _head_above_mask_mm(mask, head, affine)
        if cover_mm > max_cover_mm:
            problems.append(
                f"the mask lies low in the head: the head reaches {cover_mm:.0f} mm above its top "
                "(along the superior axis of the image's affine), where only the skull and scalp "
                f"lie over a brain (expected at most {max_cover_mm:g} mm): it may hold the neck or "
                "the skull base, or the header's orientation may be wrong"
            )
    if image is not None:
        # Relative to the head's tissue, not to the mask: a mask of a brainless head is mostly
        # noise, and its own median is noise too.
        dark = mask & (image < _DARK_FRACTION * tissue_level)
        dark_fraction = np.count_nonzero(dark) / n_mask
        if dark_fraction > max_dark_fraction:
            problems.append(
                f"{100.0 * dark_fraction:.0f} % of the mask is darker than a quarter of the "
                "head's tissue, like bone or air: it may hold the skull and scalp, or background"
            )
        elif dark.any():
            # A thin skull is too small a fraction of the mask, but it is one dark layer spanning
            # the mask, where dark lesions are compact and a few cm across at most.
            labels, _ = ndimage.label(dark)
            largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
            layer = ndimage.find_objects(labels)[largest - 1]
            whole = ndimage.find_objects(mask.astype(np.int8))[0]
            span = min((a.stop - a.start) / (b.stop - b.start) for a, b in zip(layer, whole))
            if span > 0.5:
                problems.append(
                    "a dark layer, like a skull, spans the mask (at least "
                    f"{100.0 * span:.0f} % of its extent along every axis): it may hold the scalp"
                )
    return problems
