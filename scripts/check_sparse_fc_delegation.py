"""Does the runtime's XNNPACK delegate take an int8 TFLite file whose fully-connected weights are sparse?

    python scripts/check_sparse_fc_delegation.py

A three-layer MLP (random weights: delegation does not depend on them) with 80% zeros in one or two of
its kernels, converted with the converter's sparse encoding in full-integer and dynamic-range int8;
prints each file's delegation. Behind weight-sparse keeping fully-connected kernels dense with
full-integer int8 (learners/weight_sparsification/learner.py, FULLY_CONNECTED_SHARE).
"""

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

from learners.weight_sparsification.artifact import sparse_tflite  # noqa: E402
from pocketflow.export import delegation_of_file, runtime_name  # noqa: E402


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 1))
    hidden = tf.keras.layers.Dense(128, activation="relu", name="hidden1")(tf.keras.layers.Flatten()(inputs))
    hidden = tf.keras.layers.Dense(128, activation="relu", name="hidden2")(hidden)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(10, name="logits")(hidden))
    representative = np.random.default_rng(0).random((32, 8, 8, 1)).astype(np.float32)
    dense = [weight.copy() for weight in model.get_weights()]
    directory = Path(tempfile.mkdtemp(prefix="sparse-fc-"))
    print(f"runtime: {runtime_name()}")
    print("| sparse kernels | int8 | delegation |")
    print("|---|---|---|")
    for sparse in ((), ("hidden2",), ("logits",), ("hidden1", "hidden2")):
        model.set_weights(dense)
        for name in sparse:
            kernel, bias = model.get_layer(name).get_weights()
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), 0.8)] = 0.0
            model.get_layer(name).set_weights([kernel, bias])
        for mode in ("full", "dynamic"):
            path = directory / f"{'_'.join(sparse) or 'none'}_{mode}.tflite"
            path.write_bytes(sparse_tflite(model, 8, mode, representative))
            delegation = delegation_of_file(path)
            fallback = ", ".join(f"{op} {count}" for op, count in sorted(delegation.fallback_ops.items())) or "none"
            print(f"| {', '.join(sparse) or 'none'} | {mode} | {delegation.partitions} partition(s); fallback: "
                  f"{fallback} |")


if __name__ == "__main__":
    main()
