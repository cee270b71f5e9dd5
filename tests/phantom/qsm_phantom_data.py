"""Multi-echo GRE data of the MS-brain phantom for the QSM acceptance tests and benchmark.

The phantom is built ``oversample`` times finer than the data (its B0 field computed there with the
continuous dipole kernel and cropped in k-space to the data grid, see
:mod:`qmri_workflows.phantom.fields`), every echo of both VFA flip angles is simulated on the fine
grid (phase offset, wraps at every echo, intravoxel dephasing) and reduced to the data grid, and
complex noise gives an SNR of ``snr`` in white matter at the first echo of the lower flip angle.

With ``b0_tilt_degrees`` the main field is not along a grid axis: the data affine is the
axis-aligned phantom grid rotated into a scanner frame whose z axis (B0) is the tilted direction, so
the QSM core must take B0 from the affine (an oblique slab).
"""

import numpy as np
from scipy.spatial.transform import Rotation

from qmri_workflows.phantom.protocol import Protocol
from qmri_workflows.phantom.simulate import (
    PhantomScanner,
    block_average,
    block_majority,
    list_volumes,
    reference_sigma,
)
from qmri_workflows.phantom.truth import make_phantom


def tilted_direction(tilt_degrees, azimuth_degrees=30.0):
    """Unit vector at ``tilt_degrees`` from the grid's third axis."""
    tilt, azimuth = np.radians(tilt_degrees), np.radians(azimuth_degrees)
    return np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])


def scanner_affine(grid_affine, b0_direction):
    """The grid's affine rotated so that the scanner z axis is ``b0_direction`` in voxel axes."""
    rotation, _ = Rotation.align_vectors([[0.0, 0.0, 1.0]], [b0_direction])
    affine = np.asarray(grid_affine, float).copy()
    affine[:3] = rotation.as_matrix() @ affine[:3]
    return affine


def phantom_gre(*, resolution=2.0, oversample=2, snr=100.0, b0_tilt_degrees=0.0, seed=0):
    """Simulate the phantom's multi-echo GRE (magnitude and phase) with its truth.

    Returns
    -------
    dict
        ``affine`` (scanner frame), ``b0_direction`` (voxel axes), ``field_strength`` (T),
        ``echo_times`` (s), ``flip_angles`` (deg), ``magnitude`` and ``phase``: lists per flip angle
        of arrays (X, Y, Z, echoes) float32; truth on the data grid: ``chi``, ``local_field`` and
        ``total_field`` (ppm), ``brain_mask``, ``dseg``, ``labels``.
    """
    direction = tilted_direction(b0_tilt_degrees)
    truth = make_phantom(resolution=resolution / oversample, seed=seed, b0_direction=direction)
    scanner = PhantomScanner(truth, oversample=oversample)
    protocol = Protocol(bssfp=None, afi=None, rb1cor=None)
    scanner.sigma = reference_sigma(scanner, protocol, snr)
    rng = np.random.default_rng(seed + 11)
    volumes = [v for v in list_volumes(protocol) if v.kind == "spgr"]
    n_flips, n_echoes = len(protocol.vfa.flip_angles), len(protocol.vfa.echo_times)
    magnitude = [np.empty(scanner.shape + (n_echoes,), np.float32) for _ in range(n_flips)]
    phase = [np.empty(scanner.shape + (n_echoes,), np.float32) for _ in range(n_flips)]
    for volume in volumes:
        flip, echo = volume.entities["flip"] - 1, volume.entities["echo"] - 1
        magnitude[flip][..., echo], phase[flip][..., echo] = scanner.acquire(volume, rng=rng)
    factor = oversample
    return dict(
        affine=scanner_affine(scanner.affine, direction),
        b0_direction=tuple(direction),
        field_strength=truth.field_strength,
        echo_times=tuple(protocol.vfa.echo_times),
        flip_angles=tuple(protocol.vfa.flip_angles),
        magnitude=magnitude,
        phase=phase,
        chi=block_average(truth.chi, factor).astype(np.float32),
        local_field=block_average(truth.local_field_ppm, factor).astype(np.float32),
        total_field=block_average(truth.b0_ppm, factor).astype(np.float32),
        phase_offset=block_average(truth.phase_offset, factor).astype(np.float32),
        brain_mask=block_average(truth.brain_mask, factor) >= 0.5,
        dseg=block_majority(truth.dseg, factor),
        labels=dict(truth.labels),
        sigma=scanner.sigma,
        chi_fine=truth.chi,
        brain_mask_fine=truth.brain_mask,
        fine_voxel_size=resolution / oversample,
        oversample=oversample,
    )


def local_field_of_region(data, region, *, demean=True):
    """True local field (ppm, data grid) of ``region`` (a data-grid mask): the textbook definition.

    The local field of a region is the field of the susceptibility sources inside it (Schweser 2011,
    Liu 2011, Zhou 2014); everything outside it (air, skull, scalp, and brain tissue or veins that the
    QSM mask left out) is background, whose field is harmonic inside the region. The sources are the
    phantom's fine voxels that lie in ``region`` *and* in the phantom's own intracranial mask: the
    data-grid region, brought to the fine grid, also covers fine voxels of skull (-2 ppm) at its
    edge, whose field is not the brain's (counting them changed this truth by about 50 % of its norm
    on the 2 mm phantom). With ``demean`` the region's mean susceptibility is removed first: chi is
    known up to a constant, and the field of a uniform region is harmonic inside it, so no
    background removal can tell it from the background. Computed from the fine map with the
    phantom's own field model: the field at every fine voxel, as the phantom's B0
    (:func:`~qmri_workflows.phantom.fields.fine_grid_field`), averaged over each data voxel, as the
    simulated signal is.
    """
    from qmri_workflows.phantom.fields import fine_grid_field
    from qmri_workflows.phantom.truth import field_grid_factor

    factor = data["oversample"]
    chi = data["chi_fine"]
    fine_region = np.repeat(np.repeat(np.repeat(region, factor, 0), factor, 1), factor, 2)
    fine_region = fine_region[: chi.shape[0], : chi.shape[1], : chi.shape[2]] & data["brain_mask_fine"]
    if demean:
        chi = chi - np.float32(chi[fine_region].mean())
    field = fine_grid_field(
        np.where(fine_region, chi, 0),
        data["fine_voxel_size"],
        field_grid_factor(data["fine_voxel_size"]),
        b0_direction=data["b0_direction"],
    )
    return block_average(field, factor).astype(np.float32)[: region.shape[0], : region.shape[1], : region.shape[2]]


def write_gre(data, folder):
    """Write the echoes as NIfTI (scanner-frame affine) and the brain mask; inputs of ``TotalField``."""
    import nibabel as nib

    files = dict(magnitude_files=[], phase_files=[], phase_scales=[], echo_times=[], flip_angles=[])
    for flip, flip_angle in enumerate(data["flip_angles"]):
        for echo, te in enumerate(data["echo_times"]):
            for part, series in (("mag", data["magnitude"]), ("phase", data["phase"])):
                path = folder / f"flip-{flip + 1}_echo-{echo + 1}_part-{part}.nii"
                nib.save(nib.Nifti1Image(series[flip][..., echo], data["affine"]), path)
                files["magnitude_files" if part == "mag" else "phase_files"].append(str(path))
            files["phase_scales"].append(1.0)
            files["echo_times"].append(float(te))
            files["flip_angles"].append(float(flip_angle))
    mask_file = folder / "brain_mask.nii"
    nib.save(nib.Nifti1Image(data["brain_mask"].astype(np.uint8), data["affine"]), mask_file)
    return files, str(mask_file)


def run_total_field(files, mask_file, folder):
    """The App's first two QSM nodes: total field and QSM mask (interfaces, default settings)."""
    from qmri_workflows.interfaces import qsm

    total = qsm.TotalField(**files, mask_file=mask_file).run(cwd=str(_folder(folder, "total"))).outputs
    mask = qsm.QSMMask(mask_file=mask_file, magnitude_file=total.magnitude_file, field_sd_file=total.field_sd_file).run(
        cwd=str(_folder(folder, "mask"))
    )
    return total, mask.outputs.out_mask


def run_local_field(total, qsm_mask, folder, method="vsharp", threads=2):
    """Background removal node: (local field file in Hz, local mask file)."""
    from qmri_workflows.interfaces import qsm

    local = qsm.RemoveBackground(
        field_file=total.field_file,
        mask_file=qsm_mask,
        magnitude_file=total.magnitude_file,
        method=method,
        num_threads=threads,
    ).run(cwd=str(_folder(folder, f"background-{method}")))
    return local.outputs.local_field_file, local.outputs.local_mask_file


def run_inversion(total, local_field_file, local_mask_file, field_strength, folder, method="tv", threads=2):
    """Dipole inversion and whole-brain referencing nodes: the referenced chi file."""
    from qmri_workflows.interfaces import qsm

    cwd = _folder(folder, f"inversion-{method}-{abs(hash(local_field_file))}")
    chi = qsm.InvertDipole(
        local_field_file=local_field_file,
        mask_file=local_mask_file,
        magnitude_file=total.magnitude_file,
        field_strength=field_strength,
        mean_echo_time=total.mean_echo_time,
        method=method,
        num_threads=threads,
    ).run(cwd=str(cwd))
    referenced = qsm.ReferenceSusceptibility(chi_file=chi.outputs.chi_file, mask_file=local_mask_file).run(
        cwd=str(_folder(cwd, "reference"))
    )
    return referenced.outputs.chi_file


def _folder(parent, name):
    path = parent / name
    path.mkdir(parents=True, exist_ok=True)
    return path
