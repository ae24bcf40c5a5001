"""The default net: a small Conv-BN-ReLU CNN for scikit-learn's 8x8 digits."""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from nets.base import NetSpec, Schedule, register_net

layers = tf.keras.layers


def conv_bn_relu(x: tf.Tensor, filters: int, name: str, strides: int = 1) -> tf.Tensor:
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_digits_cnn(input_shape: Tuple[int, ...], num_classes: int, width: int = 32) -> tf.keras.Model:
    """Four 3x3 convs (one strided), global pooling, dense head: ~1.5M MACs at 8x8."""
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = conv_bn_relu(inputs, width, "block1")
    x = conv_bn_relu(x, width, "block2")
    x = conv_bn_relu(x, 2 * width, "block3", strides=2)
    x = conv_bn_relu(x, 2 * width, "block4")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="digits_cnn")


register_net(NetSpec(
    name="digits_cnn",
    build=build_digits_cnn,
    default_dataset="digits",
    schedule=Schedule(epochs=30, batch_size=32, learning_rate=0.05, schedule="cosine", weight_decay=5e-4),
    description="4-conv CNN for 8x8 digits",
))
