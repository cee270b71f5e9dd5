"""The protocol simulator reproduces the truth exactly without noise and adds the intended noise."""

import math

import numpy as np
import pytest

from qmri_workflows.core.signal import spgr_signal
from qmri_workflows.phantom.protocol import Protocol
from qmri_workflows.phantom.simulate import (
    GYROMAGNETIC_RATIO,
    SIGNAL_SCALE,
    PhantomScanner,
    ReceiveCoils,
    block_average,
    block_majority,
    coarsen_affine,
    kspace_downsample,
    list_volumes,
    reference_sigma,
)
from qmri_workflows.phantom.truth import PhantomTruth


def sphere_truth(shape=(28, 28, 24), voxel=3.0):
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.array(shape) - 1) / 2
    i, j, k = np.indices(shape)
    x, y, z = (affine[a, a] * idx + affine[a, 3] for a, idx in enumerate((i, j, k)))
    radius = np.sqrt(x**2 + y**2 + z**2)
    dseg = np.select([radius < 18, radius < 26, radius < 30], [3, 2, 1], 0).astype(np.int16)
    table = {  # label: (R1, R2, R2*, PD, chi)
        0: (0.0, 0.0, 0.0, 0.0, 0.0),
        1: (0.24, 0.57, 1.0, 100.0, 0.0),
        2: (0.65, 10.0, 17.0, 82.0, 0.01),
        3: (1.05, 13.3, 21.0, 69.0, -0.03),
    }
    maps = {name: np.zeros(shape) for name in ("r1", "r2", "r2star", "pd", "chi")}
    for label, values in table.items():
        for name, value in zip(maps, values):
            maps[name][dseg == label] = value
    head = dseg > 0
    background = 0.4 * (z / 40.0) ** 2 + 0.1 * x / 40.0
    local = 0.02 * np.sin(x / 7.0) * head
    return PhantomTruth(
        affine=affine,
        field_strength=3.0,
        dseg=dseg,
        labels={0: "background", 1: "CSF", 2: "cortical GM", 3: "WM"},
        brain_mask=dseg >= 2,
        head_mask=head,
        b1=1.0 + 0.15 * np.cos(x / 30.0) - 0.1 * z / 40.0,
        receive=1.2 - 0.3 * (y + 40.0) / 80.0 + 0.1 * np.sin(z / 20.0),
        b0_ppm=background + local,
        background_field_ppm=background,
        local_field_ppm=local,
        phase_offset=0.5 + 0.02 * x,
        **maps,
    )


def _volume(volumes, **conditions):
    return next(
        v
        for v in volumes
        if all(
            (v.entities.get(key) if key in v.entities else getattr(v, key, None)) == value
            for key, value in conditions.items()
        )
    )


@pytest.fixture(scope="module")
def truth():
    return sphere_truth()


#: Ideal spoiling: the images are the exact signal equations of the truth (the default EPG spoiling
#: is tested in test_spoiling_simulation.py).
IDEAL = Protocol(spoiling="ideal")


@pytest.fixture(scope="module")
def volumes():
    return list_volumes(IDEAL)


def test_protocol_volume_list_matches_layout(volumes):
    kinds = [v.kind for v in volumes]
    assert kinds.count("spgr") == 16 and kinds.count("bssfp") == 8
    assert kinds.count("afi") == 2 and kinds.count("rb1cor") == 2
    bssfp_labels = sorted({v.entities["acq"] for v in volumes if v.kind == "bssfp"})
    assert bssfp_labels == ["bssfp000", "bssfp090", "bssfp180", "bssfp270"]
    first = volumes[0]
    assert first.entities == {"echo": 1, "flip": 1} and first.metadata["FlipAngle"] == 6.0
    assert first.metadata["EchoTime"] == pytest.approx(0.0023)


@pytest.mark.parametrize("n_coils", [1, 8])
def test_noiseless_gre_gives_exact_r2star_and_phase(truth, volumes, n_coils):
    scanner = PhantomScanner(truth, n_coils=n_coils)
    echo1 = _volume(volumes, kind="spgr", echo=1, flip=2)
    echo4 = _volume(volumes, kind="spgr", echo=4, flip=2)
    magnitude1, phase1 = scanner.acquire(echo1)
    magnitude4, phase4 = scanner.acquire(echo4)
    brain = truth.brain_mask
    delta_te = echo4.parameters["te"] - echo1.parameters["te"]
    r2star = np.log(magnitude1[brain] / magnitude4[brain]) / delta_te
    np.testing.assert_allclose(r2star, truth.r2star[brain], rtol=1e-9)
    # magnitude = Ernst equation x receive (coils combine to exactly the truth's receive field)
    expected = spgr_signal(
        truth.pd / 100 * truth.receive * SIGNAL_SCALE,
        truth.r1,
        truth.r2star,
        np.deg2rad(21.0),
        0.025,
        echo1.parameters["te"],
        b1=truth.b1,
    )
    np.testing.assert_allclose(magnitude1[brain], expected[brain], rtol=1e-9)
    # phase difference gives the field in Hz
    field_hz = truth.b0_ppm * 1e-6 * GYROMAGNETIC_RATIO * 3.0
    expected_phase = np.angle(np.exp(1j * (truth.phase_offset + 2 * np.pi * field_hz * echo1.parameters["te"])))
    np.testing.assert_allclose(np.exp(1j * phase1[brain]), np.exp(1j * expected_phase[brain]), atol=1e-9)
    assert np.all(np.abs(phase1) <= np.pi)


def test_noiseless_afi_ratio_gives_b1(truth, volumes):
    scanner = PhantomScanner(truth)
    s1, _ = scanner.acquire(_volume(volumes, kind="afi", acq="tr1"))
    s2, _ = scanner.acquire(_volume(volumes, kind="afi", acq="tr2"))
    brain = truth.brain_mask
    ratio, n = s2[brain] / s1[brain], 0.1 / 0.02
    b1 = np.arccos((ratio * n - 1) / (n - ratio)) / np.deg2rad(60.0)
    # the AFI formula is first order in TR/T1: < 1 % bias for brain T1 (see tests/core/test_signal.py)
    np.testing.assert_allclose(b1, truth.b1[brain], rtol=0.01)


def test_rb1cor_pair_ratio_is_receive(truth, volumes):
    scanner = PhantomScanner(truth, rb1cor_factor=1)
    head, _ = scanner.acquire(_volume(volumes, kind="rb1cor", acq="headPDw"))
    body, _ = scanner.acquire(_volume(volumes, kind="rb1cor", acq="bodyPDw"))
    brain = truth.brain_mask
    np.testing.assert_allclose(head[brain] / body[brain], truth.receive[brain], rtol=1e-12)
    coarse = PhantomScanner(truth, rb1cor_factor=2)
    low, _ = coarse.acquire(_volume(volumes, kind="rb1cor", acq="headPDw"))
    assert low.shape == (14, 14, 12)
    np.testing.assert_allclose(coarse.rb1cor_affine[:3, :3], np.diag([6.0, 6.0, 6.0]))


def test_bssfp_phase_cycles_follow_off_resonance(truth, volumes):
    scanner = PhantomScanner(truth)
    cycles = [
        scanner.acquire(_volume(volumes, kind="bssfp", acq=f"bssfp{inc:03d}", flip=1)) for inc in (0, 90, 180, 270)
    ]
    complex_cycles = np.stack([m * np.exp(1j * p) for m, p in cycles])
    brain = truth.brain_mask
    # the complex sum of four equally spaced cycles is band-free: close to the on-resonance magnitude
    # (it is the mean of the ellipse; exact only for b -> 0, here within 15 % in brain tissue)
    centre = np.abs(complex_cycles.mean(axis=0))[brain]
    magnitudes = np.stack([m for m, _ in cycles])[:, brain]
    assert np.all(centre <= magnitudes.max(axis=0) + 1e-12)
    assert np.all(centre > 0.5 * magnitudes.max(axis=0))


@pytest.mark.parametrize("n_coils", [1, 4])
def test_noise_in_air_has_the_intended_sigma(truth, volumes, n_coils):
    sigma = 2.5
    scanner = PhantomScanner(truth, n_coils=n_coils, sigma=sigma)
    magnitude, _ = scanner.acquire(volumes[0], rng=np.random.default_rng(3))
    air = ~truth.head_mask
    n_air = int(air.sum())
    # pure noise: M^2 / sigma^2 is chi-square with 2 n_coils degrees of freedom, E[M^2] = 2 n_coils sigma^2,
    # relative standard error of the mean of M^2: 1 / sqrt(n_coils n_air); allow 5 standard errors
    estimate = np.sqrt(np.mean(magnitude[air] ** 2) / (2 * n_coils))
    assert estimate == pytest.approx(sigma, rel=2.5 / math.sqrt(n_coils * n_air))
    # the Rician/chi first moment: E[M] = sigma sqrt(2) Gamma(n + 1/2) / Gamma(n)
    mean_expected = sigma * math.sqrt(2) * math.gamma(n_coils + 0.5) / math.gamma(n_coils)
    assert np.mean(magnitude[air]) == pytest.approx(mean_expected, rel=5 / math.sqrt(n_air))
    # in tissue the second moment is A^2 + 2 N sigma^2
    noiseless, _ = scanner.acquire(volumes[0], sigma=0.0)
    brain = truth.brain_mask
    excess = magnitude[brain] ** 2 - noiseless[brain] ** 2
    standard_error = np.std(excess) / math.sqrt(excess.size)
    assert abs(np.mean(excess) - 2 * n_coils * sigma**2) < 4 * standard_error


def test_noise_is_deterministic_for_a_seed(truth, volumes):
    scanner = PhantomScanner(truth, sigma=1.0, n_coils=2)
    a = scanner.acquire(volumes[3], rng=np.random.default_rng(7))
    b = scanner.acquire(volumes[3], rng=np.random.default_rng(7))
    c = scanner.acquire(volumes[3], rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="rng"):
        scanner.acquire(volumes[0])


def test_reference_sigma_definition(truth):
    protocol = IDEAL
    scanner = PhantomScanner(truth)
    sigma = reference_sigma(scanner, protocol, 50.0)
    wm = truth.dseg == 3
    expected = spgr_signal(
        truth.pd / 100 * truth.receive * SIGNAL_SCALE,
        truth.r1,
        truth.r2star,
        np.deg2rad(6.0),
        0.025,
        0.0023,
        b1=truth.b1,
    )
    assert sigma == pytest.approx(np.median(expected[wm]) / 50.0, rel=1e-12)
    assert reference_sigma(scanner, protocol, math.inf) == 0.0
    with pytest.raises(ValueError, match="snr"):
        reference_sigma(scanner, protocol, 0.0)


def test_receive_coils_combine_to_unit_rss(truth):
    coils = ReceiveCoils.around(8, truth.affine, truth.r1.shape)
    total = sum(np.abs(coils.weights(k, truth.affine, truth.r1.shape)) ** 2 for k in range(8))
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    # channels differ (a real array, not eight copies)
    w0, w1 = (np.abs(coils.weights(k, truth.affine, truth.r1.shape)) for k in (0, 5))
    assert np.max(np.abs(w0 - w1)) > 0.2


def test_block_reductions_and_affine():
    labels = np.zeros((4, 4, 2), dtype=np.int16)
    labels[:3, :, :] = 5
    labels[0, 0, 0] = 2
    coarse = block_majority(labels, 2)
    assert coarse.shape == (2, 2, 1)
    # the second row of blocks is a 4-4 tie between 5 and 0: the smaller label wins
    np.testing.assert_array_equal(coarse[:, :, 0], [[5, 5], [0, 0]])
    values = np.arange(27, dtype=float).reshape(3, 3, 3)
    averaged = block_average(values, 2)  # padded to 4 by repeating the edge
    assert averaged.shape == (2, 2, 2)
    assert averaged[0, 0, 0] == pytest.approx(values[:2, :2, :2].mean())
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    coarse_affine = coarsen_affine(affine, 2)
    # the coarse voxel 0 sits at the centre of fine voxels 0 and 1
    np.testing.assert_allclose(coarse_affine @ [0, 0, 0, 1], [0.25, 0.25, 0.25, 1])


@pytest.mark.parametrize("kspace_filter", ["none", "tukey"])
def test_kspace_crop_keeps_smooth_images_and_constants(kspace_filter):
    assert np.allclose(kspace_downsample(np.full((12, 10, 8), 3.0 + 1j), 2, kspace_filter=kspace_filter), 3.0 + 1j)
    shape, factor = (48, 40, 32), 4
    i, j, k = np.indices(shape, dtype=float)
    blob = np.exp(-(((i - 23.5) / 9) ** 2 + ((j - 19.5) / 8) ** 2 + ((k - 15.5) / 7) ** 2) / 2)
    reduced = kspace_downsample(blob, factor, kspace_filter=kspace_filter)
    # a band-limited image is sampled at the block centres: compare with the analytic blob there
    ci, cj, ck = np.indices(reduced.shape, dtype=float) * factor + (factor - 1) / 2
    at_centres = np.exp(-(((ci - 23.5) / 9) ** 2 + ((cj - 19.5) / 8) ** 2 + ((ck - 15.5) / 7) ** 2) / 2)
    np.testing.assert_allclose(reduced, at_centres, atol=0.01)
    # block averages differ from point samples by the curvature over a block (about 3 % at the peak)
    np.testing.assert_allclose(reduced.real, block_average(blob, factor), atol=0.035)


@pytest.mark.parametrize("n_coils", [1, 3])
def test_slabs_give_the_same_images_as_the_whole_grid(volumes, n_coils):
    """Slab-wise simulation (in-plane crop per slab, then the third axis) equals the 3-D crop."""
    fine = sphere_truth(shape=(30, 28, 23), voxel=1.5)  # odd sizes: edge padding on two axes
    whole = PhantomScanner(fine, oversample=2, n_coils=n_coils)
    slabs = PhantomScanner(fine, oversample=2, n_coils=n_coils, slab_voxels=30 * 28 * 3)
    assert slabs.slab_thickness == 3 and whole.slab_thickness >= 23
    volume = _volume(volumes, kind="spgr", echo=3, flip=2)
    for scanner in (whole, slabs):
        scanner.result = scanner.acquire(volume)
    np.testing.assert_allclose(slabs.result[0], whole.result[0], rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(np.exp(1j * slabs.result[1]), np.exp(1j * whole.result[1]), atol=1e-9)
    if n_coils == 1:
        from qmri_workflows.phantom.simulate import noiseless_signal

        direct = kspace_downsample(noiseless_signal(fine, volume), 2)
        np.testing.assert_allclose(slabs.result[0], np.abs(direct), rtol=1e-10, atol=1e-9)


def test_body_coil_image_carries_the_body_coil_sensitivity(truth, volumes):
    from dataclasses import replace

    x = np.indices(truth.r1.shape)[0] / truth.r1.shape[0]
    body = 1.0 + 0.03 * (x - 0.5)
    with_body = replace(truth, body_receive=body)
    scanner = PhantomScanner(with_body)
    head, _ = scanner.acquire(_volume(volumes, kind="rb1cor", acq="headPDw"))
    reference, _ = scanner.acquire(_volume(volumes, kind="rb1cor", acq="bodyPDw"))
    brain = truth.brain_mask
    # the head/body ratio is the head-coil sensitivity over the body coil's: biased by a few percent
    np.testing.assert_allclose(head[brain] / reference[brain], truth.receive[brain] / body[brain], rtol=1e-12)
    truths = dict(scanner.truth_maps(IDEAL))
    np.testing.assert_allclose(truths["RB1map-body"][brain], body[brain])
    assert "RB1map-body" not in dict(PhantomScanner(truth).truth_maps(IDEAL))


def test_interior_masks_exclude_partial_volume():
    fine = sphere_truth(shape=(56, 56, 48), voxel=1.5)
    fraction = np.ones(fine.r1.shape, dtype=np.float32)
    fraction[fine.dseg == 2] = 0.6  # the GM shell: partial volume everywhere
    fine.label_fraction = fraction
    scanner = PhantomScanner(fine, oversample=2)
    masks = scanner.interior_masks([1, 2, 3])
    coarse_dseg = block_majority(fine.dseg, 2)
    wm, eroded = masks[3]
    assert eroded and wm.any() and np.all(coarse_dseg[wm] == 3)
    # every fine voxel of an interior voxel's footprint is WM, with one voxel of margin
    from scipy import ndimage

    footprint_all_wm = block_average(fine.dseg == 3, 2) == 1
    assert np.array_equal(wm, ndimage.binary_erosion(footprint_all_wm, np.ones((3, 3, 3), bool)))
    assert not masks[2][0].any()  # impure everywhere
    assert masks[1][0].sum() < (coarse_dseg == 1).sum()


def test_tukey_filter_damps_the_far_ringing_of_an_edge():
    step = np.zeros((256, 2, 2))
    step[81:175] = 1.0
    centres = np.arange(64) * 4 + 1.5  # coarse voxel centres in fine voxels
    distance = np.minimum(np.abs(centres - 81), np.abs(centres - 175)) / 4  # coarse voxels to an edge
    expected = ((centres > 81) & (centres < 175)).astype(float)
    far = distance >= 5
    sharp = np.abs(kspace_downsample(step, 4, kspace_filter="none").real[:, 0, 0] - expected)[far].max()
    filtered = np.abs(kspace_downsample(step, 4, kspace_filter="tukey").real[:, 0, 0] - expected)[far].max()
    # plain crop: the ringing decays like 1/distance (about 1 % at 5 voxels); the filter cuts it 5x
    assert sharp > 0.005 and filtered < sharp / 5
    assert np.allclose(kspace_downsample(np.full((8, 6, 4), 2.0), 2, kspace_filter="none"), 2.0)
    with pytest.raises(ValueError, match="kspace_filter"):
        kspace_downsample(step, 2, kspace_filter="hamming")


def test_box_voxels_hold_the_mean_of_their_footprint_and_do_not_ring():
    """The default voxel integrates the complex signal over its footprint: exact partial volume."""
    rng = np.random.default_rng(0)
    fine = rng.normal(size=(12, 9, 6)) * np.exp(1j * rng.uniform(-np.pi, np.pi, size=(12, 9, 6)))
    coarse = kspace_downsample(fine, 3)
    assert coarse.shape == (4, 3, 2)
    assert np.allclose(coarse, fine.reshape(4, 3, 3, 3, 2, 3).mean(axis=(1, 3, 5)))
    step = np.zeros((256, 2, 2))
    step[81:175] = 1.0
    centres = np.arange(64) * 4 + 1.5
    far_from_edges = np.minimum(np.abs(centres - 81), np.abs(centres - 175)) >= 4
    expected = ((centres > 81) & (centres < 175)).astype(float)
    assert np.allclose(kspace_downsample(step, 4).real[:, 0, 0][far_from_edges], expected[far_from_edges])


def test_oversampled_scanner_keeps_truth_approximately(volumes):
    fine = sphere_truth(shape=(56, 56, 48), voxel=1.5)
    scanner = PhantomScanner(fine, oversample=2)
    assert scanner.shape == (28, 28, 24)
    np.testing.assert_allclose(scanner.affine, sphere_truth().affine)
    magnitude, _ = scanner.acquire(_volume(volumes, kind="spgr", echo=1, flip=1))
    truths = dict(scanner.truth_maps(IDEAL))
    interior = block_majority(fine.dseg, 2) == 3
    # deep in the WM sphere (smooth fields) the oversampled image matches the TE = 0 intercept decayed
    s0 = truths["S0map-1"]
    ratio = magnitude[interior] / (s0[interior] * np.exp(-0.0023 * truths["R2starmap"][interior]))
    assert np.median(np.abs(ratio - 1)) < 0.02
    assert truths["dseg"].shape == scanner.shape and truths["brainmask"].dtype == bool


def test_a_scanner_kept_for_the_whole_protocol_equals_a_fresh_scanner_per_volume(truth):
    """The scanner keeps the TE = 0 amplitude of an SPGR flip angle for its next echoes: changing
    flip angle, TR or MT pulse (MT-on after MT-off at the same flip index) must not reuse it, and
    neither must the TE = 0 intercepts of the truth maps."""
    from dataclasses import replace

    from qmri_workflows.phantom.protocol import MPMProtocol, VFAProtocol

    with_mtsat = replace(truth, mtsat=np.where(truth.dseg >= 2, 1.5, 0.0))
    protocol = Protocol(
        vfa=VFAProtocol(echo_times=(0.0023, 0.0046, 0.0069)), mpm=MPMProtocol(n_echoes=2), spoiling="ideal"
    )
    volumes = list_volumes(protocol)
    assert [v.parameters.get("mt_pulse") is not None for v in volumes if v.kind == "spgr"] == [False] * 6 + [True] * 2
    kept = PhantomScanner(with_mtsat, oversample=2, slab_voxels=28 * 28 * 5)
    for volume in volumes + volumes[:1]:  # back to the first flip angle at the end
        magnitude, phase = kept.acquire(volume)
        fresh_magnitude, fresh_phase = PhantomScanner(with_mtsat, oversample=2, slab_voxels=28 * 28 * 5).acquire(volume)
        np.testing.assert_array_equal(magnitude, fresh_magnitude)
        if phase is not None:
            np.testing.assert_array_equal(phase, fresh_phase)
    intercepts = {name: data for name, data in kept.truth_maps(protocol) if name.startswith("S0map")}
    fresh = {name: data for name, data in PhantomScanner(with_mtsat, oversample=2).truth_maps(protocol)}
    assert sorted(intercepts) == ["S0map-1", "S0map-2"]
    for name, data in intercepts.items():
        np.testing.assert_allclose(data, fresh[name], rtol=1e-12, atol=0)
    # and the MT-weighted echo is darker than the MT-off one of the same flip angle and echo time
    mt_off, _ = kept.acquire(_volume(volumes, kind="spgr", echo=1, flip=1, mt="off"))
    mt_on, _ = kept.acquire(_volume(volumes, kind="spgr", echo=1, flip=1, mt="on"))
    brain = block_average(truth.brain_mask, 2) >= 0.5
    assert np.all(mt_on[brain] < mt_off[brain])
