"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, for 28x28 MNIST-like images."""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from nets.base import NetSpec, Schedule, register_net

layers = tf.keras.layers


def build_lenet(input_shape: Tuple[int, ...], num_classes: int) -> tf.keras.Model:
    """conv(6, 5x5)-pool-conv(16, 5x5)-pool-dense120-dense84-logits: ~0.28M MACs at 28x28.

    The convolutions are "valid" as in the paper, so the input must be at least 16x16
    (28x28 gives 24 -> 12 -> 8 -> 4, i.e. 16 * 4 * 4 = 256 features into ``dense1``).
    """
    height, width = input_shape[0], input_shape[1]
    if height is not None and width is not None and min(height, width) < 16:
        raise ValueError(f"lenet needs images of at least 16x16, got input_shape={tuple(input_shape)}; "
                         f"use a net built for small images (e.g. --net digits_cnn)")
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(6, 5, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="dense1")(x)
    x = layers.Dense(84, activation="relu", name="dense2")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="lenet")


register_net(NetSpec(
    name="lenet",
    build=build_lenet,
    default_dataset="mnist",
    schedule=Schedule(epochs=10, batch_size=128, learning_rate=0.05, schedule="cosine",
                      optimizer="sgd", weight_decay=5e-4, augment=False),
    description="LeNet-5 (ReLU, max pooling) for 28x28 MNIST",
))
