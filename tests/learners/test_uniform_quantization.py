"""uniform: QAT model building (unsupported layers stay float), calibration, weights copied back into a
plain Keras model, the PTQ path of the learner, targets, and the default int8 job end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from learners.base import LEARNERS, LearnerContext
from learners.uniform_quantization.learner import UniformConfig, UniformQuantizationLearner
from learners.uniform_quantization.qat import (calibrate, copy_back, float_layers, quantize_aware,
                                               tensor_dtypes)
from pocketflow.config import DataConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.export import convert
from pocketflow.training import TrainSchedule
from tests.conftest import ROOT
from tests.loading import check_load_line
from tests.verify_run import assert_report_matches_files

L = tf.keras.layers


def small_model(with_custom: bool = False) -> tf.keras.Model:
    """Conv-BN-ReLU, a residual add, padding/reshape glue (like the shared ResNets) and a Dense head."""
    inputs = tf.keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    y = L.ZeroPadding2D(1, name="pad")(x)
    y = L.Conv2D(8, 3, name="conv")(y)
    y = L.BatchNormalization(name="conv_bn")(y)
    x = L.ReLU(name="add_relu")(L.Add(name="add")([x, y]))
    x = L.Reshape((64, 8), name="flat")(x)
    x = L.Permute((2, 1), name="perm")(x)
    if with_custom:
        x = L.Lambda(lambda t: t * 2.0, name="double")(x)
    x = L.Reshape((8, 8, 8), name="unflat")(L.Permute((2, 1), name="perm_back")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(4, name="head")(x))


def test_registered_with_its_targets():
    assert LEARNERS.get("uniform") is UniformQuantizationLearner
    UniformQuantizationLearner.check_target(TargetConfig(bits=8))
    with pytest.raises(ConfigError, match="--target-bits"):
        UniformQuantizationLearner.check_target(TargetConfig(speedup=2.0))


def test_bad_options():
    with pytest.raises(ConfigError, match="qat_epochs"):
        UniformConfig(qat_epochs=-1)
    with pytest.raises(ConfigError, match="representative_samples"):
        UniformConfig(representative_samples=0)
    assert not UniformConfig(qat_epochs=0).trains and not UniformConfig(method="ptq").trains


def test_unsupported_layers_stay_float_and_are_listed(rng):
    model = small_model(with_custom=True)
    qat_model, left_float = quantize_aware(model)
    assert left_float == ["double (Lambda)"] == float_layers(model)
    images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    assert qat_model(images).shape == (16, 4)
    assert any(type(layer).__name__ == "QuantizeWrapperV2" for layer in qat_model.layers)


def test_calibration_and_copy_back_give_a_plain_keras_model(rng, tmp_path):
    model = small_model()
    images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    qat_model, left_float = quantize_aware(model)
    assert left_float == []
    assert calibrate(qat_model, model, images) > 0
    ranges = {w.name: float(w.numpy()) for w in qat_model.weights if w.name.endswith(("_min:0", "_max:0"))
              and "kernel" not in w.name}
    assert all(value != pytest.approx(6.0) and value != pytest.approx(-6.0) for value in ranges.values())
    # calibrated fake quantization stays close to the float model
    np.testing.assert_allclose(qat_model(images).numpy(), model(images).numpy(), atol=0.1 * np.abs(model(images)).max())
    for weight in qat_model.trainable_weights:  # stand-in for training
        weight.assign_add(tf.fill(weight.shape, 0.01))
    plain = copy_back(qat_model, model)
    assert not any("Quantize" in type(layer).__name__ for layer in plain.layers)
    stem = qat_model.get_layer("quant_stem").weights[0]
    np.testing.assert_array_equal(plain.get_layer("stem").kernel.numpy(), stem.numpy())
    path = tmp_path / "plain.keras"
    plain.save(path)
    reloaded = tf.keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(reloaded(images).numpy(), plain(images).numpy(), atol=1e-5)


def test_qat_model_converts_to_full_integer(rng, tmp_path):
    model = small_model()
    images = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    qat_model, _ = quantize_aware(model)
    calibrate(qat_model, model, images)
    path = tmp_path / "int8.tflite"
    path.write_bytes(convert(qat_model, "int8", images))
    dtypes = tensor_dtypes(path)
    assert set(dtypes["activations"]) == {"int8"}
    assert "int8" in dtypes["weights"] and "float32" not in dtypes["weights"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"), seed=0)


def _tiny_int8_setup(digits):
    """A one-conv digits model and a learner context aiming at int8."""
    inputs = tf.keras.Input(digits.input_shape)
    x = L.ReLU()(L.Conv2D(8, 3, padding="same")(inputs))
    model = tf.keras.Model(inputs, L.Dense(digits.num_classes)(L.GlobalAveragePooling2D()(x)))
    schedule = TrainSchedule(1, 32, 0.05, "cosine", "sgd", 5e-4, False)
    context = LearnerContext(dataset=digits, schedule=schedule, target=TargetConfig(bits=8),
                             distributed=SingleProcess(), baseline_tflite_bytes=len(convert(model, "float")),
                             latency_runs=3)
    return model, context


def test_ptq_path_ships_int8_without_training(digits, rng, tmp_path):
    model, context = _tiny_int8_setup(digits)
    learner = UniformQuantizationLearner(UniformConfig(method="ptq", compare_dynamic=False), context)
    assert learner.max_trials() == 1
    learner.prepare(model)
    assert learner.reachable()["bits"] == 8.0
    candidate = learner.compress(learner.options)
    assert candidate.model is model and candidate.state is None  # post-training int8: nothing to train
    candidate = learner.finalize(learner.finetune(candidate, 1.0))
    assert candidate.model is model
    fields = learner.write_artifacts(candidate, tmp_path)
    assert fields["method"] == "ptq" and fields["shipped_format"] == "int8 TFLite"
    assert fields["artifact_path"] == fields["ptq_int8_path"]
    assert fields["artifact_bytes"] == (tmp_path / "ptq_int8.tflite").stat().st_size


def test_without_the_baseline_file_there_is_no_made_up_compression(digits):
    """--export none leaves no baseline file: the int8 learner reports no compression estimate (it used to
    say 4.0), and a compression target needs the file: a clear error before anything runs."""
    import dataclasses

    model, context = _tiny_int8_setup(digits)
    without_file = dataclasses.replace(context, baseline_tflite_bytes=0)
    learner = UniformQuantizationLearner(UniformConfig(method="ptq"), without_file)
    learner.prepare(model)
    assert "compression" not in learner.reachable()
    assert "compression" not in learner.candidate_metrics(learner.compress(learner.options))
    with_file = UniformQuantizationLearner(UniformConfig(method="ptq"), context)
    with_file.prepare(model)
    assert with_file.reachable()["compression"] > 1
    wanted = dataclasses.replace(without_file, target=TargetConfig(compression=3.0))
    with pytest.raises(ConfigError, match="needs the baseline's float TFLite size"):
        UniformQuantizationLearner(UniformConfig(method="ptq"), wanted).prepare(model)


@pytest.mark.parametrize("ptq_wins", [False, True])
def test_the_model_is_the_one_the_shipped_file_is_converted_from(digits, tmp_path, monkeypatch, ptq_wins):
    """finalize chooses QAT or post-training int8 on validation scores; when post-training int8 ships,
    the finalized model (model.keras, the report's Keras figures) is the baseline it is converted from,
    not the QAT-trained twin; when QAT ships, it is the QAT-trained weights."""
    model, context = _tiny_int8_setup(digits)
    learner = UniformQuantizationLearner(UniformConfig(compare_dynamic=False, representative_samples=32), context)
    learner.prepare(model)
    candidate = learner.finetune(learner.compress(learner.options), 0.2)
    measured = learner._int8_validation(candidate.state)  # the real scores, then the choice forced
    assert set(measured) == {"qat", "ptq"} and all(0.0 <= value <= 1.0 for value in measured.values())
    forced = {"qat": 0.5, "ptq": 0.9} if ptq_wins else {"qat": 0.9, "ptq": 0.5}
    monkeypatch.setattr(learner, "_int8_validation", lambda state: forced)
    finished = learner.finalize(candidate)
    images = digits.sample_train(16, seed=1)
    if ptq_wins:
        assert finished.model is model
    else:
        assert finished.model is not model
        np.testing.assert_allclose(finished.model(images).numpy(), candidate.state.qat_model(images).numpy(),
                                   atol=1e-2)  # the QAT-trained weights (float, no fake quantization)
    fields = learner.write_artifacts(finished, tmp_path)
    assert fields["shipped_method"] == ("ptq" if ptq_wins else "qat")
    assert fields["artifact_path"] == (fields["ptq_int8_path"] if ptq_wins else str(tmp_path / "model_int8.tflite"))
    method = "ptq" if ptq_wins else "qat"  # the shipped file is the one finalize scored, not a second conversion
    assert open(fields["artifact_path"], "rb").read() == candidate.state.int8_files[method]
    assert (fields["qat_int8_validation_accuracy"], fields["ptq_int8_validation_accuracy"]) == (
        forced["qat"], forced["ptq"])


def test_below_eight_bits_is_reported_unreachable(digits):
    model = small_model()
    context = LearnerContext(dataset=digits, schedule=TrainSchedule(1, 32, 0.05, "cosine", "sgd", 0, False),
                             target=TargetConfig(bits=4), distributed=SingleProcess())
    learner = UniformQuantizationLearner(UniformConfig(), context)
    learner.prepare(model)
    assert learner.reachable()["bits"] > 4


@pytest.mark.integration
def test_default_int8_job(tmp_path):
    """The acceptance: int8 weights and activations in the shipped file, within 1 point of float."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner=uniform", "--target-bits", "8",
               "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert best["shipped_format"] == "int8 TFLite" and best["method"] == "qat"
    shipped_file = {"qat": "model_int8.tflite", "ptq": "ptq_int8.tflite"}[best["shipped_method"]]
    assert best["artifact_path"].endswith(shipped_file)  # the better on validation (ties: QAT)
    dtypes = tensor_dtypes(best["artifact_path"])
    assert set(dtypes["activations"]) == {"int8"}
    assert dtypes["weights"].get("int8", 0) > 0 and "float32" not in dtypes["weights"]
    assert best["tflite_accuracy"] >= baseline["tflite_accuracy"] - 0.01
    assert best["qat_int8_accuracy"] >= best["ptq_int8_accuracy"] - 0.01
    assert best["compression"] == pytest.approx(baseline["bytes"] / best["artifact_bytes"])
    assert best["compression"] > 3.0
    model = tf.keras.models.load_model(best["model_path"], compile=False)  # no custom objects
    assert not any("Quantize" in type(layer).__name__ for layer in model.layers)
    check_load_line(best["model_path"], model)
    assert_report_matches_files(out)
