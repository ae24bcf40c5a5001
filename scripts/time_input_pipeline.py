"""Is the training input pipeline a bottleneck? Images per second of the tf.data pipeline alone, of
the training step alone (one fixed batch), and of the step fed by the pipeline, as ``train`` runs it.

Why: both share the machine's cores; if the fed step is much slower than the step alone, the
pipeline (augmentation, preprocessing) costs training time and should be made cheaper.

    python scripts/time_input_pipeline.py --model ../shared/data/pretrained/resnet20_cifar10.h5 \\
        --dataset cifar10 --data-dir ../shared/data/cifar10 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir")
    parser.add_argument("--mean")
    parser.add_argument("--std")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three measurements, interleaved")
    args = parser.parse_args()

    import tensorflow as tf

    import pocketflow  # noqa: F401  (one Keras, oneDNN as the product runs)
    from pocketflow.config import DataConfig
    from pocketflow.data import load_dataset
    from pocketflow.model_io import load_user_model

    floats = (lambda text: tuple(float(v) for v in text.split(",")) if text else None)
    dataset = load_dataset(DataConfig(name=args.dataset, dir=args.data_dir, mean=floats(args.mean),
                                      std=floats(args.std), augment=True), seed=0)
    model = load_user_model(args.model, trust=True)
    optimizer = tf.keras.optimizers.legacy.SGD(0.01, momentum=0.9, nesterov=True)
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    def batches():
        return iter(dataset.train(args.batch_size, shuffle=True, augment=True, repeat=True))

    fixed = next(batches())
    step(*fixed)  # trace once

    def pipeline_alone() -> float:
        source = batches()
        next(source)  # the shuffle buffer fills on the first batch
        started = time.perf_counter()
        for _ in range(args.steps):
            next(source)
        return args.steps * args.batch_size / (time.perf_counter() - started)

    def step_alone() -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            step(*fixed).numpy()
        return args.steps * args.batch_size / (time.perf_counter() - started)

    def step_fed() -> float:
        source = batches()
        step(*next(source)).numpy()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(*next(source)).numpy()
        return args.steps * args.batch_size / (time.perf_counter() - started)

    measured = {"pipeline alone": [], "training step alone": [], "training step fed by the pipeline": []}
    for _ in range(args.rounds):
        for name, run in zip(measured, (pipeline_alone, step_alone, step_fed)):
            measured[name].append(run())
    print(f"{args.dataset}, batch {args.batch_size}, {args.steps} batches per measurement, best of {args.rounds}:")
    for name, values in measured.items():
        print(f"  {name:34s} {max(values):8.0f} images/s")
    fed, alone = max(measured["training step fed by the pipeline"]), max(measured["training step alone"])
    print(f"  the pipeline costs the step {100 * (1 - fed / alone):.0f}% of its throughput")


if __name__ == "__main__":
    main()
