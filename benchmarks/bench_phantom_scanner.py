"""Time of the phantom's protocol simulator on the 1 mm patient (not a test).

Builds the 1 mm patient (``make_phantom``, timed) and simulates the noiseless VFA protocol (2 flip
angles x 8 echoes) with ``PhantomScanner`` at ``oversample`` 1, then the TE = 0 intercepts of the
truth maps, with ideal and with EPG spoiling. Reports wall and CPU time per step and the peak
resident memory. The SPGR echoes of a flip angle share their TE = 0 amplitude
(``simulate.spgr_amplitude``), so an echo costs its R2* decay and off-resonance phase only. Run on
2 cores with::

    PYTHONPATH=. python benchmarks/bench_phantom_scanner.py [resolution_mm]
"""

import resource
import sys
import time

from qmri_workflows.phantom.protocol import Protocol
from qmri_workflows.phantom.simulate import PhantomScanner, list_volumes
from qmri_workflows.phantom.truth import make_phantom


def timed(label, function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    print(f"{label:<40s} wall {time.perf_counter() - wall:6.1f} s   cpu {time.process_time() - cpu:6.1f} s", flush=True)
    return result


def simulate(truth, spoiling):
    protocol = Protocol(bssfp=None, afi=None, rb1cor=None, spoiling=spoiling)
    volumes = list_volumes(protocol)
    scanner = PhantomScanner(truth)
    if spoiling == "epg":  # the EPG tables are built once per process: time them apart
        timed("EPG tables + first echo", lambda: scanner.acquire(volumes[0], sigma=0.0))
        volumes = volumes[1:]
    label = f"{len(volumes)} VFA volumes, {spoiling} spoiling"
    timed(label, lambda: [scanner.acquire(volume, sigma=0.0) for volume in volumes])
    timed("truth maps (incl. TE = 0 intercepts)", lambda: list(scanner.truth_maps(protocol)))


def main(resolution=1.0):
    truth = timed(f"make_phantom at {resolution:g} mm", lambda: make_phantom(resolution=resolution, seed=11))
    print(f"grid {truth.shape} ({truth.pd.size / 1e6:.1f} M voxels)")
    for spoiling in ("ideal", "epg"):
        simulate(truth, spoiling)
    print(f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)
