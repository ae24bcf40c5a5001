"""Epochs per hour of the product's training loop in float32 and in bfloat16, interleaved in one sitting.

Why: ``train.precision: auto`` picks bfloat16 where the CPU has AVX512-BF16 / AMX; this is the
evidence for what it saves. Each measurement runs ``pocketflow.training.train`` (the loop every
learner uses, fed by the real augmented pipeline) for ``--steps`` optimizer steps and takes the
median of its steps' wall times (batch included; the first steps, which trace, are left out). Both
precisions run in one process, alternating: separate processes on these machines settle at different
speeds (float32 ResNet-20 steps of 190 or 340-420 ms, by process), which would be measured instead of
the precision; and timing whole trainings measured their start (the shuffle buffer, the tracing),
which varies by seconds.

    python scripts/time_precision.py --model ../shared/data/pretrained/resnet20_cifar10.h5 \\
        --data-dir ../shared/data/cifar10 --rounds 3 [--distill] [--qat]

``--qat`` times the int8 learner's quantization-aware training instead: the model wrapped with TFMOT's
fake-quantizers (calibrated as the learner does), trained through its bfloat16 twin or in float32.

``--widths 8 11 16 ...`` instead times one fixed batch's step of a three-layer CNN (widths w, w, 2w) in
both precisions, alternating: the evidence for ``auto``'s rule (bfloat16 only at multiples of 16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocketflow import keras_setup  # noqa: E402

keras_setup.start_quietly()  # TensorFlow's start-up noise kept off stderr

PRECISIONS = ("float32", "bfloat16")
TRACING_STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Keras model file (.h5 or .keras)")
    parser.add_argument("--data-dir", help="CIFAR-10 (python version) directory")
    parser.add_argument("--widths", type=int, nargs="+", help="time a small CNN at these widths instead")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="float32/bfloat16 pairs, alternating")
    parser.add_argument("--distill", action="store_true", help="with a distillation teacher (channel's default)")
    parser.add_argument("--qat", action="store_true", help="time the int8 learner's QAT model instead")
    args = parser.parse_args()
    if args.widths:
        time_widths(args.widths, args.batch_size, args.rounds)
        return
    if not (args.model and args.data_dir):
        parser.error("--model and --data-dir are needed (or --widths)")

    import pocketflow  # noqa: F401  (one Keras, oneDNN as the product runs)
    from learners.distillation import Distiller
    from pocketflow.config import DataConfig
    from pocketflow.data import load_dataset
    from pocketflow.model_io import load_user_model
    from pocketflow.training import TrainSchedule, train

    dataset = load_dataset(DataConfig(name="cifar10", dir=args.data_dir, mean=(0.485, 0.456, 0.406),
                                      std=(0.229, 0.224, 0.225), augment=True), seed=0)
    model = load_user_model(args.model, trust=True)
    if args.qat:
        from learners.uniform_quantization.qat import calibrate, quantize_aware

        float_model = model
        model, _ = quantize_aware(float_model)
        calibrate(model, float_model, dataset.sample_train(256, seed=0))
    # --distill: the teacher (the baseline itself here) runs on every batch, as channel fine-tuning does,
    # in the precision of the training (as the runner's Distiller does).
    teacher = load_user_model(args.model, trust=True) if args.distill else None
    losses = {precision: Distiller(teacher, precision=precision).loss_for(model) if teacher else None
              for precision in PRECISIONS}
    steps_per_epoch = dataset.num_train // args.batch_size

    def step_time(precision: str) -> float:
        schedule = TrainSchedule(epochs=args.steps / steps_per_epoch, batch_size=args.batch_size,
                                 learning_rate=0.001, schedule="cosine", optimizer="sgd", weight_decay=1e-4,
                                 augment=True, precision=precision)
        seconds: list = []
        train(model, dataset, schedule, loss_function=losses[precision], description=precision, step_seconds=seconds)
        return statistics.median(seconds[TRACING_STEPS:])

    per_step = {precision: [] for precision in PRECISIONS}
    for round_index in range(args.rounds):
        for precision in PRECISIONS:
            step = step_time(precision)
            per_step[precision].append(step)
            print(f"round {round_index + 1}  {precision:8s}  {step * 1000:.1f} ms per step", flush=True)
    medians = {precision: statistics.median(values) for precision, values in per_step.items()}
    for precision, step in medians.items():
        print(f"median    {precision:8s}  {step * 1000:.1f} ms per step  {3600 / (step * steps_per_epoch):.1f} "
              f"epochs per hour (batch {args.batch_size}{', distilled' if args.distill else ''}{', QAT' if args.qat else ''})")
    ratios = [f / b for f, b in zip(per_step["float32"], per_step["bfloat16"])]
    print(f"bfloat16 speed-up: {medians['float32'] / medians['bfloat16']:.2f}x (medians); per round "
          + ", ".join(f"{ratio:.2f}x" for ratio in ratios) + f", median {statistics.median(ratios):.2f}x")


def time_widths(widths, batch_size: int, rounds: int) -> None:
    import numpy as np

    import pocketflow  # noqa: F401
    import tensorflow as tf
    from pocketflow.precision import mixed_twin

    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 10, batch_size))
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def network(width: int) -> tf.keras.Model:
        inputs = tf.keras.Input((32, 32, 3))
        x = inputs
        for channels in (width, width, 2 * width):
            x = tf.keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
            x = tf.keras.layers.ReLU()(tf.keras.layers.BatchNormalization()(x))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(tf.keras.layers.GlobalAveragePooling2D()(x)))

    def step_function(model: tf.keras.Model):
        optimizer = tf.keras.optimizers.legacy.SGD(0.001, momentum=0.9)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_function(labels, model(images, training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss
        return step

    print("| widths | float32 | bfloat16 | bfloat16 / float32 |\n|---|---|---|---|")
    for width in widths:
        model = network(width)
        steps = {"float32": step_function(model), "bfloat16": step_function(mixed_twin(model, "bfloat16")[0])}
        times = {name: [] for name in steps}
        for step in steps.values():
            for _ in range(3):  # tracing, oneDNN primitives
                step()
        for _ in range(rounds):
            for name, step in steps.items():
                for _ in range(5):
                    started = time.perf_counter()
                    float(step())
                    times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
        print(f"| {width}, {width}, {2 * width} | {medians['float32']:.0f} ms | {medians['bfloat16']:.0f} ms | "
              f"{medians['bfloat16'] / medians['float32']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
