"""Every registered net builds, outputs logits, trains a step, and survives save/load."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from nets import NETS
from nets.mobilenet import make_divisible
from pocketflow.metrics import count_macs
from pocketflow.training import outputs_probabilities

# (input shape, classes) of each default dataset; a net registered with a new dataset adds it here.
NATURAL = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "fashion-mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "imagenet": ((224, 224, 3), 1000),
}
SMALL_CIFAR = ((32, 32, 3), 10)


def natural_input(name: str):
    dataset = NETS.get(name).default_dataset
    assert dataset in NATURAL, f"add the input shape of dataset '{dataset}' (net '{name}') to NATURAL"
    return NATURAL[dataset]


def trainable_input(name: str):
    """Natural size, except that ImageNet nets train here on 32x32 (steps at 224 are too slow)."""
    shape, classes = natural_input(name)
    return SMALL_CIFAR if shape[0] > 64 else (shape, classes)


def build_cases():
    cases = [(name, *natural_input(name)) for name in NETS.names()]
    cases += [(name, *SMALL_CIFAR) for name in NETS.names() if natural_input(name)[0][0] > 64]
    return cases


def test_builtin_nets_are_registered():
    for name in ("lenet", "resnet20", "resnet32", "resnet44", "resnet56", "mobilenet_v1", "mobilenet_v2"):
        assert name in NETS


@pytest.mark.parametrize("name, shape, classes", build_cases())
def test_builds_with_logits_and_unique_names(name, shape, classes):
    model = NETS.get(name).make(shape, classes)
    assert model.input_shape == (None, *shape)
    assert model.output_shape == (None, classes)
    assert not outputs_probabilities(model)
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names)), "layer names must be unique"
    assert count_macs(model) > 0


@pytest.mark.parametrize("name", NETS.names())
def test_default_dataset_and_schedule_are_sane(name):
    from pocketflow.data import DATASETS

    assert NETS.get(name).default_dataset in DATASETS
    schedule = NETS.get(name).schedule
    assert schedule.epochs > 0 and schedule.batch_size > 0 and 0 < schedule.learning_rate <= 1
    assert schedule.schedule in ("cosine", "step", "constant")
    assert schedule.optimizer in ("sgd", "adam")


@pytest.mark.parametrize("name", NETS.names())
def test_sgd_steps_and_save_load(name, tmp_path):
    shape, classes = trainable_input(name)
    model = NETS.get(name).make(shape, classes)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, *shape)).astype(np.float32)
    labels = rng.integers(0, classes, size=4)
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf.keras.optimizers.legacy.SGD(0.01, momentum=0.9)
    before = [w.numpy().copy() for w in model.trainable_weights]
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = loss_function(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_weights)
        assert all(g is not None for g in gradients), "every weight must get a gradient"
        optimizer.apply_gradients(zip(gradients, model.trainable_weights))
        assert np.isfinite(float(loss))
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))

    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = tf.keras.models.load_model(path, compile=False)
    expected = model(images, training=False).numpy()
    assert expected.shape == (4, classes)
    np.testing.assert_allclose(loaded(images, training=False).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_lenet_matches_lenet5():
    model = NETS.get("lenet").make((28, 28, 1), 10)
    # conv1 156 + conv2 2,416 + dense1 (16*4*4)*120+120 + dense2 120*84+84 + logits 84*10+10
    assert model.count_params() == 156 + 2416 + 30840 + 10164 + 850
    with pytest.raises(ValueError, match="16x16"):
        NETS.get("lenet").make((8, 8, 1), 10)


@pytest.mark.parametrize("depth", [20, 32, 44, 56])
def test_resnet_depth(depth):
    model = NETS.get(f"resnet{depth}").make((32, 32, 3), 10)
    convs = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    projections = [layer for layer in convs if "shortcut" in layer.name]
    assert len(convs) - len(projections) + 1 == depth  # + the Dense layer
    assert len(projections) == 2
    assert sum(isinstance(layer, tf.keras.layers.Add) for layer in model.layers) == 3 * (depth - 2) // 6


def test_resnet_rejects_bad_depth():
    from nets.resnet_cifar import build_resnet_cifar

    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_resnet_cifar((32, 32, 3), 10, depth=21)


def test_mobilenet_layouts():
    v1 = NETS.get("mobilenet_v1").make((224, 224, 3), 1000)
    depthwise = [layer for layer in v1.layers if isinstance(layer, tf.keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == 13
    assert v1.get_layer("conv_pw_13").output_shape == (None, 7, 7, 1024)
    assert v1.count_params() == 4_253_864  # as tf.keras.applications.MobileNet (paper: 4.2M)

    v2 = NETS.get("mobilenet_v2").make((224, 224, 3), 1000)
    assert sum(isinstance(layer, tf.keras.layers.Add) for layer in v2.layers) == 10
    assert v2.get_layer("conv_last").output_shape == (None, 7, 7, 1280)
    assert v2.count_params() == 3_538_984  # as tf.keras.applications.MobileNetV2 (paper: 3.4M)
    # Linear bottlenecks: the projection's BatchNorm feeds an Add or the next block, never a ReLU.
    assert all(not isinstance(layer, tf.keras.layers.ReLU) for layer in v2.layers if "project" in layer.name)


def test_mobilenet_width_multipliers():
    from nets.mobilenet import build_mobilenet_v1, build_mobilenet_v2

    full_v1 = count_macs(build_mobilenet_v1((224, 224, 3), 1000))
    half_v1 = build_mobilenet_v1((224, 224, 3), 1000, width_multiplier=0.5)
    assert half_v1.get_layer("conv_pw_13").output_shape[-1] == 512
    assert count_macs(half_v1) < 0.3 * full_v1  # ~quarter: MACs scale with alpha squared
    assert build_mobilenet_v1((32, 32, 3), 10, depth_multiplier=2).get_layer("conv_dw_1").output_shape[-1] == 64

    half_v2 = build_mobilenet_v2((32, 32, 3), 10, width_multiplier=0.35)
    channels = [layer.output_shape[-1] for layer in half_v2.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    assert all(c % 8 == 0 for c in channels)
    assert half_v2.get_layer("conv_last").output_shape[-1] == 1280
    assert build_mobilenet_v2((32, 32, 3), 10, width_multiplier=1.4).get_layer("conv_last").output_shape[-1] == 1792
    with pytest.raises(ValueError, match="width_multiplier"):
        build_mobilenet_v2((32, 32, 3), 10, width_multiplier=0)


def test_make_divisible():
    # 18 rounds to 16, more than 10% down, so it goes up to 24 (as the reference implementation does).
    assert [make_divisible(v) for v in (32, 16 * 0.35, 24 * 0.75, 32 * 0.35, 1280 * 1.4)] == [32, 8, 24, 16, 1792]
