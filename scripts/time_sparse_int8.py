"""Which sparse TFLite encodings the runtime accelerates: one model with magnitude zeros, its sparse
files in float, dynamic-range int8 and full-integer int8 (weight-sparse's ``int8_mode``), and the
same model's dense files for reference.

    python scripts/time_sparse_int8.py --config configs/resnet20_cifar10.yaml \
        --model ../shared/data/pretrained/resnet20_cifar10.h5 --data-dir ../shared/data/cifar10 [--sparsity 0.6]

Zeros are one-shot, per kernel (the smallest magnitudes of every Conv/Dense kernel), without
training: the point is the files, not the accuracy; each int8 file's accuracy is set against the
float sparse model's. Prints per file: bytes, test accuracy, batch-1 latency on one thread (the
files timed in turn, best of ``--rounds`` medians) and the default delegate's partitions and
fallback ops.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import yaml  # noqa: E402

from learners import LEARNERS  # noqa: E402
from learners.weight_sparsification.artifact import sparse_tflite  # noqa: E402
from pocketflow.config import build_run_config  # noqa: E402
from pocketflow.data import load_dataset  # noqa: E402
from pocketflow.export import (  # noqa: E402
    TFLiteModel, compare_latency, convert, delegation_of_file, runtime_name, tflite_accuracy,
)
from pocketflow.model_io import load_user_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a recipe file naming the model and the data")
    parser.add_argument("--model", help="overrides the recipe's model")
    parser.add_argument("--data-dir", help="overrides the recipe's data.dir")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--protect", choices=["none", "first", "last", "both"], default="none",
                        help="keep the first convolution and/or the last dense layer dense (weight-sparse.protect)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", help="directory for the files (default: a temporary one)")
    args = parser.parse_args()

    raw = yaml.safe_load(Path(args.config).read_text())
    raw["model"] = args.model or raw["model"]
    if args.data_dir:
        raw.setdefault("data", {})["dir"] = args.data_dir
    raw["learner"] = "full-prec"
    config = build_run_config(raw, LEARNERS.names(), args.config)
    dataset = load_dataset(config.data, config.seed)
    model = load_user_model(raw["model"])
    prunable = [layer for layer in model.layers if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))]
    kept = {"none": [], "first": prunable[:1], "last": prunable[-1:], "both": prunable[:1] + prunable[-1:]}
    for layer in prunable:
        if layer not in kept[args.protect]:
            weights = layer.get_weights()
            kernel = weights[0]
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), args.sparsity)] = 0.0
            layer.set_weights([kernel, *weights[1:]])
    representative = dataset.sample_train(200, seed=0)
    images, labels = dataset.test_arrays()

    directory = Path(args.output or tempfile.mkdtemp(prefix="sparse-int8-"))
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "dense float": convert(model, "float"),
        "dense int8 (full-integer)": convert(model, "int8", representative),
        "sparse float": sparse_tflite(model),
        "sparse int8 dynamic-range": sparse_tflite(model, 8, "dynamic"),
        "sparse int8 full-integer": sparse_tflite(model, 8, "full", representative),
    }
    paths = {}
    for name, payload in files.items():
        paths[name] = directory / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".tflite")
        paths[name].write_bytes(payload)
    timings = compare_latency(list(paths.values()), rounds=args.rounds, min_seconds=0.5, threads=1)
    print(f"runtime: {runtime_name()}; {args.sparsity:.0%} zeros per kernel (kept dense: {args.protect}); batch 1, "
          f"one thread, files in turn")
    print("| file | bytes | test accuracy | ms | delegation |")
    print("|---|---|---|---|---|")
    for name, path in paths.items():
        delegation = delegation_of_file(path)
        fallback = ", ".join(f"{op} {count}" for op, count in sorted(delegation.fallback_ops.items())) or "none"
        accuracy = tflite_accuracy(TFLiteModel(path), images, labels)
        print(f"| {name} | {path.stat().st_size:,} | {100 * accuracy:.2f}% | {timings[str(path)]:.3f} | "
              f"{delegation.partitions} partition(s); fallback: {fallback} |")


if __name__ == "__main__":
    main()
