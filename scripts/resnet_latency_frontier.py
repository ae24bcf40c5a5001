"""The fewest MACs removed for a predicted latency ratio, over per-stage widths of a CIFAR ResNet.

    python scripts/resnet_latency_frontier.py MODEL.h5 [--latency 2.0] [--macs 2.5]

For the shared ResNet-20/56 (groups named conv1, layerS.B.conv1, layerS.0.conv2[a:b]): every
combination of one width per kind of group (the stem's stream; each stage's inner width; each
stage's stream bands) is priced with ``ChannelAnalysis.latency_for`` on this machine's cached
width curve (``pocketflow.width_cost``, measured on first use), and the script prints the
combinations with the least MAC speedup that reach ``--latency``, and the fastest ones within
5% above ``--macs`` fewer MACs. Prediction only: no file is built.
"""

import argparse
import itertools
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()

import tensorflow as tf  # noqa: E402

from learners.channel_pruning.graph import analyze  # noqa: E402
from pocketflow import width_cost  # noqa: E402
from pocketflow.baseline import cache_directory  # noqa: E402


def kind_of(group: str) -> str:
    """conv1 -> stem; layer2.3.conv1 -> inner2; layer2.0.conv2[0:8] -> bands2."""
    match = re.match(r"layer(\d+)\.\d+\.conv(\d)", group)
    if not match:
        return "stem"
    return ("inner" if match.group(2) == "1" else "bands") + match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--macs", type=float, default=2.5)
    parser.add_argument("--show", type=int, default=5)
    args = parser.parse_args()
    cost = width_cost.cached(cache_directory())
    analysis = analyze(tf.keras.models.load_model(args.model, compile=False))
    kinds = {}
    for name, group in analysis.groups.items():
        kinds.setdefault(kind_of(name), []).append((name, group.channels))
    options = {kind: list(range(4, max(c for _, c in members) + 1, 4)) for kind, members in kinds.items()}
    full = analysis.latency_for({}, cost)
    rows = []
    for choice in itertools.product(*options.values()):
        widths = dict(zip(options, choice))
        counts = {name: min(channels, widths[kind]) for kind, members in kinds.items() for name, channels in members}
        rows.append((analysis.total_macs / analysis.macs_for(counts), full / analysis.latency_for(counts, cost),
                     widths))
    print(f"{len(rows)} combinations of {', '.join(options)}; width curve: {cost.runtime}")
    fast = sorted((row for row in rows if row[1] >= args.latency), key=lambda row: row[0])
    print(f"least MAC speedup with a predicted latency ratio >= {args.latency}:")
    for macs, latency, widths in fast[:args.show]:
        print(f"  MACs {macs:.2f}x, latency {latency:.2f}x: {widths}")
    near = sorted((row for row in rows if args.macs <= row[0] <= 1.05 * args.macs), key=lambda row: -row[1])
    print(f"fastest with {args.macs}x to {1.05 * args.macs:.3g}x fewer MACs:")
    for macs, latency, widths in near[:args.show]:
        print(f"  MACs {macs:.2f}x, latency {latency:.2f}x: {widths}")


if __name__ == "__main__":
    main()
