"""Known-answer tests for the MAC, parameter and byte counters."""

from __future__ import annotations

import pytest
import tensorflow as tf

from nets import NETS
from pocketflow.metrics import count_macs, count_params, layer_macs, weight_bytes
from tests.conftest import shared_file

layers = tf.keras.layers

# Published multiply-adds: ResNet-20 / -56 for CIFAR (He et al. 2016, ~41M / ~125M) and
# MobileNet v1 1.0-224 (Howard et al. 2017, 569M) and v2 1.0-224 (Sandler et al. 2018, 300M).
RESNET20_MACS = 40.8e6
RESNET56_MACS = 125.5e6
MOBILENET_V1_MACS = 569e6
MOBILENET_V2_MACS = 300e6


def assert_close(measured: int, expected: float, relative: float = 0.02) -> None:
    assert abs(measured - expected) <= relative * expected, (
        f"{measured:,} MACs is {100 * (measured / expected - 1):+.2f}% from {expected:,.0f}")


def resnet_cifar_macs(blocks_per_stage: int, num_classes: int = 10) -> int:
    """Hand count of our CIFAR ResNet (projection shortcuts) at 32x32x3."""
    n = blocks_per_stage
    stem = 32 * 32 * 16 * (3 * 3 * 3)
    full_conv = {16: 32 * 32 * 16 * 9 * 16, 32: 16 * 16 * 32 * 9 * 32, 64: 8 * 8 * 64 * 9 * 64}
    stage1 = 2 * n * full_conv[16]
    stage2 = 16 * 16 * 32 * 9 * 16 + (2 * n - 1) * full_conv[32] + 16 * 16 * 32 * 16  # + 1x1 projection
    stage3 = 8 * 8 * 64 * 9 * 32 + (2 * n - 1) * full_conv[64] + 8 * 8 * 64 * 32
    head = 64 * num_classes
    return stem + stage1 + stage2 + stage3 + head


@pytest.mark.parametrize("name, blocks, published", [("resnet20", 3, RESNET20_MACS), ("resnet56", 9, RESNET56_MACS)])
def test_resnet_cifar_macs(name, blocks, published):
    model = NETS.get(name).make((32, 32, 3), 10)
    macs = count_macs(model)
    assert macs == resnet_cifar_macs(blocks)  # 40,813,184 and 125,747,840
    assert_close(macs, published)


def test_mobilenet_v1_macs_at_224():
    model = NETS.get("mobilenet_v1").make((224, 224, 3), 1000)
    assert_close(count_macs(model), MOBILENET_V1_MACS)  # 568,740,352


def test_mobilenet_v2_macs_at_224():
    model = NETS.get("mobilenet_v2").make((224, 224, 3), 1000)
    assert_close(count_macs(model), MOBILENET_V2_MACS)  # 300,774,272


def test_every_counted_layer_type_by_hand():
    inputs = tf.keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)  # 8x8x4
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(x)  # 8x8x8
    x = layers.SeparableConv2D(6, 3, strides=2, padding="same", name="separable")(x)  # 4x4x6
    x = layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)  # 4x4x4, 3 input channels per group
    x = layers.Conv2DTranspose(2, 3, strides=2, padding="same", name="transpose")(x)  # 8x8x2
    x = layers.Reshape((64, 2), name="reshape")(x)
    x = layers.Dense(5, name="dense_3d")(x)  # (64, 5): one 2->5 matmul per position
    x = layers.Flatten(name="flatten")(x)
    x = layers.BatchNormalization(name="bn")(x)  # not counted
    outputs = layers.Dense(3, name="head")(x)
    model = tf.keras.Model(inputs, outputs)

    expected = {
        "conv": 8 * 8 * 4 * (3 * 3 * 3),
        "depthwise": 8 * 8 * (4 * 2) * (3 * 3),
        "separable": 4 * 4 * 8 * (3 * 3) + 4 * 4 * 8 * 6,  # depthwise on the output grid + pointwise
        "grouped": 4 * 4 * 4 * (3 * 3 * 6 // 2),
        "transpose": 4 * 4 * 4 * (3 * 3) * 2,  # every input pixel scatters a 3x3x2 patch
        "dense_3d": 64 * 2 * 5,
        "head": 320 * 3,
    }
    assert layer_macs(model) == expected
    assert count_macs(model) == 6912 + 4608 + 1920 + 1728 + 1152 + 640 + 960 == sum(expected.values())


def test_nested_model_layers_are_counted_with_prefix():
    inner = tf.keras.Sequential([tf.keras.Input((8, 8, 3)), layers.Conv2D(4, 3, padding="same", name="conv")],
                                name="backbone")
    inputs = tf.keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D()(inner(inputs))
    model = tf.keras.Model(inputs, layers.Dense(2, name="head")(x))
    assert layer_macs(model) == {"backbone/conv": 8 * 8 * 4 * 27, "head": 4 * 2}


def test_shared_layer_counts_each_call_once_per_model():
    conv = layers.Conv2D(4, 3, padding="same", name="shared")
    small_input = tf.keras.Input((8, 8, 3))
    small = tf.keras.Model(small_input, conv(small_input))
    twice_input = tf.keras.Input((8, 8, 3))
    twice = tf.keras.Model(twice_input, layers.Add()([conv(twice_input), conv(twice_input)]))
    large_input = tf.keras.Input((16, 16, 3))
    large = tf.keras.Model(large_input, conv(large_input))
    # The other models' calls of the same layer must not leak into ``small``.
    assert count_macs(small) == 8 * 8 * 4 * 27
    assert count_macs(twice) == 2 * 8 * 8 * 4 * 27
    assert count_macs(large) == 16 * 16 * 4 * 27


def test_unknown_spatial_size_is_a_clear_error():
    inputs = tf.keras.Input((None, None, 3))
    model = tf.keras.Model(inputs, layers.Conv2D(4, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="conv.*fixed input size"):
        count_macs(model)


def test_params_and_bytes_exact():
    inputs = tf.keras.Input((4, 4, 2))
    x = layers.Conv2D(3, 3, name="conv")(inputs)  # 3*3*2*3 + 3 = 57, output 2x2x3
    x = layers.BatchNormalization(name="bn")(x)  # gamma, beta, moving mean, moving variance: 4*3 = 12
    x = layers.Flatten()(x)
    x = layers.Dense(5, name="dense")(x)  # 12*5 + 5 = 65
    outputs = layers.Dense(2, dtype="float16", name="half")(x)  # 5*2 + 2 = 12, two bytes each
    model = tf.keras.Model(inputs, outputs)
    assert count_params(model) == 57 + 12 + 65 + 12 == model.count_params()
    assert weight_bytes(model) == 4 * (57 + 12 + 65) + 2 * 12


def _load_pretrained(name: str) -> tf.keras.Model:
    return tf.keras.models.load_model(shared_file(f"pretrained/{name}_cifar10.h5"), compile=False)


def test_pretrained_resnet20_macs():
    # Option-A shortcuts (no projection convs): 40,551,040.
    assert_close(count_macs(_load_pretrained("resnet20")), RESNET20_MACS)


def test_pretrained_resnet56_macs():
    # Option-A shortcuts: 125,485,696.
    assert_close(count_macs(_load_pretrained("resnet56")), RESNET56_MACS)
