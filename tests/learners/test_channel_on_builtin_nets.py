"""Channel pruning works on every built-in net (residual adds, depthwise blocks, Flatten -> Dense)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from learners.channel_pruning import analyze, prune_model
from nets import NETS
from pocketflow.metrics import count_macs

SMALL_INPUTS = {"digits_cnn": (8, 8, 1), "lenet": (28, 28, 1)}


@pytest.mark.parametrize("name", NETS.names())
def test_every_builtin_net_prunes_to_a_smaller_working_model(name, tmp_path):
    input_shape = SMALL_INPUTS.get(name, (32, 32, 3))
    model = NETS.get(name).make(input_shape, 10)
    analysis = analyze(model)
    assert analysis.groups, f"{name}: no prunable channel group found"
    assert not analysis.barriers, f"{name}: unexpected barriers {analysis.barriers}"
    images = np.random.default_rng(0).normal(size=(64, *input_shape)).astype(np.float32)
    ratios = {group: 0.5 for group in analysis.groups}
    criterion = "lasso" if name in ("digits_cnn", "lenet", "resnet20") else "l1"
    pruned, _ = prune_model(model, ratios, criterion=criterion,
                            sample_images=images if criterion == "lasso" else None, analysis=analysis)
    assert count_macs(pruned) == analysis.macs_for({g: max(1, round(0.5 * analysis.groups[g].channels))
                                                    for g in analysis.groups})
    assert count_macs(pruned) < 0.6 * count_macs(model)
    assert pruned.count_params() < model.count_params()
    assert pruned(images[:2]).shape == (2, 10)
    pruned.save(tmp_path / "pruned.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "pruned.keras", compile=False)
    np.testing.assert_allclose(reloaded(images[:2]).numpy(), pruned(images[:2]).numpy(), atol=1e-4)
