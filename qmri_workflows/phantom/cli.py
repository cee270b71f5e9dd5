"""``qmri-phantom``: write the digital MS-brain phantom as a raw BIDS dataset.

Example::

    qmri-phantom bids_example --resolution 4 --snr 60 --subjects 2 --seed 42 --dtype int16 --oversample 2

The output is deterministic for a seed (image data; gzip headers carry a time stamp).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

from qmri_workflows import __version__

__all__ = ["build_parser", "main"]


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _finite_positive_float(text):
    value = _positive_float(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def build_parser():
    """Argument parser of ``qmri-phantom``."""
    parser = argparse.ArgumentParser(
        prog="qmri-phantom",
        description="Simulate the qmri-workflows digital MS-brain phantom (multi-echo VFA, phase-cycled "
        "bSSFP, AFI, receive-field pair) and write it as a raw BIDS dataset with its ground "
        "truth in derivatives/phantom.",
        epilog="The dataset is written to a temporary folder next to OUTPUT_DIR and renamed at the end.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="dataset folder to create")
    parser.add_argument(
        "--resolution",
        type=_finite_positive_float,
        default=1.0,
        metavar="MM",
        help="isotropic voxel size in mm (default: %(default)s)",
    )
    parser.add_argument(
        "--snr",
        type=_positive_float,
        default=math.inf,
        metavar="SNR",
        help="white-matter SNR of echo 1 of the lowest-flip-angle VFA image; 'inf' for noiseless data (default: inf)",
    )
    parser.add_argument(
        "--subjects",
        type=_positive_int,
        default=1,
        metavar="N",
        help="number of subjects: sub-01 patient, sub-02 control, alternating (default: 1)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        metavar="S",
        help="random seed of anatomy, fields and noise (default: 0)",
    )
    parser.add_argument(
        "--field-strength",
        type=_finite_positive_float,
        default=3.0,
        metavar="T",
        help="main field in tesla (default: %(default)s)",
    )
    parser.add_argument(
        "--n-coils",
        type=_positive_int,
        default=1,
        metavar="N",
        help="receive channels; 1 gives Rician magnitude, more root-sum-of-squares (default: 1)",
    )
    parser.add_argument(
        "--oversample",
        type=_positive_int,
        default=2,
        metavar="K",
        help="simulate on a K times finer grid and reduce it to the target grid, so the images "
        "have partial volume and intravoxel dephasing; 1 makes the truth the exact "
        "inverse of the signal model (fast tests). Memory grows as K^3 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--kspace-filter",
        choices=("box", "tukey", "none"),
        default="box",
        help="how a voxel forms from the K^3 finer ones when K > 1: 'box' averages the "
        "signal over its footprint (partial volume and intravoxel dephasing, no "
        "ringing); 'tukey' and 'none' crop k-space with and without a "
        "reconstruction filter (default: %(default)s)",
    )
    parser.add_argument(
        "--noise-gfactor",
        type=float,
        default=0.0,
        metavar="PEAK",
        help="spatially varying noise: a smooth g-factor map rising to 1 + PEAK near the centre of "
        "the field of view (0.5: 50 %% more noise); the true noise SD map goes to the truth folder "
        "(default: %(default)s, uniform noise)",
    )
    parser.add_argument(
        "--spoiling",
        choices=("epg", "ideal"),
        default="epg",
        help="how the spoiled sequences (VFA, AFI, RB1COR) spoil: 'epg' simulates the RF phase "
        "schedule, spoiler and diffusion by extended phase graphs, as a scanner spoils; 'ideal' uses "
        "the ideal-spoiling (Ernst) equations (default: %(default)s)",
    )
    parser.add_argument(
        "--mpm",
        action="store_true",
        help="write the VFA pair as an hMRI-style multi-parameter-mapping collection (anat/*_acq-PDw_..._mt-off_MPM, "
        "*_acq-T1w_..._mt-off_MPM) and add an MT-weighted contrast (*_acq-MTw_..._mt-on_MPM) with its MTsat truth",
    )
    parser.add_argument(
        "--b1-method",
        choices=("afi", "dam", "tfl", "tfl-vb"),
        default="afi",
        help="how B1+ is mapped: an AFI pair (fmap/*_acq-tr1|tr2_TB1AFI), a double-angle pair at 60 and 120 deg, "
        "TR 2 s (fmap/*_flip-1|2_TB1DAM), or a Siemens tfl_b1map with an 80 deg preparation "
        "(fmap/*_acq-anat|famp_TB1TFL) whose sidecar FlipAngle is the 8 deg readout angle as VE/XA software "
        "writes it (tfl: the App needs --tb1tfl-prep-angle 80) or the preparation angle as VB writes it "
        "(tfl-vb) (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "int16"),
        default="float32",
        help="storage of the raw images; int16 uses a scale slope (default: float32)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (after the new dataset is complete)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s (qmri-workflows) {__version__}")
    return parser


def main(argv=None):
    """Run ``qmri-phantom``; returns the exit status (0 on success, 1 on failure, 2 on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    arguments = sys.argv[1:] if argv is None else list(argv)
    if not any(argument.startswith("--oversample") for argument in arguments):
        # the recorded command must reproduce the data even if the default changes again
        arguments += ["--oversample", str(args.oversample)]
    if not any(argument.startswith("--spoiling") for argument in arguments):
        arguments += ["--spoiling", args.spoiling]
    command = shlex.join(["qmri-phantom", *arguments])
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import AFIProtocol, DAMProtocol, MPMProtocol, Protocol, TFLProtocol

    start = time.perf_counter()
    try:
        path = write_phantom_dataset(
            args.output_dir,
            resolution=args.resolution,
            snr=args.snr,
            subjects=args.subjects,
            seed=args.seed,
            field_strength=args.field_strength,
            n_coils=args.n_coils,
            oversample=args.oversample,
            dtype=args.dtype,
            overwrite=args.overwrite,
            command=command,
            kspace_filter=args.kspace_filter,
            noise_gfactor=args.noise_gfactor,
            protocol=Protocol(
                spoiling=args.spoiling,
                mpm=MPMProtocol() if args.mpm else None,
                afi=AFIProtocol() if args.b1_method == "afi" else None,
                dam=DAMProtocol() if args.b1_method == "dam" else None,
                tfl=(
                    TFLProtocol(sidecar_angle="preparation" if args.b1_method == "tfl-vb" else "readout")
                    if args.b1_method.startswith("tfl")
                    else None
                ),
            ),
        )
    except FileExistsError:
        # the library's message names its keyword argument; here the user needs the flag
        print(
            f"qmri-phantom: error: {args.output_dir} exists and is not empty; choose another folder "
            "or pass --overwrite",
            file=sys.stderr,
        )
        return 1
    except (ValueError, OSError) as error:
        print(f"qmri-phantom: error: {error}", file=sys.stderr)
        return 1
    print(f"qmri-phantom: wrote {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
