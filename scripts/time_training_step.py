"""Time one training step of a model, in fresh processes with oneDNN on and off, interleaved.

Why: TensorFlow 2.21's x86 wheel leaves oneDNN off by default, and ``pocketflow`` turns it on
(``pocketflow/keras_setup.py``). This script is the evidence, re-runnable on any machine:

    python scripts/time_training_step.py --model ../shared/data/pretrained/resnet20_cifar10.h5 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

CHILD = "--child"


def child(model_path: str, batch_size: int, steps: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pocketflow  # noqa: F401  (one Keras; keeps the TF_ENABLE_ONEDNN_OPTS the parent set)
    import numpy as np
    import tensorflow as tf

    model = tf.keras.models.load_model(model_path, compile=False)
    optimizer = tf.keras.optimizers.legacy.SGD(0.01, momentum=0.9, nesterov=True)
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size,) + tuple(model.input_shape[1:])).astype(np.float32))
    labels = tf.constant(rng.integers(0, model.output_shape[-1], size=batch_size))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        float(step())
    print(f"{(time.perf_counter() - started) / steps * 1000:.1f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Keras model file (.h5 or .keras)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, interleaved")
    args = parser.parse_args()
    for round_index in range(args.rounds):
        for setting in ("0", "1"):
            environment = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="3")
            output = subprocess.run([sys.executable, __file__, CHILD, args.model, str(args.batch_size),
                                     str(args.steps)], env=environment, capture_output=True, text=True,
                                    check=True).stdout.split()[-1]
            print(f"round {round_index + 1}  oneDNN {'on ' if setting == '1' else 'off'}  "
                  f"{output} ms per step (batch {args.batch_size})", flush=True)


if __name__ == "__main__":
    main()
