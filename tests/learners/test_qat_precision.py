"""QAT in bfloat16: TFMOT's wrappers trained through a mixed-precision twin, quantizers in float32."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from learners.uniform_quantization.qat import calibrate, quantize_aware
from pocketflow import precision
from pocketflow.config import DataConfig
from pocketflow.data import load_dataset
from pocketflow.export import TFLiteModel, convert, tflite_accuracy
from pocketflow.training import TrainSchedule, recalibrate_batchnorm, train

L = tf.keras.layers


def _residual_net(input_shape, classes: int) -> tf.keras.Model:
    """Conv-BN-ReLU, a residual join and a Dense head: every kind of wrapper the shared ResNets get."""
    tf.keras.utils.set_random_seed(3)
    inputs = tf.keras.Input(input_shape)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)))
    y = L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False)(x))
    x = L.ReLU()(L.Add()([x, y]))
    return tf.keras.Model(inputs, L.Dense(classes)(L.GlobalAveragePooling2D()(x)))


def _schedule(epochs: float, name: str) -> TrainSchedule:
    return TrainSchedule(epochs, 32, 0.02, "cosine", "sgd", 5e-4, False, precision=name)


@pytest.fixture(scope="module")
def setup():
    digits = load_dataset(DataConfig(name="digits"), seed=0)
    model = _residual_net(digits.input_shape, digits.num_classes)
    train(model, digits, TrainSchedule(6, 32, 0.05, "cosine", "sgd", 5e-4, False, precision="float32"))
    recalibrate_batchnorm(model, digits, batches=20, batch_size=32)  # a few epochs leave them far off
    return digits, model


def _ops(model: tf.keras.Model):
    """(op type, dtype) of the convolutions and fake-quantizers of one training-mode call."""
    function = tf.function(lambda images: model(images, training=True)).get_concrete_function(
        tf.TensorSpec([None, *model.input_shape[1:]], tf.float32))
    return [(op.type, op.outputs[0].dtype.name) for op in function.graph.get_operations()
            if op.type == "Conv2D" or op.type.startswith("FakeQuant")]


def test_a_qat_model_has_a_bfloat16_twin_whose_quantizers_compute_in_float32(setup):
    digits, model = setup
    qat_model, _ = quantize_aware(model)
    twin, reason = precision.mixed_twin(qat_model, "bfloat16")
    assert reason is None
    ops = _ops(twin)
    assert [dtype for kind, dtype in ops if kind == "Conv2D"] == ["bfloat16", "bfloat16"]
    assert {dtype for kind, dtype in ops if kind != "Conv2D"} == {"float32"} and len(ops) > 4
    assert {kind for kind, _ in _ops(qat_model)} == {kind for kind, _ in ops}  # the same quantizers, no more
    # The input's quantizer and the output layer stay float32, the rest computes in bfloat16.
    policies = {type(layer).__name__ + ":" + layer.dtype_policy.name for layer in twin.layers[1:]}
    assert policies == {"QuantizeLayer:float32", "QuantizeWrapperV2:mixed_bfloat16", "QuantizeWrapperV2:float32"}
    assert twin.layers[-1].dtype_policy.name == "float32"
    images = digits.sample_train(64, seed=1)
    np.testing.assert_allclose(twin(images).numpy(), qat_model(images).numpy(),
                               atol=0.05 * np.abs(qat_model(images).numpy()).max())


def test_qat_trains_in_bfloat16_and_ships_the_int8_file_float32_qat_gives(setup, caplog, tmp_path):
    """The same QAT fine-tuning in float32 and in bfloat16: the bfloat16 one runs through the twin (no
    fallback), hands back float32 wrappers whose ranges moved during training, and converts to an int8
    file as accurate as float32's."""
    digits, model = setup
    images = digits.sample_train(128, seed=2)
    trained = {}
    for name in ("float32", "bfloat16"):
        qat_model, _ = quantize_aware(model)
        calibrate(qat_model, model, images)
        calibrated = {w.name: w.numpy() for w in qat_model.weights if w.name.endswith(("_min:0", "_max:0"))}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pocketflow.training"):
            losses = train(qat_model, digits, _schedule(2, name), description=f"QAT {name}")
        assert "runs in float32" not in caplog.text
        assert losses[-1] < losses[0]
        assert all(layer.dtype_policy.name == "float32" for layer in qat_model.layers)
        assert all(weight.dtype in (tf.float32, tf.int32) for weight in qat_model.weights)
        moved = [key for key, value in calibrated.items()
                 if "kernel" not in key and not np.allclose(_weight(qat_model, key), value)]
        assert moved, "the activation ranges the twin trained were not handed back"
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(convert(qat_model, "int8", images))
        trained[name] = (losses, tflite_accuracy(TFLiteModel(path), *digits.test_arrays()))
    assert trained["bfloat16"][0] != trained["float32"][0]  # it did compute in bfloat16
    assert trained["float32"][1] > 0.8
    assert abs(trained["bfloat16"][1] - trained["float32"][1]) <= 0.03


def _weight(model: tf.keras.Model, name: str) -> np.ndarray:
    return next(w for w in model.weights if w.name == name).numpy()
