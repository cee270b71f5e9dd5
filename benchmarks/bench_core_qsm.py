"""Time and memory of the default QSM core chain on a 1 mm head-sized volume (not a test).

191 x 227 x 201 voxels, 6 echoes (TE 4-24 ms) at 3 T: an ellipsoidal brain (~1.8 M voxels) with
random susceptibility ellipsoids, air outside the head and in two cavities (+9.4 ppm relative to
tissue, edges smoothed), B0 tilted from the array's z axis, a smooth phase offset and noise; wraps
at every echo. The field is made with the discrete kernel of core.dipole (fine for timing; the
accuracy tests use closed forms). Chain: echo-referenced unwrapping (MST region growing) ->
weighted linear field fit -> V-SHARP -> non-linear TV-ADMM. Reports each step's wall and CPU time,
the peak resident memory of the process (ru_maxrss, includes the synthetic data) and the peak of
numpy allocations during the chain (tracemalloc). Run on 2 cores with::

    PYTHONPATH=. python benchmarks/bench_core_qsm.py [n_echoes] [workers]
"""

import resource
import sys
import time
import tracemalloc

import numpy as np
from scipy import ndimage

from qmri_workflows.core.dipole import forward_field
from qmri_workflows.core.qsm import (
    fit_field_linear,
    hz_to_ppm,
    invert_tv_admm,
    reference_to_region,
    remove_background_vsharp,
    unwrap_echoes,
)

SHAPE = (191, 227, 201)
B0_TESLA = 3.0
HZ_PER_PPM = 42.577478518 * B0_TESLA


def make_data(n_echoes, seed=0):
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in SHAPE], indexing="ij", sparse=True)
    brain = (x / 70) ** 2 + (y / 88) ** 2 + (z / 72) ** 2 <= 1
    head = (x / 85) ** 2 + (y / 105) ** 2 + (z / 90) ** 2 <= 1
    chi = np.where(head, 0.0, 9.4).astype(np.float32)  # air outside, relative to tissue
    chi[((x / 12) ** 2 + ((y - 97) / 7) ** 2 + ((z + 20) / 10) ** 2) <= 1] = 9.4  # sinus
    chi[(((x - 76) / 6) ** 2 + ((y + 10) / 8) ** 2 + ((z + 40) / 8) ** 2) <= 1] = 9.4  # mastoid
    for _ in range(60):
        centre = rng.uniform(-0.6, 0.6, 3) * np.array([70, 88, 72])
        axes = rng.uniform(2, 10, 3)
        inside = (
            ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2
        ) <= 1
        chi[inside] = rng.uniform(-0.1, 0.2)
    # The FFT kernel rings at sharp 9.4 ppm air boundaries (a non-harmonic 'background' of ~0.5 %
    # of the air field, as large as the local field); smooth air-tissue edges do not ring.
    air = ndimage.gaussian_filter(np.where(chi > 1, chi, 0), 1.5)
    chi = np.where(chi > 1, 0, chi) + air
    brain &= air < 0.01
    truth = np.where(brain, chi, 0).astype(np.float32)
    field_ppm = forward_field(chi, 1.0, b0_direction=(0.0, 0.2, 1.0), workers=2)
    echo_times = 4e-3 * np.arange(1, n_echoes + 1)
    offset = 1.5 * np.sin(x / 40.0) + np.cos(y / 50.0) + 0 * z
    magnitude = np.where(head, 1.0, 0.02).astype(np.float32)
    phase = np.empty(SHAPE + (n_echoes,), dtype=np.float32)
    magnitudes = np.empty(SHAPE + (n_echoes,), dtype=np.float32)
    for echo, te in enumerate(echo_times):
        signal = (magnitude * np.exp(-20 * te)) * np.exp(1j * (offset + 2 * np.pi * HZ_PER_PPM * field_ppm * te))
        signal = signal + 0.01 * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE))
        phase[..., echo] = np.angle(signal)
        magnitudes[..., echo] = np.abs(signal)
    return phase, magnitudes, echo_times, brain, truth, field_ppm


def main():
    n_echoes = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    phase, magnitude, echo_times, mask, truth, _ = make_data(n_echoes)
    print(f"{SHAPE} voxels, {n_echoes} echoes, brain {mask.sum() / 1e6:.2f} M voxels, {workers} FFT workers")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tracemalloc.start()
    times = {}
    clock = [time.perf_counter(), time.process_time()]
    start = list(clock)

    def lap(name):
        now = [time.perf_counter(), time.process_time()]
        times[name] = (now[0] - clock[0], now[1] - clock[1])
        clock[:] = now

    unwrapped = unwrap_echoes(phase, echo_times, magnitude=magnitude, mask=mask)
    lap("unwrap_echoes")
    field_hz, _, _ = fit_field_linear(unwrapped, echo_times, magnitude=magnitude, mask=mask)
    del unwrapped
    lap("fit_field_linear")
    local, eroded = remove_background_vsharp(hz_to_ppm(field_hz, B0_TESLA), mask, 1.0, workers=workers)
    lap("vsharp")
    weights = np.sqrt((magnitude**2).sum(-1))
    chi = invert_tv_admm(
        local,
        eroded,
        1.0,
        b0_direction=(0.0, 0.2, 1.0),
        weights=weights,
        phase_scale=2 * np.pi * HZ_PER_PPM * echo_times.mean(),
        workers=workers,
    )
    chi, _ = reference_to_region(chi, eroded, mask=eroded)
    lap("tv_admm")
    times["total"] = (clock[0] - start[0], clock[1] - start[1])
    peak_traced = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # CPU time (all threads) shows what the chain costs when other processes share the cores.
    print(f"{'step':18s} {'wall':>8s} {'CPU':>8s}")
    for name, (wall, cpu) in times.items():
        print(f"{name:18s} {wall:6.1f} s {cpu:6.1f} s")
    print(
        f"peak numpy allocations during the chain {peak_traced:.2f} GiB; process peak RSS "
        f"{rss:.2f} GiB (before the chain {rss_before:.2f} GiB, incl. synthetic data)"
    )
    reference = truth - truth[eroded].mean()
    error = 100 * np.linalg.norm((chi - reference)[eroded]) / np.linalg.norm(reference[eroded])
    print(
        f"susceptibility NRMSE in the eroded mask {error:.0f} % (benchmark phantom, discrete "
        "forward model; accuracy is tested in tests/core/qsm)"
    )


if __name__ == "__main__":
    main()
