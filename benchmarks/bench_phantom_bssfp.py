"""Time of the phantom's phase-cycled bSSFP volumes (all flip angles and cycles), noiseless.

Builds the truth at ``resolution / oversample`` and acquires every bSSFP volume of the default
protocol with :class:`qmri_workflows.phantom.simulate.PhantomScanner`, printing the time per
volume and in total and the peak resident memory. Run by hand, e.g.::

    python benchmarks/bench_phantom_bssfp.py --resolution 2 --oversample 2
    python benchmarks/bench_phantom_bssfp.py --resolution 1 --oversample 1 --pulse-duration 0

``--pulse-duration`` (s) overrides the protocol's RF pulse duration (0: instantaneous pulses). With
a package whose protocol has no pulse duration (before the phantom had its own bSSFP simulator) the
option is ignored, so the same script times both.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--oversample", type=int, default=2)
    parser.add_argument("--pulse-duration", type=float, default=None)
    args = parser.parse_args(argv)

    from qmri_workflows.phantom.protocol import BSSFPProtocol, Protocol
    from qmri_workflows.phantom.simulate import PhantomScanner, list_volumes
    from qmri_workflows.phantom.truth import make_phantom

    bssfp = BSSFPProtocol()
    fields = {f.name for f in dataclasses.fields(BSSFPProtocol)}
    if args.pulse_duration is not None and "pulse_duration" in fields:
        bssfp = BSSFPProtocol(pulse_duration=args.pulse_duration)
    protocol = Protocol(bssfp=bssfp, afi=None, rb1cor=None, spoiling="ideal")
    start = time.perf_counter()
    truth = make_phantom(resolution=args.resolution / args.oversample, seed=11)
    print(f"truth {args.resolution / args.oversample:g} mm {truth.pd.shape}: {time.perf_counter() - start:.1f} s")
    scanner = PhantomScanner(truth, oversample=args.oversample)
    volumes = [v for v in list_volumes(protocol) if v.kind == "bssfp"]
    total = 0.0
    for volume in volumes:
        start = time.perf_counter()
        scanner.acquire(volume)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"  {volume.entities}: {seconds:.1f} s", flush=True)
    pulse = getattr(bssfp, "pulse_duration", "n/a (closed form)")
    print(
        f"bSSFP {len(volumes)} volumes, {args.resolution:g} mm, oversample {args.oversample}, pulse {pulse} s: "
        f"{total:.1f} s; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
