"""MobileNet v1 (Howard et al. 2017) and MobileNet v2 (Sandler et al. 2018).

Both use ``padding="same"`` everywhere (no ZeroPadding2D layers), so they build on any input
size: 224x224 ImageNet (7x7 before pooling) or 32x32 CIFAR (1x1 before pooling). The
classifier is GlobalAveragePooling2D + Dense, giving logits. MACs at 224x224x3, 1000 classes,
with our counter: v1 568.7M (the paper's 569M), v2 300.8M (the paper's 300M).
"""

from __future__ import annotations

from typing import Optional, Tuple

import tensorflow as tf

from nets.base import NetSpec, Schedule, register_net

layers = tf.keras.layers

# (pointwise filters, depthwise stride) of v1's 13 depthwise-separable blocks.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

# (expansion t, output channels c, repeats n, first stride s) of v2's bottleneck stages (table 2).
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _check_multiplier(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive (e.g. 0.5, 0.75, 1.0), got {name}={value}")


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never going more than 10% down."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def _conv_bn_relu6(x: tf.Tensor, filters: int, kernel_size: int, strides: int, name: str) -> tf.Tensor:
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x)


def _depthwise_bn_relu6(x: tf.Tensor, strides: int, depth_multiplier: int, name: str) -> tf.Tensor:
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", depth_multiplier=depth_multiplier,
                               use_bias=False, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x)


def build_mobilenet_v1(input_shape: Tuple[int, ...], num_classes: int, width_multiplier: float = 1.0,
                       depth_multiplier: int = 1) -> tf.keras.Model:
    """Conv 3x3/2, then 13 blocks of depthwise 3x3 + BN + ReLU6 and pointwise 1x1 + BN + ReLU6.

    ``width_multiplier`` (alpha) scales every layer's channels; ``depth_multiplier`` is the
    depthwise convolutions' channel multiplier.
    """
    _check_multiplier("width_multiplier", width_multiplier)
    if int(depth_multiplier) != depth_multiplier or depth_multiplier < 1:
        raise ValueError(f"depth_multiplier must be a positive integer, got depth_multiplier={depth_multiplier}")
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu6(inputs, int(32 * width_multiplier), 3, 2, "conv1")
    for index, (filters, strides) in enumerate(V1_BLOCKS, start=1):
        x = _depthwise_bn_relu6(x, strides, int(depth_multiplier), f"conv_dw_{index}")
        x = _conv_bn_relu6(x, int(filters * width_multiplier), 1, 1, f"conv_pw_{index}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="mobilenet_v1")


def _inverted_residual(x: tf.Tensor, expansion: int, filters: int, strides: int, name: str) -> tf.Tensor:
    """Expand 1x1 (ReLU6), depthwise 3x3 (ReLU6), project 1x1 (linear); Add when shapes match."""
    in_channels = int(x.shape[-1])
    y = x
    if expansion != 1:
        y = _conv_bn_relu6(y, in_channels * expansion, 1, 1, f"{name}_expand")
    y = _depthwise_bn_relu6(y, strides, 1, f"{name}_depthwise")
    y = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
    if strides == 1 and in_channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def build_mobilenet_v2(input_shape: Tuple[int, ...], num_classes: int,
                       width_multiplier: float = 1.0) -> tf.keras.Model:
    """Conv 3x3/2, 17 inverted residual blocks (table 2 of the paper), 1x1 conv to 1280.

    Channels are ``width_multiplier`` times the paper's, rounded to multiples of 8; the last
    conv keeps 1280 channels for multipliers up to 1.0, as in the reference implementation.
    """
    _check_multiplier("width_multiplier", width_multiplier)
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu6(inputs, make_divisible(32 * width_multiplier), 3, 2, "conv1")
    block = 0
    for expansion, channels, repeats, first_stride in V2_STAGES:
        filters = make_divisible(channels * width_multiplier)
        for repeat in range(repeats):
            block += 1
            strides = first_stride if repeat == 0 else 1
            x = _inverted_residual(x, expansion, filters, strides, f"block{block}")
    last_filters = make_divisible(1280 * width_multiplier) if width_multiplier > 1.0 else 1280
    x = _conv_bn_relu6(x, last_filters, 1, 1, "conv_last")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="mobilenet_v2")


register_net(NetSpec(
    name="mobilenet_v1",
    build=build_mobilenet_v1,
    default_dataset="imagenet",
    schedule=Schedule(epochs=30, batch_size=128, learning_rate=0.05, schedule="cosine",
                      optimizer="sgd", weight_decay=4e-5, augment=True),
    options={"width_multiplier": 1.0, "depth_multiplier": 1},
    description="MobileNet v1 1.0 (Howard et al. 2017); any input of 32x32 or more",
))

register_net(NetSpec(
    name="mobilenet_v2",
    build=build_mobilenet_v2,
    default_dataset="imagenet",
    schedule=Schedule(epochs=30, batch_size=128, learning_rate=0.05, schedule="cosine",
                      optimizer="sgd", weight_decay=4e-5, augment=True),
    options={"width_multiplier": 1.0},
    description="MobileNet v2 1.0 (Sandler et al. 2018); any input of 32x32 or more",
))
