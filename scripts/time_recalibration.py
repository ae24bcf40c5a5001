"""Time BatchNorm re-estimation: the product's traced pass against eager calls, interleaved.

Why: every channel-pruning trial re-estimates its candidate's BatchNorm statistics before it is
scored (``channel.recalibrate_batches``), so this pass is part of every trial's cost. The eager
reference below is what ``recalibrate_batchnorm`` did before it traced the forward pass; the
script also checks that both leave the same statistics.

    python scripts/time_recalibration.py --model ../shared/data/pretrained/resnet56_cifar10.h5 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Keras model file (.h5 or .keras)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="eager/traced pairs, interleaved")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from pocketflow.model_io import load_user_model
    from pocketflow.training import batchnorm_layers, recalibrate_batchnorm

    model = load_user_model(args.model, trust=True)
    shape = tuple(model.input_shape[1:])
    images = np.random.default_rng(0).normal(size=(args.batches * args.batch_size,) + shape).astype(np.float32)
    labels = np.zeros(len(images), np.int64)
    layers = batchnorm_layers(model)
    original = [layer.get_weights() for layer in layers]

    class Images:
        """The one Dataset method ``recalibrate_batchnorm`` calls, on fixed random images."""

        def train(self, batch_size, *, shuffle, seed, repeat):
            data = tf.data.Dataset.from_tensor_slices((images, labels))
            return data.repeat().batch(batch_size, drop_remainder=True)

    def eager() -> None:
        momenta = [layer.momentum for layer in layers]
        for index, (batch, _) in enumerate(Images().train(args.batch_size, shuffle=False, seed=0, repeat=True)
                                           .take(args.batches), start=1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / index
            model(batch, training=True)
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum

    def traced() -> None:
        recalibrate_batchnorm(model, Images(), args.batches, args.batch_size)

    def statistics() -> list:
        return [np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()]) for layer in layers]

    results, seconds = {}, {"eager": [], "traced": []}
    for _ in range(args.rounds):
        for name, run in (("eager", eager), ("traced", traced)):
            for layer, weights in zip(layers, original):
                layer.set_weights(weights)
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
            results[name] = statistics()
    difference = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-3)))
                     for a, b in zip(results["eager"], results["traced"]))
    for name, values in seconds.items():
        print(f"{name:7s} median {np.median(values):.2f} s  rounds {', '.join(f'{v:.2f}' for v in values)}")
    print(f"ratio eager/traced {np.median(seconds['eager']) / np.median(seconds['traced']):.2f}x; "
          f"largest relative difference of a statistic {difference:.2e}")


if __name__ == "__main__":
    main()
