"""The Torch-Pruning peer's conversions: the PyTorch rebuild computes what the Keras model computes,
and the pruned, PyTorch-trained weights go back into a Keras model that computes what they do."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from pocketflow.benchmarks.torch_pruning_peer import build_torch_resnet, prune_to_target, to_keras, torch_macs  # noqa: E402
from pocketflow.metrics import count_macs  # noqa: E402

L = tf.keras.layers


def _conv_bn(x, filters, name, stride, bn_name):
    x = L.ZeroPadding2D(1, name=f"{name}_pad")(x)
    x = L.Conv2D(filters, 3, strides=stride, use_bias=False, name=name)(x)
    return L.BatchNormalization(epsilon=1e-5, name=bn_name)(x)


def akamaster_resnet():
    """Two stages of one block each, named and padded like the shared CIFAR ResNets."""
    inputs = tf.keras.Input((8, 8, 3))
    x = L.ReLU(name="relu0")(_conv_bn(inputs, 8, "conv1", 1, "bn1"))
    for stage, (width, stride) in enumerate([(8, 1), (16, 2)], start=1):
        prefix = f"layer{stage}.0"
        y = L.ReLU(name=f"{prefix}.relu1")(_conv_bn(x, width, f"{prefix}.conv1", stride, f"{prefix}.bn1"))
        y = _conv_bn(y, width, f"{prefix}.conv2", 1, f"{prefix}.bn2")
        shortcut = x
        if stride != 1:
            size = int(x.shape[1]) // 2
            shortcut = L.AveragePooling2D(1, strides=2, name=f"{prefix}.subsample")(x)
            shortcut = L.Reshape((size * size, int(x.shape[-1])), name=f"{prefix}.flat")(shortcut)
            shortcut = L.Permute((2, 1), name=f"{prefix}.perm1")(shortcut)
            pad = (width - int(x.shape[-1])) // 2
            shortcut = L.ZeroPadding1D((pad, pad), name=f"{prefix}.chpad")(shortcut)
            shortcut = L.Permute((2, 1), name=f"{prefix}.perm2")(shortcut)
            shortcut = L.Reshape((size, size, width), name=f"{prefix}.unflat")(shortcut)
        x = L.ReLU(name=f"{prefix}.relu2")(L.Add(name=f"{prefix}.add")([y, shortcut]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = tf.keras.Model(inputs, L.Dense(4, name="linear")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = [rng.normal(0.0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()]
        if isinstance(layer, L.BatchNormalization):
            weights[0] += 1.0
            weights[3] = rng.uniform(0.5, 1.5, weights[3].shape).astype(np.float32)
        layer.set_weights(weights)
    return model


def _torch_outputs(net, images):
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())).numpy()


def test_rebuild_prune_and_return_to_keras():
    model = akamaster_resnet()
    images = np.random.default_rng(1).normal(size=(3, 8, 8, 3)).astype(np.float32)
    net = build_torch_resnet(model)
    np.testing.assert_allclose(_torch_outputs(net, images), model(images).numpy(), atol=1e-4)
    assert torch_macs(net, (3, 8, 8)) == count_macs(model)

    pruned, speedup, _ = prune_to_target(net, 1.5, (3, 8, 8))
    assert speedup >= 1.5
    assert pruned.layer1[0].conv2.out_channels == 8 and pruned.conv1.out_channels == 8  # the stream is kept
    back = to_keras(model, pruned)
    assert count_macs(back) == torch_macs(pruned, (3, 8, 8))
    np.testing.assert_allclose(back(images).numpy(), _torch_outputs(pruned, images), atol=1e-4)
