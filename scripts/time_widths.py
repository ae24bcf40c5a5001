"""What each output width of a convolution costs in the TFLite runtime on this machine.

    python scripts/time_widths.py [--widths 4 8 ... 64] [--threads 1] [--rounds 3]

Times pocketflow.width_cost's probe (eight 3x3 convolutions side by side on a 16x16x32 input, float,
batch 1) at every width, the files in turn, and prints the milliseconds and the effective width (what
the width costs, in channels of the widest probe). The channel learner measures the same curve once
per machine for a latency target (--target-latency-speedup) and caches it.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()

from pocketflow import width_cost  # noqa: E402
from pocketflow.export import runtime_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=list(width_cost.PROBE_WIDTHS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["float", "int8"], default="float",
                        help="int8: the probe quantized (the latency target plans on float files)")
    args = parser.parse_args()
    cost = width_cost.measure(widths=sorted(args.widths), rounds=args.rounds, threads=args.threads, mode=args.mode)
    print(f"runtime: {runtime_name()}, {args.mode} files, {args.threads} thread(s), batch 1")
    print("| output channels | ms | effective channels |")
    print("|---|---|---|")
    for width, milliseconds in zip(cost.widths, cost.milliseconds):
        print(f"| {width} | {milliseconds:.3f} | {cost(width):.1f} |")


if __name__ == "__main__":
    main()
