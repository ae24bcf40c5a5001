"""Time TFLite files against each other: python scripts/compare_latency.py RUN_DIR [RUN_DIR ...]

For each run directory, its files (default baseline.tflite and model.tflite; ``--files`` names others,
e.g. a chain's stage1_float.tflite and ptq_int8.tflite) are timed in turn (batch 1, best of the rounds'
medians), and each file's latency ratio against the first is printed. Logic lives in
pocketflow.export.compare_latency.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr

from pocketflow.export import compare_latency, runtime_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories holding the files")
    parser.add_argument("--files", nargs="+", default=["baseline.tflite", "model.tflite"], metavar="NAME",
                        help="file names inside each run directory; ratios are against the first "
                             "(default: baseline.tflite model.tflite)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if len(args.files) < 2:
        parser.error("--files needs at least two names: the reference, then what is timed against it")
    print(f"runtime: {runtime_name()}, {args.threads} thread(s), batch 1")
    for run in args.runs:
        paths = [Path(run) / name for name in args.files]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            parser.error(f"{', '.join(missing)} not found; name files the run directory holds with --files")
        timings = compare_latency(paths, rounds=args.rounds, threads=args.threads)
        reference_ms = timings[str(paths[0])]
        cells = [f"{path.name} {timings[str(path)]:.3f} ms" + ("" if index == 0 else
                                                                f" ({reference_ms / timings[str(path)]:.2f}x)")
                 for index, path in enumerate(paths)]
        print(f"{run}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
