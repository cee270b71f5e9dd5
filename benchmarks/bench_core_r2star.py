"""Timing and memory of the R2* core on a whole-brain-sized problem (not a test).

1.5 million voxels x 2 contrasts x 8 echoes, float32, Rician noise; tissue-like R2* (10-60 1/s) and
first-echo SNR 30-100. Reports wall time, peak extra memory (tracemalloc, numpy allocations) and the
R2* error against the truth for each estimator, with and without the standard error of R2* (what the
App computes). Run with::

    PYTHONPATH=. python benchmarks/bench_core_r2star.py [n_voxels]
"""

import sys
import time
import tracemalloc

import numpy as np

from qmri_workflows.core.crlb import estatics_crlb
from qmri_workflows.core.r2star import fit_estatics


def make_data(n_voxels, seed=0):
    rng = np.random.default_rng(seed)
    echo_times = np.linspace(2.3e-3, 18.4e-3, 8)
    r2star = rng.uniform(10.0, 60.0, n_voxels)
    first_echo_snr = rng.uniform(30.0, 100.0, n_voxels)
    s0 = first_echo_snr[:, None] * np.array([1.0, 0.6]) * np.exp(r2star[:, None] * echo_times[0])
    signals = np.empty((n_voxels, 2, 8), dtype=np.float32)
    for start in range(0, n_voxels, 250_000):
        stop = min(start + 250_000, n_voxels)
        amplitude = s0[start:stop, :, None] * np.exp(-r2star[start:stop, None, None] * echo_times)
        noise = rng.normal(size=(2,) + amplitude.shape)
        signals[start:stop] = np.hypot(amplitude + noise[0], noise[1])
    return signals, echo_times, s0, r2star


def run(label, function):
    # tracemalloc sees numpy's allocations; it slows the run by a few percent.
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    result = function()
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - baseline
    tracemalloc.stop()
    return label, elapsed, peak / 2**30, result


def main():
    n_voxels = int(sys.argv[1]) if len(sys.argv) > 1 else 1_500_000
    signals, echo_times, s0, r2star = make_data(n_voxels)
    bound = estatics_crlb(s0, r2star, echo_times, 1.0)
    size_mib = signals.nbytes / 2**20
    print(f"{n_voxels} voxels x 2 contrasts x 8 echoes, float32 input ({size_mib:.0f} MiB)")
    cases = []
    for n_jobs in (1, 2):
        cases += [
            (
                f"WLS, {n_jobs} thread(s)",
                lambda n=n_jobs: fit_estatics(signals, echo_times, n_jobs=n),
            ),
            (
                f"NLS Gaussian, {n_jobs} thread(s)",
                lambda n=n_jobs: fit_estatics(signals, echo_times, method="nls", n_jobs=n),
            ),
            (
                f"NLS Rician floor, {n_jobs} thread(s)",
                lambda n=n_jobs: fit_estatics(signals, echo_times, method="nls", sigma=1.0, n_jobs=n),
            ),
            (
                f"WLS + standard error, {n_jobs} thread(s)",
                lambda n=n_jobs: fit_estatics(signals, echo_times, n_jobs=n, return_stderr=True),
            ),
            (
                f"NLS floor + std. error, {n_jobs} thread(s)",
                lambda n=n_jobs: fit_estatics(
                    signals, echo_times, method="nls", sigma=1.0, n_jobs=n, return_stderr=True
                ),
            ),
        ]
    for label, function in cases:
        label, elapsed, peak_gib, (_, estimate, *_) = run(label, function)
        z = (estimate - r2star) / bound
        print(
            f"{label:30s} {elapsed:6.2f} s  peak extra {peak_gib:5.2f} GiB  "
            f"mean error {np.mean(estimate - r2star):+.4f} 1/s  SD/CRLB {np.std(z):.3f}"
        )


if __name__ == "__main__":
    main()
