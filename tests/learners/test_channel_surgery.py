"""Channel-pruning core: graph analysis, surgery (channels removed for real), selection."""

from __future__ import annotations

import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

from learners.channel_pruning.graph import analyze
from learners.channel_pruning import BaselineCache, keep_counts, l1_keep, l1_scores, lasso_keep, prune_model
from learners.channel_pruning.surgery import prune
from pocketflow.metrics import count_macs, count_params
from tests.conftest import shared_file

L = tf.keras.layers


# ---------------------------------------------------------------------------- tiny models
def _conv_bn_relu(x, filters, name, kernel=3, strides=1):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(name=f"{name}_relu")(x)


def chain_gap():
    inputs = tf.keras.Input((12, 12, 3))
    x = _conv_bn_relu(inputs, 8, "c1")
    x = _conv_bn_relu(x, 12, "c2", strides=2)
    x = L.Conv2D(10, 3, padding="same", activation="relu", name="c3")(x)  # with bias
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, name="drop")(x)
    return tf.keras.Model(inputs, L.Dense(5, name="head")(x), name="chain_gap")


def chain_flatten():
    inputs = tf.keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 6, "c1")
    x = L.MaxPooling2D(name="pool")(x)
    x = L.Conv2D(7, 3, padding="valid", name="c2")(x)  # 2x2x7
    x = L.Activation("relu", name="act")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(9, activation="relu", name="hidden")(x)
    return tf.keras.Model(inputs, L.Dense(4, name="head")(x), name="chain_flatten")


def residual(projection=False):
    inputs = tf.keras.Input((10, 10, 3))
    stem = _conv_bn_relu(inputs, 8, "stem")
    x = _conv_bn_relu(stem, 6, "a")
    x = L.ZeroPadding2D(1, name="b_pad")(x)
    x = L.Conv2D(8, 3, use_bias=False, name="b")(x)
    x = L.BatchNormalization(name="b_bn")(x)
    shortcut = stem
    if projection:
        shortcut = L.Conv2D(8, 1, name="proj")(stem)
    x = L.ReLU(name="out_relu")(L.Add(name="add")([x, shortcut]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="residual_proj" if projection else "residual")


def depthwise_block():
    inputs = tf.keras.Input((10, 10, 3))
    x = _conv_bn_relu(inputs, 8, "c1")
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu")(x)
    x = _conv_bn_relu(x, 10, "c2", kernel=1)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="depthwise")


def separable_block():
    inputs = tf.keras.Input((10, 10, 3))
    x = _conv_bn_relu(inputs, 6, "c1")
    x = L.SeparableConv2D(9, 3, padding="same", depth_multiplier=2, name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.ReLU(name="sep_relu")(x)
    x = L.Conv2D(5, 3, padding="same", name="c2")(x)
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="separable")


def concat_block():
    inputs = tf.keras.Input((10, 10, 3))
    a = _conv_bn_relu(inputs, 5, "a")
    b = _conv_bn_relu(inputs, 7, "b", kernel=1)
    x = L.Concatenate(name="cat")([a, b])
    x = L.Conv2D(6, 3, padding="same", name="c")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="concat")


def pad_shortcut():
    """He et al.'s CIFAR shortcut (option A): subsample, then zero-pad the channel axis."""
    inputs = tf.keras.Input((8, 8, 3))
    stem = _conv_bn_relu(inputs, 4, "stem")
    x = _conv_bn_relu(stem, 8, "a", strides=2)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="b")(x)
    x = L.BatchNormalization(name="b_bn")(x)
    shortcut = L.AveragePooling2D(1, strides=2, name="subsample")(stem)
    shortcut = L.Reshape((16, 4), name="flat")(shortcut)
    shortcut = L.Permute((2, 1), name="perm1")(shortcut)
    shortcut = L.ZeroPadding1D((2, 2), name="channel_pad")(shortcut)
    shortcut = L.Permute((2, 1), name="perm2")(shortcut)
    shortcut = L.Reshape((4, 4, 8), name="unflat")(shortcut)
    x = L.ReLU(name="out_relu")(L.Add(name="add")([x, shortcut]))
    x = _conv_bn_relu(x, 6, "c")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="pad_shortcut")


def concat_add():
    """An Add of a Concatenate and a conv: the conv's channels are cut where the Concatenate's are."""
    inputs = tf.keras.Input((8, 8, 3))
    joined = L.Concatenate(name="cat")([_conv_bn_relu(inputs, 3, "a"), _conv_bn_relu(inputs, 5, "b", kernel=1)])
    x = L.Add(name="add")([joined, L.Conv2D(8, 3, padding="same", name="c")(inputs)])
    x = _conv_bn_relu(x, 4, "d")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="concat_add")


def tf_op_shortcut():
    """The option-A shortcut written with TF ops on Keras tensors (TFOpLambda / SlicingOpLambda layers):
    slicing, tf.pad of the channel axis, ``+``, tf.nn.relu and a scalar product."""
    inputs = tf.keras.Input((8, 8, 3))
    stem = tf.nn.relu(L.BatchNormalization(name="stem_bn")(L.Conv2D(4, 3, padding="same", name="stem")(inputs)))
    x = _conv_bn_relu(stem, 8, "a", strides=2)
    x = L.BatchNormalization(name="b_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="b")(x))
    shortcut = tf.pad(stem[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [2, 2]])
    return _classifier(inputs, tf.nn.relu(x + shortcut) * 0.5, "tf_op_shortcut")


def tf_op_concat_zeros():
    """A shortcut widened by ``tf.concat([x, tf.zeros_like(x)], -1)``: the zeros follow x's kept channels."""
    inputs = tf.keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 4, "a")
    widened = tf.concat([x, tf.zeros_like(x)], axis=-1)
    return _classifier(inputs, L.Add(name="add")([widened, L.Conv2D(8, 3, padding="same", name="b")(x)]),
                       "tf_op_concat_zeros")


def _classifier(inputs, x, name):
    """conv c (6 channels), global pooling and a 3-class head on top of ``x``."""
    x = L.GlobalAveragePooling2D(name="gap")(_conv_bn_relu(x, 6, "c"))
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name=name)


def lambda_barrier():
    inputs = tf.keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 6, "c1")
    x = L.Lambda(lambda t: t * 2.0, name="double")(x)
    x = _conv_bn_relu(x, 7, "c2")
    x = L.Reshape((8 * 8, 7), name="reshape")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(3, name="head")(x), name="barrier")


SAVEABLE = [chain_gap, chain_flatten, residual, lambda: residual(projection=True), depthwise_block,
            separable_block, concat_block, pad_shortcut, concat_add, tf_op_shortcut, tf_op_concat_zeros]
EXPECTED_GROUPS = {
    "chain_gap": {"c1": ("c1",), "c2": ("c2",), "c3": ("c3",)},
    "chain_flatten": {"c1": ("c1",), "c2": ("c2",), "hidden": ("hidden",)},
    "residual": {"stem": ("stem", "b"), "a": ("a",)},
    "residual_proj": {"stem": ("stem",), "a": ("a",), "b": ("b", "proj")},
    "depthwise": {"c1": ("c1",), "c2": ("c2",)},
    "separable": {"c1": ("c1",), "sep": ("sep",), "c2": ("c2",)},
    "concat": {"a": ("a",), "b": ("b",), "c": ("c",)},
    # The stem's channels run through the pad into b's middle band; b's outer bands meet zeros.
    "pad_shortcut": {"stem": ("stem", "b"), "a": ("a",), "b[0:2]": ("b",), "b[6:8]": ("b",), "c": ("c",)},
    "concat_add": {"a": ("a", "c"), "b": ("b", "c"), "d": ("d",)},
    "tf_op_shortcut": {"stem": ("stem", "b"), "a": ("a",), "b[0:2]": ("b",), "b[6:8]": ("b",), "c": ("c",)},
    # b's two halves both meet a's channels (once directly, once as zeros): one group, read twice.
    "tf_op_concat_zeros": {"a": ("a", "b"), "c": ("c",)},
}


def _randomize(model, rng):
    """Random weights and BatchNorm statistics, so that no channel is trivially like another."""
    for layer in model.layers:
        weights = [rng.normal(0.0, 0.4, w.shape).astype(np.float32) for w in layer.get_weights()]
        if isinstance(layer, L.BatchNormalization):  # gamma, beta, moving mean, moving variance
            weights[0] += 1.0
            weights[3] = rng.uniform(0.5, 1.5, weights[3].shape).astype(np.float32)
        layer.set_weights(weights)
    return model


def _random_keep(analysis, rng):
    keep = {}
    for name, group in analysis.groups.items():
        count = int(rng.integers(1, group.channels))
        keep[name] = np.sort(rng.choice(group.channels, size=count, replace=False))
    return keep


def _masked_reference(model, analysis, keep):
    """The original model with the removed channels' weights zeroed where they are *read*.

    A removed channel then contributes nothing, which is what removing it computes.
    """
    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for group in analysis.groups.values():
        for name in group.terminators:
            layer = clone.get_layer(name)
            kept = analysis.input_indices(name, keep)
            removed = np.setdiff1d(np.arange(int(layer.input_shape[-1])), kept)
            weights = layer.get_weights()
            if isinstance(layer, L.SeparableConv2D):
                rows = (removed[:, None] * layer.depth_multiplier + np.arange(layer.depth_multiplier)).ravel()
                weights[1][..., rows, :] = 0.0
            else:
                weights[0][..., removed, :] = 0.0
            layer.set_weights(weights)
    return clone


# ---------------------------------------------------------------------------- analysis
@pytest.mark.parametrize("build", SAVEABLE)
def test_groups_are_found(build):
    model = build()
    analysis = analyze(model)
    expected = EXPECTED_GROUPS[model.name]
    assert {name: group.producers for name, group in analysis.groups.items()} == expected
    assert "head" not in analysis.groups and "head" in analysis.frozen  # the output layer is never pruned
    assert analysis.total_macs == count_macs(model)


def test_exporting_a_model_leaves_its_channel_groups_as_they_were():
    """The export traces the subsampling shortcut as a depthwise convolution (for the delegate):
    the baseline it exported must still be analysed and pruned as before."""
    from pocketflow.export import convert

    model = pad_shortcut()
    convert(model, "float")
    analysis = analyze(model)
    assert {name: group.producers for name, group in analysis.groups.items()} == EXPECTED_GROUPS[model.name]
    assert analysis.total_macs == count_macs(model)


def test_analysis_details():
    analysis = analyze(depthwise_block())
    # The depthwise conv passes c1's channels through to c2.
    assert analysis.groups["c1"].consumers == ("c1_bn", "dw", "dw_bn", "c2")
    assert analysis.groups["c1"].terminators == ("c2",)
    analysis = analyze(concat_block())
    keep = {"a": np.array([1, 3]), "b": np.array([0, 6])}
    np.testing.assert_array_equal(analysis.input_indices("c", keep), [1, 3, 5, 11])  # b starts at 5
    analysis = analyze(chain_flatten())
    keep = {"c2": np.array([2, 5])}
    np.testing.assert_array_equal(analysis.input_indices("hidden", keep), [2, 5, 9, 12, 16, 19, 23, 26])
    assert analysis.group_positions("hidden", "c2").shape == (4, 7)


def test_barrier_keeps_the_channels_that_feed_it():
    model = lambda_barrier()
    analysis = analyze(model)
    assert list(analysis.groups) == []  # c1 feeds the Lambda, c2 feeds the Reshape
    assert {b.layer for b in analysis.barriers} == {"double", "reshape"}
    assert "double" in analysis.frozen["c1"] and "reshape" in analysis.frozen["c2"]
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(prune(model, {})(x), model(x), atol=1e-5)


def test_unknown_or_per_channel_tf_ops_are_barriers(rng):
    inputs = tf.keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = L.Conv2D(5, 3, padding="same", name="c2")(tf.math.reduce_mean(x, axis=-1, keepdims=True) + x)
    x = L.Conv2D(6, 3, padding="same", name="c3")(x * np.arange(5, dtype=np.float32))  # per-channel constant
    x = L.Conv2D(7, 3, padding="same", name="c4")(tf.pad(x, [[0, 0], [0, 0], [0, 0], [1, 1]], mode="REFLECT"))
    x = L.Conv2D(3, 1, name="c5")(tf.nn.relu(x))
    model = tf.keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    analysis = analyze(model)
    assert list(analysis.groups) == ["c4", "c5"]
    reasons = {b.layer: b.reason for b in analysis.barriers}
    assert "not known to be channel-transparent" in reasons["tf.math.reduce_mean"]
    assert "non-scalar" in reasons["tf.math.multiply"]
    assert "REFLECT" in reasons["tf.compat.v1.pad"]
    pruned = prune(_randomize(model, rng), {"c4": [0, 3], "c5": [1]}, analysis=analysis)
    assert analysis.macs_for({"c4": 2, "c5": 1}) == count_macs(pruned)


def test_shared_layer_and_nested_model_are_barriers():
    inputs = tf.keras.Input((8, 8, 4))
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    inner = tf.keras.Sequential([L.Conv2D(4, 1, name="inner_conv")], name="inner")
    x = L.Conv2D(4, 3, padding="same", name="first")(inputs)
    x = shared(shared(x))
    x = L.Conv2D(4, 1, name="before_inner")(x)
    x = inner(x)
    x = L.Conv2D(6, 1, name="last_conv")(x)
    model = tf.keras.Model(inputs, L.Dense(2, name="head")(L.Flatten(name="flat")(x)))
    analysis = analyze(model)
    assert list(analysis.groups) == ["last_conv"]
    assert {"first", "before_inner"} <= set(analysis.frozen)
    assert {"shared", "inner"} <= {b.layer for b in analysis.barriers}
    pruned = prune(model, {"last_conv": np.array([0, 5])}, analysis=analysis)
    assert analysis.macs_for({"last_conv": 2}) == count_macs(pruned)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(prune(model, {}, analysis=analysis)(x), model(x), atol=1e-5)


# ---------------------------------------------------------------------------- surgery
@pytest.mark.parametrize("build", SAVEABLE)
def test_keep_all_reproduces_outputs(build, rng):
    model = _randomize(build(), rng)
    analysis = analyze(model)
    x = rng.normal(size=(3,) + tuple(model.input_shape[1:])).astype(np.float32)
    full = {name: np.arange(group.channels) for name, group in analysis.groups.items()}
    for keep in ({}, full):
        pruned = prune(model, keep, analysis=analysis)
        np.testing.assert_allclose(pruned(x), model(x), atol=1e-5)
        assert count_params(pruned) == count_params(model)


@pytest.mark.parametrize("build", SAVEABLE)
def test_pruning_removes_channels_and_computes_the_masked_model(build, rng, tmp_path):
    model = _randomize(build(), rng)
    analysis = analyze(model)
    keep = _random_keep(analysis, rng)
    pruned = prune(model, keep, analysis=analysis)
    x = rng.normal(size=(3,) + tuple(model.input_shape[1:])).astype(np.float32)
    np.testing.assert_allclose(pruned(x), _masked_reference(model, analysis, keep)(x), atol=1e-4)
    widths = {}  # a producer can carry several groups (bands of a residual stream)
    for name, indices in keep.items():
        for producer in analysis.groups[name].producers:
            bands = analysis.group_positions(producer, name, output=True).shape[0]
            widths[producer] = widths.get(producer, 0) + bands * len(indices)
    for producer, width in widths.items():
        assert pruned.get_layer(producer).output_shape[-1] == width
    assert count_params(pruned) < count_params(model)
    assert count_macs(pruned) < count_macs(model)
    assert analysis.macs_for({name: len(idx) for name, idx in keep.items()}) == count_macs(pruned)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = tf.keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(loaded(x), pruned(x), atol=1e-6)


@pytest.mark.parametrize("build", SAVEABLE)
def test_closed_form_macs_match_count_macs(build, rng):
    model = build()
    analysis = analyze(model)
    for _ in range(3):
        keep = _random_keep(analysis, rng)
        counts = {name: len(idx) for name, idx in keep.items()}
        assert analysis.macs_for(counts) == count_macs(prune(model, keep, analysis=analysis))
    assert analysis.min_macs() == count_macs(prune(model, {g: [0] for g in analysis.groups}, analysis=analysis))
    group_macs = sum(g.macs for g in analysis.groups.values())
    assert 0 < group_macs and all(g.macs <= analysis.total_macs for g in analysis.groups.values())


def test_sequential_model_and_new_weights(rng):
    model = tf.keras.Sequential([tf.keras.Input((6, 6, 2)), L.Conv2D(4, 3, name="c1"),
                                 L.Flatten(name="flat"), L.Dense(3, name="head")])
    analysis = analyze(model)
    assert list(analysis.groups) == ["c1"]
    head = [rng.normal(size=(16 * 2, 3)).astype(np.float32), np.ones(3, np.float32)]
    pruned = prune(model, {"c1": [1, 3]}, new_weights={"head": head}, analysis=analysis)
    assert isinstance(pruned, tf.keras.Sequential)
    np.testing.assert_array_equal(pruned.get_layer("head").get_weights()[0], head[0])
    with pytest.raises(ValueError, match="needs"):
        prune(model, {"c1": [1, 3]}, new_weights={"head": [head[0][:5], head[1]]}, analysis=analysis)


def test_bad_keep_is_rejected():
    analysis = analyze(chain_gap())
    with pytest.raises(ValueError, match="unknown channel group 'nope'; prunable groups: c1, c2, c3"):
        prune(analysis.model, {"nope": [0]}, analysis=analysis)
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        analysis.check_keep({"c1": [0, 8]})
    with pytest.raises(ValueError, match="at least one"):
        analysis.check_keep({"c1": []})
    with pytest.raises(ValueError, match="outside"):
        analysis.macs_for({"c1": 0})
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        keep_counts(analysis, {"c1": 1.5})


# ---------------------------------------------------------------------------- selection
def test_l1_keeps_the_largest_filters():
    model = residual(projection=True)
    norms = np.array([5.0, 1.0, 7.0, 3.0, 0.5, 6.0, 2.0, 4.0])
    for name, scale in (("b", 1.0), ("proj", 0.5)):  # the tied group sums both producers
        layer = model.get_layer(name)
        weights = layer.get_weights()
        weights[0] = np.ones_like(weights[0]) * (norms * scale / np.prod(weights[0].shape[:-1]))
        layer.set_weights(weights)
    analysis = analyze(model)
    np.testing.assert_allclose(l1_scores(analysis, "b"), norms * 1.5, rtol=1e-5)
    np.testing.assert_array_equal(l1_keep(analysis, "b", 3), [0, 2, 5])
    pruned, info = prune_model(model, {"b": 0.4}, "l1")
    assert info.kept == {"b": [0, 2, 5]} and info.keep_counts["b"] == 3
    assert pruned.get_layer("proj").output_shape[-1] == 3


def test_energy_sees_the_batchnorm_and_the_readers_that_filter_norms_miss():
    """chain_gap: c1 (8 filters) -> BatchNorm -> ReLU -> c2. The largest filters are made worthless
    (their BatchNorm scale near zero, or c2 not reading them), so L1 keeps them and energy does not."""
    model = _randomize(chain_gap(), np.random.default_rng(5))
    c1, bn, c2 = (model.get_layer(name) for name in ("c1", "c1_bn", "c2"))
    kernel = c1.get_weights()[0]
    kernel[..., [0, 1]] *= 20.0  # the two largest filters by far
    c1.set_weights([kernel])
    gamma, beta, mean, variance = bn.get_weights()
    gamma[0], beta[0] = 1e-3, -5.0  # channel 0: nearly constant, then cut off by the ReLU
    bn.set_weights([gamma, beta, mean, variance])
    reader = c2.get_weights()
    reader[0][:, :, 1, :] = 0.0  # channel 1: nobody reads it
    c2.set_weights(reader)
    analysis = analyze(model)
    assert set(l1_keep(analysis, "c1", 4)) >= {0, 1}
    images = np.random.default_rng(6).normal(size=(64, 12, 12, 3)).astype(np.float32)
    _, info = prune_model(model, {"c1": 0.5}, "energy", sample_images=images)
    assert not {0, 1} & set(info.kept["c1"]) and info.keep_counts["c1"] == 4
    assert info.reconstructed == []  # kept with their own weights


def test_lasso_picks_one_of_each_collinear_pair():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(50, 4))
    columns = np.concatenate([base, 0.5 * base[:, :2], 3.0 * base[:, 2:]], axis=1)  # 4, 5 ~ 0, 1; 6, 7 ~ 2, 3
    gram = columns.T @ columns
    kept = lasso_keep(gram, 4)
    assert set(kept) == {0, 1, 6, 7}  # the larger copy needs the smaller coefficient


def _duplicated_linear_model(head: str, duplicate_reader: bool):
    """conv c1 (8 filters: 4 distinct + 4 scaled copies) -> c2 (conv or Dense), nothing non-linear.

    duplicate_reader: c2 also reads each copy through a scaled copy of its weights, so the
    copies' contributions to c2's output are collinear (what LASSO on fixed kernels can see).
    """
    rng = np.random.default_rng(7)
    scales = np.array([2.0, -1.5, 0.5, 3.0])
    inputs = tf.keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    if head == "conv":
        out = L.Conv2D(5, 3, padding="same", name="c2")(x)
    else:
        out = L.Dense(5, name="c2")(L.Flatten(name="flat")(L.AveragePooling2D(4, name="pool")(x)))
    model = tf.keras.Model(inputs, out)
    layer = model.get_layer("c1")
    kernel, bias = layer.get_weights()
    kernel[..., :4] = rng.normal(size=kernel[..., :4].shape)
    kernel[..., 4:] = kernel[..., :4] * scales
    bias[:4] = rng.normal(size=4)
    bias[4:] = bias[:4] * scales
    layer.set_weights([kernel, bias])
    reader = model.get_layer("c2")
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in reader.get_weights()]
    if duplicate_reader:
        rows = weights[0].reshape(-1, 8, 5)  # (positions, channels, outputs)
        rows[:, 4:, :] = rows[:, :4, :] * np.array([1.5, -1.0, 4.0, 0.5])[None, :, None]
        weights[0] = rows.reshape(weights[0].shape)
    reader.set_weights(weights)
    return model


@pytest.mark.parametrize("head", ["conv", "dense"])
@pytest.mark.parametrize("criterion, sequential", [("lasso", True), ("lasso", False), ("greedy", True)])
def test_reconstruction_is_exact_on_a_linear_toy(head, criterion, sequential):
    model = _duplicated_linear_model(head, duplicate_reader=criterion == "lasso")
    rng = np.random.default_rng(11)
    images = rng.normal(size=(60, 8, 8, 3)).astype(np.float32)
    test = rng.normal(size=(20, 8, 8, 3)).astype(np.float32)
    reference = model(test).numpy()

    def relative_error(candidate):
        return float(np.linalg.norm(candidate(test).numpy() - reference) / np.linalg.norm(reference))

    pruned, info = prune_model(model, {"c1": 0.5}, criterion, images, sequential=sequential)
    assert info.selection == {"c1": criterion} and info.reconstructed == ["c2"]
    assert pruned.get_layer("c1").output_shape[-1] == 4
    assert sorted(k % 4 for k in info.kept["c1"]) == [0, 1, 2, 3]  # one of each duplicated pair
    assert relative_error(pruned) < 1e-3
    assert info.macs_after == count_macs(pruned) < info.macs_before
    plain, _ = prune_model(model, {"c1": 0.5}, "l1")
    assert relative_error(plain) > 0.1


@pytest.mark.parametrize("head", ["conv", "dense"])
@pytest.mark.parametrize("sequential", [True, False])
def test_refit_shrinkage_moves_the_kept_weights_from_the_exact_fit_towards_their_own(head, sequential):
    model = _duplicated_linear_model(head, duplicate_reader=True)
    rng = np.random.default_rng(11)
    images = rng.normal(size=(60, 8, 8, 3)).astype(np.float32)
    test = rng.normal(size=(20, 8, 8, 3)).astype(np.float32)
    reference = model(test).numpy()
    reader = model.get_layer("c2")

    def fitted(shrinkage):
        pruned, info = prune_model(model, {"c1": 0.5}, "lasso", images, sequential=sequential,
                                   shrinkage=shrinkage)
        kept = np.asarray(info.kept["c1"])
        original = reader.get_weights()[0].reshape(-1, 8, 5)[:, kept, :]
        kernel = pruned.get_layer("c2").get_weights()[0].reshape(original.shape)
        error = float(np.linalg.norm(pruned(test).numpy() - reference) / np.linalg.norm(reference))
        return float(np.linalg.norm(kernel - original) / np.linalg.norm(original)), error

    distances, errors = zip(*(fitted(shrinkage) for shrinkage in (0.0, 0.1, 1.0, 1e6)))
    assert errors[0] < 1e-3 and distances[0] > 0.3  # the exact fit moves the duplicates' weight over
    assert distances[0] > distances[1] > distances[2] > distances[3] and distances[3] < 1e-4
    assert errors[0] < errors[1] < errors[2] < errors[3]  # and pays for it in fit


def test_lasso_falls_back_to_l1_when_it_cannot_refit(rng):
    model = _randomize(separable_block(), rng)
    images = rng.normal(size=(16, 10, 10, 3)).astype(np.float32)
    _, info = prune_model(model, {"c1": 0.5, "sep": 0.5}, "lasso", images)
    assert info.selection["c1"].startswith("l1 (fallback") and info.selection["sep"] == "lasso"
    assert "sep" in info.not_reconstructed and info.reconstructed == ["c2"]
    with pytest.raises(ValueError, match="sample_images"):
        prune_model(model, {"c1": 0.5}, "lasso")
    with pytest.raises(ValueError, match="unknown channel criterion"):
        prune_model(model, {"c1": 0.5}, "random")


@tf.keras.utils.register_keras_serializable("pocketflow_tests")
class ChannelScale(L.Layer):
    """A user's own per-channel layer: unknown to the analysis until a layer rule says what it is."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(int(input_shape[-1]),), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def _scaled_chain():
    inputs = tf.keras.Input((10, 10, 3))
    x = _conv_bn_relu(inputs, 8, "c1")
    x = ChannelScale(name="scale")(x)
    x = L.Conv2D(6, 3, padding="same", name="c2")(x)
    return tf.keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def test_a_registered_layer_rule_makes_a_custom_layer_prunable(rng):
    from learners.channel_pruning.layer_rules import RULES, LayerRule, per_channel, register_layer_rule, slice_per_channel

    model = _randomize(_scaled_chain(), rng)
    before = analyze(model)
    assert "c1" not in before.groups and before.barriers[0].layer == "scale"  # unknown: its input is kept
    register_layer_rule(ChannelScale, LayerRule(per_channel, slice_per_channel))
    try:
        analysis = analyze(model)
        assert analysis.groups["c1"].consumers == ("c1_bn", "scale", "c2") and not analysis.barriers
        keep = {"c1": np.array([0, 2, 3, 7])}
        pruned = prune(model, keep, analysis=analysis)
        assert pruned.get_layer("scale").get_weights()[0].shape == (4,)
        x = rng.normal(size=(2, 10, 10, 3)).astype(np.float32)
        np.testing.assert_allclose(pruned(x), _masked_reference(model, analysis, keep)(x), atol=1e-4)
        images = rng.normal(size=(8, 10, 10, 3)).astype(np.float32)
        refitted, info = prune_model(model, {"c1": 0.5}, "lasso", images)  # the reader behind it is re-fitted
        assert info.reconstructed == ["c2"] and refitted.get_layer("scale").get_weights()[0].shape == (4,)
    finally:
        del RULES[ChannelScale]


def test_a_registered_criterion_is_used_by_prune_model_and_accepted_by_the_config(rng):
    from learners.channel_pruning import CRITERIA, Criterion, register_criterion
    from learners.channel_pruning.learner import ChannelConfig
    from pocketflow.errors import ConfigError

    @register_criterion
    class LastChannels(Criterion):  # a user's rule: keep the last channels (needs no data)
        name = "test-last"
        needs_samples = False
        reconstructs = False

        def keep(self, analysis, group, count, moments, centered):
            return np.arange(analysis.groups[group].channels - count, analysis.groups[group].channels)

    try:
        model = _randomize(chain_gap(), rng)
        pruned, info = prune_model(model, {"c1": 0.5}, "test-last")
        assert info.selection == {"c1": "test-last"} and info.kept["c1"] == [4, 5, 6, 7]
        assert pruned.get_layer("c1").output_shape[-1] == 4
        assert ChannelConfig(criterion="test-last").criterion == "test-last"
    finally:
        del CRITERIA["test-last"]
    with pytest.raises(ConfigError, match="channel.criterion = 'test-last' is not allowed; choose one of: "
                                          "auto, l1, lasso, greedy, energy, search"):
        ChannelConfig(criterion="test-last")


# ---------------------------------------------------------------------------- shared ResNets
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _cifar(member: str, count: int):
    with tarfile.open(shared_file("cifar10/cifar-10-binary.tar.gz")) as archive:
        raw = archive.extractfile(f"cifar-10-batches-bin/{member}").read()
    records = np.frombuffer(raw, np.uint8).reshape(-1, 3073)[:count]
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return (images - MEAN) / STD, records[:, 0].astype(np.int64)


@pytest.fixture(scope="module")
def resnet20():
    return tf.keras.models.load_model(shared_file("pretrained/resnet20_cifar10.h5"), compile=False)


BLOCKS20 = [f"layer{stage}.{block}.conv1" for stage in (1, 2, 3) for block in range(3)]
# The residual stream through the zero-padding shortcuts: the stem's 16 channels run through every
# stage; stage 2 adds 8 + 8 channels that meet zeros in its shortcut, stage 3 another 16 + 16.
STREAM20 = {"conv1": 16, "layer2.0.conv2[0:8]": 8, "layer2.0.conv2[24:32]": 8, "layer3.0.conv2[0:16]": 16,
            "layer3.0.conv2[48:64]": 16}


def test_resnet20_analysis_and_half_pruning(resnet20, tmp_path):
    analysis = analyze(resnet20)
    assert set(analysis.groups) == set(BLOCKS20) | set(STREAM20)
    for name in BLOCKS20:
        assert analysis.groups[name].terminators == (name.replace("conv1", "conv2"),)
    assert {name: analysis.groups[name].channels for name in STREAM20} == STREAM20
    assert analysis.groups["layer3.0.conv2[0:16]"].terminators == ("layer3.1.conv1", "layer3.2.conv1", "linear")
    assert analysis.barriers == [] and list(analysis.frozen) == ["linear"]
    assert analysis.total_macs == count_macs(resnet20)

    pruned, info = prune_model(resnet20, {name: 0.5 for name in BLOCKS20}, "l1", analysis=analysis)
    assert info.macs_after == count_macs(pruned)
    assert 1.95 < info.macs_before / info.macs_after < 2.0
    assert analysis.total_macs / analysis.min_macs() > 2.5  # 2x and 2.5x are both reachable
    path = tmp_path / "resnet20_half.keras"
    pruned.save(path)
    loaded = tf.keras.models.load_model(path, compile=False)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), pruned(x), atol=1e-5)
    assert loaded.get_layer("layer3.2.conv1").output_shape[-1] == 32


def test_resnet20_stream_pruning_rewrites_the_shortcut_pads(resnet20, tmp_path):
    """Half of every stream band: the pads pad half as many zeros, and the pruned model computes
    what the original computes with those channels' readers masked."""
    analysis = analyze(resnet20)
    keep = {name: np.arange(0, channels, 2) for name, channels in STREAM20.items()}
    pruned = prune(resnet20, keep, analysis=analysis)
    assert pruned.get_layer("layer2.0.shortcut_chpad").padding == (4, 4)
    assert pruned.get_layer("layer3.0.shortcut_chpad").padding == (8, 8)
    assert pruned.get_layer("layer3.0.shortcut_unflat").output_shape[-1] == 32
    assert pruned.get_layer("layer3.2.conv2").output_shape[-1] == 32
    assert analysis.macs_for({name: len(indices) for name, indices in keep.items()}) == count_macs(pruned)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(pruned(x), _masked_reference(resnet20, analysis, keep)(x), atol=1e-4)
    path = tmp_path / "resnet20_stream.keras"
    pruned.save(path)
    np.testing.assert_allclose(tf.keras.models.load_model(path, compile=False)(x), pruned(x), atol=1e-5)


def test_resnet56_keep_all_is_exact():
    model = tf.keras.models.load_model(shared_file("pretrained/resnet56_cifar10.h5"), compile=False)
    analysis = analyze(model)
    assert len(analysis.groups) == 27 + 5  # block-internal channels, and the stream's 5 bands
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(prune(model, {}, analysis=analysis)(x), model(x), atol=1e-5)


def test_resnet20_lasso_reconstruction_beats_l1(resnet20):
    """The key quality check: at keep ratio 0.5, LASSO + least squares >> L1 without re-fit."""
    test_images, test_labels = _cifar("test_batch.bin", 1000)
    train_images, _ = _cifar("data_batch_1.bin", 500)
    ratios = {name: 0.5 for name in BLOCKS20}

    def accuracy(model):
        logits = model.predict(test_images, batch_size=250, verbose=0)
        return float(np.mean(np.argmax(logits, axis=1) == test_labels))

    started = time.perf_counter()
    lasso, info = prune_model(resnet20, ratios, "lasso", train_images)
    assert time.perf_counter() - started < 60
    assert len(info.reconstructed) == 9 and set(info.selection.values()) == {"lasso"}
    l1, _ = prune_model(resnet20, ratios, "l1")
    greedy, _ = prune_model(resnet20, ratios, "greedy", train_images)
    baseline, lasso_accuracy, l1_accuracy = accuracy(resnet20), accuracy(lasso), accuracy(l1)
    print(f"\nResNet-20, 1000 CIFAR-10 test images: original {baseline:.3f}; keep 0.5 (no fine-tuning): "
          f"LASSO+LS {lasso_accuracy:.3f}, greedy+LS {accuracy(greedy):.3f}, "
          f"L1 without reconstruction {l1_accuracy:.3f}")
    assert baseline > 0.88
    assert lasso_accuracy > l1_accuracy + 0.3


def test_baseline_statistics_are_computed_once_per_search(resnet20):
    """A search passes one cache: the baseline's moments (for every group's readers) and re-fit
    targets are computed on the first candidate and reused, and a candidate built from the cache
    is the one built without it."""
    train_images, _ = _cifar("data_batch_1.bin", 200)
    cache = BaselineCache()
    ratios = {name: 0.5 for name in BLOCKS20}
    first, info = prune_model(resnet20, ratios, "lasso", train_images, cache=cache)
    readers = {t for group in analyze(resnet20).groups.values() for t in group.terminators}
    assert set(cache.moments) == readers
    assert set(cache.targets) == set(info.reconstructed) and cache.target_bytes > 0
    second, _ = prune_model(resnet20, ratios, "lasso", train_images, cache=cache)
    alone, _ = prune_model(resnet20, ratios, "lasso", train_images)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(first(x), second(x))
    np.testing.assert_allclose(first(x), alone(x), rtol=1e-4, atol=1e-4)
