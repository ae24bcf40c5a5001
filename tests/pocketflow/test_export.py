"""What the runtime's default delegate runs of an exported file, and exports that it runs whole."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pocketflow.export import TFLiteModel, convert, delegation_of_file, write_atomic

RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(32, 8, 8, 3)).astype(np.float32)


def _shortcut_net() -> tf.keras.Model:
    """A down-sampling block whose shortcut only subsamples, as the shared ResNets' does."""
    inputs = tf.keras.Input((8, 8, 3), name="pixels")
    x = tf.keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    main = tf.keras.layers.Conv2D(6, 3, strides=2, padding="same")(x)
    average = tf.keras.layers.AveragePooling2D(1, 2)(x)
    maximum = tf.keras.layers.MaxPooling2D(1, 2, padding="same")(x)
    x = tf.keras.layers.Add()([main, average, maximum])
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(x), name="shortcut_net")


@pytest.mark.parametrize("mode", ["float", "int8"])
def test_a_subsampling_shortcut_ships_in_one_delegate_partition(tmp_path, mode):
    model = _shortcut_net()
    path = tmp_path / f"{mode}.tflite"
    write_atomic(path, convert(model, mode, representative=IMAGES))
    delegation = delegation_of_file(path)
    assert (delegation.partitions, delegation.fallback_ops) == (1, {}), delegation.summary()
    assert delegation.full and delegation.delegated_ops == delegation.ops
    loaded = TFLiteModel(path)
    assert loaded.interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["pixels"], "outputs": ["shortcut_net"]}}
    expected = model.predict(IMAGES, verbose=0)
    outputs = loaded.predict(IMAGES)
    if mode == "float":  # the replacement picks the same values: the same outputs as the Keras model
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    else:
        assert np.abs(outputs - expected).max() < 0.1 * np.abs(expected).max()
    assert [type(layer).__name__ for layer in model.layers].count("AveragePooling2D") == 1  # the model is untouched


def test_delegation_names_the_ops_the_delegate_declines(tmp_path):
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf.keras.layers.Lambda(lambda tensor: tensor[:, ::2, ::2, :])(x)  # a strided slice: XNNPACK declines it
    model = tf.keras.Model(inputs, tf.keras.layers.Conv2D(4, 3, padding="same")(x))
    path = tmp_path / "sliced.tflite"
    write_atomic(path, convert(model, "float"))
    delegation = delegation_of_file(path)
    assert delegation.fallback_ops == {"STRIDED_SLICE": 1}
    assert (delegation.partitions, delegation.ops, delegation.delegated_ops) == (2, 3, 2)
    assert not delegation.full
    assert delegation.summary() == "2 of 3 ops in 2 delegate partitions; on the reference kernels: STRIDED_SLICE"


def test_nested_and_subclassed_models_are_exported_whole_and_left_as_they_were(tmp_path):
    class Subsampled(tf.keras.Model):
        def __init__(self):
            super().__init__(name="subsampled")
            self.pool = tf.keras.layers.AveragePooling2D(1, 2)

        def call(self, inputs):
            return self.pool(inputs)

    inner_inputs = tf.keras.Input((8, 8, 4))
    inner = tf.keras.Model(inner_inputs, tf.keras.layers.AveragePooling2D(1, 2)(inner_inputs), name="inner")
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(Subsampled()(inner(x)))
    model = tf.keras.Model(inputs, x)
    layers = [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.Layer)]
    before = [(len(layer.inbound_nodes), type(layer).call) for layer in layers]
    path = tmp_path / "nested.tflite"
    write_atomic(path, convert(model, "float"))
    np.testing.assert_allclose(TFLiteModel(path).predict(IMAGES), model.predict(IMAGES, verbose=0), rtol=1e-5,
                               atol=1e-5)
    assert delegation_of_file(path).full
    # The model's graph (what the channel analysis walks) and its layers' calls are as they were.
    assert [(len(layer.inbound_nodes), type(layer).call) for layer in layers] == before
    assert all("call" not in vars(layer) for layer in layers)
