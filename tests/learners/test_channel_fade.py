"""Fading the dropped channels (channel.fade_epochs): at the fade's end removing them changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from learners.channel_pruning.fade import fade_hook
from learners.channel_pruning.graph import analyze
from learners.channel_pruning.surgery import prune
from tests.learners.test_channel_surgery import SAVEABLE, _randomize, _random_keep


@pytest.mark.parametrize("build", SAVEABLE)
def test_after_the_fade_the_pruned_model_computes_what_the_faded_one_did(build):
    rng = np.random.default_rng(3)
    model = _randomize(build(), rng)
    analysis = analyze(model)
    keep = _random_keep(analysis, rng)
    before = [w.copy() for w in model.get_weights()]
    hook = fade_hook(model, analysis, keep, total_steps=3)
    hook()
    scaled = [not np.allclose(a, b) for a, b in zip(before, model.get_weights())]
    assert any(scaled)  # a third of the way: the dropped channels are scaled, not yet zero
    hook(), hook()
    images = rng.normal(size=(4, *model.input_shape[1:])).astype(np.float32)
    pruned = prune(model, keep, analysis=analysis)
    np.testing.assert_allclose(pruned(images, training=False), model(images, training=False), rtol=1e-4, atol=1e-4)
    # what the pruned model is made of was not touched: only dropped channels were scaled
    untouched = prune(build_from(before, model), keep, analysis=analyze(build_from(before, model)))
    for kept_weight, original in zip(pruned.get_weights(), untouched.get_weights()):
        np.testing.assert_allclose(kept_weight, original)


def build_from(weights, model):
    clone = tf.keras.models.clone_model(model)
    clone.set_weights(weights)
    return clone


def test_the_fade_scales_linearly_to_zero():
    from tests.learners.test_channel_surgery import chain_gap

    model = _randomize(chain_gap(), np.random.default_rng(0))
    analysis = analyze(model)
    keep = {"c1": np.array([0, 1, 2, 3])}  # c1 keeps 4 of 8: channels 4-7 fade through c1_bn
    gamma = model.get_layer("c1_bn").gamma.numpy().copy()
    hook = fade_hook(model, analysis, keep, total_steps=4)
    for step, left in enumerate([0.75, 0.5, 0.25, 0.0]):
        hook()
        now = model.get_layer("c1_bn").gamma.numpy()
        np.testing.assert_allclose(now[4:], gamma[4:] * left, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(now[:4], gamma[:4])
    np.testing.assert_allclose(model.get_layer("c1").kernel.numpy(), model.get_layer("c1").kernel.numpy())
