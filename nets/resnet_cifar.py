"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56.

Three stages of ``n = (depth - 2) / 6`` basic blocks with 16, 32 and 64 filters on 32x32,
16x16 and 8x8 maps, global average pooling, one Dense layer. The first block of stages 2
and 3 halves the map and doubles the channels; its shortcut is a strided 1x1 convolution +
BatchNorm projection (the paper's option B), so every tensor a channel pruner sees comes from
an ordinary layer. MACs at 32x32x3 with our counter: ResNet-20 40.81M, ResNet-56 125.75M
(the paper's ~41M / ~125M, plus 0.26M for the two projections).
"""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from nets.base import NetSpec, Schedule, register_net

layers = tf.keras.layers

STAGE_FILTERS = (16, 32, 64)


def _conv_bn(x: tf.Tensor, filters: int, kernel_size: int, strides: int, name: str) -> tf.Tensor:
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def _basic_block(x: tf.Tensor, filters: int, strides: int, name: str) -> tf.Tensor:
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""
    shortcut = x
    if strides != 1 or int(x.shape[-1]) != filters:
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_shortcut")
    y = _conv_bn(x, filters, 3, strides, f"{name}_1")
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2")
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_resnet_cifar(input_shape: Tuple[int, ...], num_classes: int, depth: int = 20) -> tf.keras.Model:
    """A CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"a CIFAR ResNet needs depth = 6n + 2 (20, 32, 44, 56, 110), got depth={depth}")
    blocks_per_stage = (depth - 2) // 6
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, STAGE_FILTERS[0], 3, 1, "stem")
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, blocks_per_stage + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer="he_normal", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name=f"resnet{depth}")


# 30 epochs (not the paper's 182) keep a CPU run affordable (~3 min per ResNet-20 epoch on two
# cores); cosine decay to zero over those epochs is expected to land near 90% on CIFAR-10.
CIFAR_SCHEDULE = Schedule(epochs=30, batch_size=128, learning_rate=0.1, schedule="cosine",
                          optimizer="sgd", weight_decay=5e-4, augment=True)

for _depth in (20, 32, 44, 56):
    register_net(NetSpec(
        name=f"resnet{_depth}",
        build=build_resnet_cifar,
        default_dataset="cifar10",
        schedule=CIFAR_SCHEDULE,
        options={"depth": _depth},
        description=f"ResNet-{_depth} for 32x32 CIFAR (He et al. 2016, projection shortcuts)",
    ))
