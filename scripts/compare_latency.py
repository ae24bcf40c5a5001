"""Time TFLite files against each other: python scripts/compare_latency.py RUN_DIR [RUN_DIR ...]

For each run directory, baseline.tflite and model.tflite are timed in turn (batch 1, best of
5 medians), and the latency ratio is printed. Logic lives in pocketflow.export.compare_latency.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow.export import compare_latency, runtime_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories holding baseline.tflite and model.tflite")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"runtime: {runtime_name()}, {args.threads} thread(s), batch 1")
    for run in args.runs:
        baseline, model = Path(run) / "baseline.tflite", Path(run) / "model.tflite"
        timings = compare_latency([baseline, model], rounds=args.rounds, threads=args.threads)
        base_ms, model_ms = timings[str(baseline)], timings[str(model)]
        print(f"{run}: baseline {base_ms:.3f} ms, model {model_ms:.3f} ms, ratio {base_ms / model_ms:.2f}x")


if __name__ == "__main__":
    main()
