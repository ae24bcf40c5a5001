"""uniform below 8 bits (mixed low-bit precision): quantizer known answers, straight-through training,
BatchNorm folding, the allocation, the packed artifact round trip, the strategy switch, --bits, and
the default job at --target-bits 4 end to end."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from learners.base import LearnerContext
from learners.bit_budget import average_bits
from learners.packing import load_packed, read_packed
from learners.uniform_quantization.allocation import greedy_bits, kl_divergence, sensitivity_bits
from learners.uniform_quantization.fold import foldable_pairs, fold_weights, folded_model
from learners.uniform_quantization.learner import UniformConfig, UniformQuantizationLearner
from learners.uniform_quantization.lowbit import (ShadowQuantizer, dequantize, distinct_per_channel, fake_quantize,
                                                  kernel_specs, mse_ratios, quantize, quantized_values)
from learners.uniform_quantization.mixed import SIZE_MARGIN_BYTES, MixedHyperparameters, MixedPrecisionLearner
from nets.digits_cnn import build_digits_cnn
from pocketflow.config import DataConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.export import convert
from pocketflow.training import TrainSchedule
from tests.conftest import ROOT
from tests.loading import check_load_line
from tests.verify_run import assert_report_matches_files, assert_search_summary_matches_trials

L = tf.keras.layers
SCHEMES = ("asymmetric", "symmetric")

# (in=4, out=2) kernel: channel 0 spans [-1, 1], channel 1 spans [0, 3]
KERNEL = np.array([[-1.0, 0.0], [-0.5, 0.5], [0.2, 1.0], [1.0, 3.0]], np.float32)


# ---------------------------------------------------------------------------- the quantizer
def test_asymmetric_two_bit_known_answer():
    codes, scales, zero_points = quantize(KERNEL, 2, axis=-1, scheme="asymmetric")
    np.testing.assert_allclose(scales.numpy(), [2 / 3, 1.0], rtol=1e-6)  # range / (2**2 - 1)
    np.testing.assert_allclose(zero_points.numpy(), [1.5, 0.0], atol=1e-5)  # -min / scale
    np.testing.assert_array_equal(codes.numpy().T, [[0, 1, 2, 3], [0, 0, 1, 3]])
    values = dequantize(codes, scales, zero_points, -1).numpy()
    np.testing.assert_allclose(values.T, [[-1, -1 / 3, 1 / 3, 1], [0, 0, 1, 3]], atol=1e-6)  # min and max exact


def test_symmetric_two_bit_is_ternary_known_answer():
    codes, scales, zero_points = quantize(KERNEL, 2, axis=-1, scheme="symmetric")
    np.testing.assert_allclose(scales.numpy(), [1.0, 3.0])  # max|w| / (2**(2-1) - 1)
    np.testing.assert_array_equal(zero_points.numpy(), [2, 2])
    np.testing.assert_array_equal(codes.numpy().T, [[1, 2, 2, 3], [2, 2, 2, 3]])
    np.testing.assert_allclose(dequantize(codes, scales, zero_points, -1).numpy().T, [[-1, 0, 0, 1], [0, 0, 0, 3]])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_stay_in_range_and_rounding_is_to_nearest(scheme, bits, rng):
    weights = rng.normal(size=(3, 3, 4, 6)).astype(np.float32) * rng.uniform(0.1, 2.0, size=6).astype(np.float32)
    codes, scales, zero_points = quantize(weights, bits, axis=-1, scheme=scheme)
    codes = codes.numpy()
    np.testing.assert_array_equal(codes, np.rint(codes))
    assert codes.min() >= (1 if scheme == "symmetric" else 0) and codes.max() <= 2 ** bits - 1
    values = dequantize(codes, scales, zero_points, -1).numpy()
    # without clipping, every weight is within half a step of its value, and a channel holds <= 2**bits values
    assert np.all(np.abs(values - weights) <= scales.numpy() / 2 + 1e-5)
    assert distinct_per_channel(values, -1) <= 2 ** bits - (1 if scheme == "symmetric" else 0)
    if scheme == "symmetric":
        np.testing.assert_array_equal(zero_points.numpy(), 2 ** (bits - 1))


def test_depthwise_kernels_are_quantized_along_their_input_channels():
    # (kh, kw, in=5, multiplier=1); channel c spans [-(c + 1), c + 1]
    weights = (np.linspace(-1, 1, 9).reshape(3, 3, 1, 1) * np.arange(1, 6).reshape(1, 1, 5, 1)).astype(np.float32)
    codes, scales, _ = quantize(weights, 3, axis=2, scheme="asymmetric")
    assert codes.shape == weights.shape
    np.testing.assert_allclose(scales.numpy(), 2 * np.arange(1, 6) / 7, rtol=1e-6)


def test_clipping_by_least_squares_never_loses_to_min_max(rng):
    weights = rng.standard_t(3, size=(3, 3, 8, 4)).astype(np.float32)  # heavy tails: clipping pays
    for scheme in SCHEMES:
        ratios = mse_ratios(weights, 2, -1, scheme)
        assert ratios.shape == (4,) and np.all((ratios > 0) & (ratios <= 1))
        clipped = quantized_values(weights, 2, -1, scheme, ratios).numpy()
        plain = quantized_values(weights, 2, -1, scheme).numpy()
        error = lambda values: np.sum(np.square(values - weights), axis=(0, 1, 2))  # noqa: E731
        assert np.all(error(clipped) <= error(plain) + 1e-5)
        assert np.any(ratios < 1)


def test_ste_gradient_passes_straight_through():
    weights = tf.Variable(KERNEL)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fake_quantize(weights, 2, -1) * tf.constant([[1.0, 2.0]]))
    np.testing.assert_array_equal(tape.gradient(loss, weights).numpy(), np.tile([[1.0, 2.0]], (4, 1)))
    np.testing.assert_allclose(fake_quantize(KERNEL, 2, -1).numpy(), quantized_values(KERNEL, 2, -1).numpy())


def test_shadow_quantizer_trains_the_float_shadow_with_quantized_gradients(rng):
    inputs = tf.keras.Input((4,))
    model = tf.keras.Model(inputs, L.Dense(3, use_bias=False, name="dense")(inputs))
    specs = kernel_specs(model)
    assert [(s.key, s.axis) for s in specs] == [("dense/kernel", 1)]
    quantizer = ShadowQuantizer(specs)
    quantizer.configure({"dense/kernel": 3}, {"dense/kernel": np.ones(3)}, "asymmetric")
    float_kernel = model.get_layer("dense").kernel.numpy()
    quantizer.start()
    kernel = model.get_layer("dense").kernel
    np.testing.assert_allclose(kernel.numpy(), quantized_values(float_kernel, 3, 1).numpy())
    x = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x)))
    gradient = tape.gradient(loss, kernel)  # taken at the quantized kernel
    tf.keras.optimizers.legacy.SGD(0.01).apply_gradients([(gradient, kernel)])
    quantizer()
    shadow = quantizer.shadow["dense/kernel"].numpy()
    np.testing.assert_allclose(shadow, float_kernel - 0.01 * gradient.numpy(), atol=1e-6)  # STE on the shadow
    np.testing.assert_allclose(kernel.numpy(), quantized_values(shadow, 3, 1).numpy())
    codes, scales, zero_points, bits = quantizer.encoded("dense/kernel")
    assert bits == 3 and codes.dtype == np.int64
    np.testing.assert_allclose(dequantize(codes, scales, zero_points, 1).numpy(), kernel.numpy(), atol=1e-7)


# ---------------------------------------------------------------------------- allocation
SIZES = {"first": 432, "middle": 9216, "big": 36864, "head": 640}


def test_power_zero_is_uniform_and_sensitivity_moves_bits_to_sensitive_layers():
    sensitivity = {"first": 0.05, "middle": 0.02, "big": 0.002, "head": 0.03}
    assert sensitivity_bits(sensitivity, SIZES, 4.0, 0.0, 3) == {key: 4 for key in SIZES}
    bits = sensitivity_bits(sensitivity, SIZES, 4.0, 1.0, 3)
    assert average_bits(bits, SIZES) <= 4.0 + 1e-9
    assert bits["first"] == bits["head"] == 8 and bits["big"] < 4 < bits["middle"]
    assert all(2 <= value <= 8 for value in greedy_bits(sensitivity, SIZES, 2.5, 3).values())


def test_kl_divergence_known_answers():
    logits = np.array([[2.0, 0.0, -1.0]])
    assert kl_divergence(logits, logits, probabilities=False) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    assert kl_divergence(p, q, probabilities=True) == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(5.0))


# ---------------------------------------------------------------------------- BatchNorm folding
def residual_model() -> tf.keras.Model:
    """Conv-BN-ReLU, a residual add (a conv feeding two consumers: not folded), a depthwise block, a head."""
    inputs = tf.keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    shared = L.Conv2D(8, 3, padding="same", name="shared")(x)
    y = L.BatchNormalization(name="shared_bn")(shared)
    x = L.ReLU(name="add_relu")(L.Add(name="add")([y, shared]))
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = L.ReLU(name="dw_relu")(L.BatchNormalization(name="dw_bn")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(10, name="head")(x))


def _randomize_batchnorm(model: tf.keras.Model, rng) -> None:
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, channels), rng.normal(size=channels), rng.normal(size=channels),
                               rng.uniform(0.5, 2.0, channels)])


def test_batchnorm_folds_exactly_where_it_is_unambiguous(rng):
    model = residual_model()
    _randomize_batchnorm(model, rng)
    pairs = foldable_pairs(model)
    assert {(p.producer, p.batchnorm) for p in pairs} == {("stem", "stem_bn"), ("depthwise", "dw_bn")}
    folded = folded_model(model, pairs)
    gains = fold_weights(model, folded, pairs)
    assert set(gains) == {"stem", "depthwise"}
    assert not {"stem_bn", "dw_bn"} & {layer.name for layer in folded.layers}
    assert "shared_bn" in {layer.name for layer in folded.layers}
    images = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(folded(images).numpy(), model(images, training=False).numpy(), atol=1e-4)


# ---------------------------------------------------------------------------- the learner and its file
@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"), seed=0)


def small_digits_model(input_shape) -> tf.keras.Model:
    inputs = tf.keras.Input(input_shape)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(x))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv2")(x)
    x = L.ReLU(name="relu2")(L.BatchNormalization(name="bn2")(x))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(10, name="head")(x))


def _learner(digits, model, target: TargetConfig, **options) -> MixedPrecisionLearner:
    schedule = TrainSchedule(1, 32, 0.05, "cosine", "sgd", 5e-4, False)
    context = LearnerContext(dataset=digits, schedule=schedule, target=target, distributed=SingleProcess(),
                             baseline_tflite_bytes=len(convert(model, "float")), latency_runs=5)
    defaults = dict(recovery_epochs=0.1, calibration_batches=4, sensitivity_samples=64, representative_samples=32)
    defaults.update(options)
    return MixedPrecisionLearner(UniformConfig(**defaults), context)


def test_packed_artifact_round_trip(digits, rng, tmp_path):
    model = small_digits_model(digits.input_shape)
    _randomize_batchnorm(model, rng)
    learner = _learner(digits, model, TargetConfig(bits=4), scheme="symmetric", recovery_epochs=0.05)
    learner.prepare(model)
    reached = learner.reachable()
    assert reached["bits"] == 2 and reached["compression"] > 1
    bits = {"conv1/kernel": 8, "conv2/kernel": 3, "head/kernel": 2}
    hparams = MixedHyperparameters("symmetric", "sensitivity", 1.0, bits, average_bits(bits, learner._sizes))
    candidate = learner.compress(hparams)
    # BatchNorm is frozen during the STE recovery (default): the baseline's statistics are kept
    np.testing.assert_array_equal(candidate.model.get_layer("bn2").moving_variance.numpy(),
                                  model.get_layer("bn2").moving_variance.numpy())
    assert all(layer.trainable for layer in candidate.model.layers)
    assert not np.array_equal(candidate.model.get_layer("conv2").kernel.numpy(), model.get_layer("conv2").kernel.numpy())
    metrics = learner.candidate_metrics(candidate)
    assert metrics["bits"] == pytest.approx(hparams.average_bits) and metrics["bytes"] > 0
    candidate = learner.finalize(learner.finetune(candidate, 0.05))
    fields = learner.write_artifacts(candidate, tmp_path)
    path = tmp_path / "model_lowbit.npz"
    assert fields["shipped_format"] == "packed low-bit" and fields["artifact_path"] == str(path)
    assert fields["artifact_bytes"] == path.stat().st_size == metrics["bytes"]
    assert abs(fields["artifact_bytes"] - learner.predicted_bytes(bits)) <= SIZE_MARGIN_BYTES
    rebuilt = load_packed(path)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in rebuilt.layers)  # folded into the file
    _, _, entries = read_packed(path)
    assert {e["name"].split("/")[0]: e["bits"] for e in entries if e["encoding"] == "packed"} == \
        {"conv1": 8, "conv2": 3, "head": 2}
    for key, width in bits.items():
        layer = key.split("/")[0]
        assert distinct_per_channel(rebuilt.get_layer(layer).kernel.numpy(), -1) <= 2 ** width
    images = digits.sample_train(32, seed=1)
    np.testing.assert_allclose(rebuilt(images).numpy(), candidate.model(images, training=False).numpy(), atol=1e-4)
    assert fields["packed_keras_accuracy"] == pytest.approx(fields["tflite_accuracy"], abs=0.01)
    assert fields["tflite_latency_ms"] > 0 and 0 <= fields["int8_activations_tflite_accuracy"] <= 1
    description = learner.describe(candidate)
    assert description["layer_bits"] == bits and description["folded_batchnorm"] == ["bn1", "bn2"]


def test_search_space_reference_is_uniform_and_compression_budget_is_met(digits):
    model = build_digits_cnn(digits.input_shape, digits.num_classes, width=16)  # float TFLite ~68 KB
    learner = _learner(digits, model, TargetConfig(compression=5.0), allocation="free", fold_batchnorm=False)
    learner.prepare(model)
    learner.reachable()
    import optuna

    budget = learner.budget()
    assert 4.0 < budget < 4.5  # the bits that leave the file 5x smaller than the float TFLite
    reference = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    # uniform floor(budget) bits; the leftover fraction of a bit goes to the smallest layers
    assert min(reference.bits.values()) == 4 and reference.average_bits <= budget + 1e-9
    assert learner.predicted_bytes(reference.bits) <= learner.context.baseline_tflite_bytes / 5.0
    searched = learner.search_space(optuna.trial.FixedTrial({f"bits_{k}": 8.0 if k == "block4_conv/kernel" else 2.0
                                                             for k in learner._sizes}))
    assert searched.bits["block4_conv/kernel"] > reference.bits["block4_conv/kernel"]  # the proposal's shape is kept
    assert learner.predicted_bytes(searched.bits) <= learner.context.baseline_tflite_bytes / 5.0


# ---------------------------------------------------------------------------- switching and flags
@pytest.mark.parametrize("target, options, expected", [
    (TargetConfig(bits=8), {}, UniformQuantizationLearner),
    (TargetConfig(), {}, UniformQuantizationLearner),
    (TargetConfig(bits=4), {}, MixedPrecisionLearner),
    (TargetConfig(), {"bits": 3}, MixedPrecisionLearner),
    (TargetConfig(), {"bits": 8}, UniformQuantizationLearner),
    (TargetConfig(compression=8), {}, MixedPrecisionLearner),
    (TargetConfig(compression=2.5), {}, UniformQuantizationLearner),
    (TargetConfig(bits=8), {"mode": "mixed"}, MixedPrecisionLearner),
])
def test_uniform_hands_low_bit_targets_to_the_mixed_strategy(target, options, expected):
    assert UniformQuantizationLearner.strategy(UniformConfig(**options), target) is expected


def test_conflicting_bit_options_are_clear_errors():
    with pytest.raises(ConfigError, match="selects the int8 path"):
        UniformQuantizationLearner.strategy(UniformConfig(bits=8), TargetConfig(bits=4))
    with pytest.raises(ConfigError, match="uniform.bits = 9"):
        UniformConfig(bits=9)
    with pytest.raises(ConfigError, match="min_bits"):
        UniformConfig(min_bits=5, max_bits=4)


@pytest.mark.parametrize("learner, key", [("uniform", "uniform"), ("weight-sparse", "weight-sparse")])
def test_bits_flag_goes_to_the_selected_learner(learner, key):
    from pocketflow.cli import build_parser, merged_config_dict

    data, _ = merged_config_dict(build_parser().parse_args(["--learner", learner, "--bits", "8"]))
    assert data[key]["bits"] == 8


def test_bits_flag_on_a_learner_without_bits_is_a_clear_error():
    from pocketflow.cli import build_parser, merged_config_dict

    args: argparse.Namespace = build_parser().parse_args(["--learner", "channel", "--bits", "4"])
    with pytest.raises(ConfigError, match="learner 'channel' has no 'bits'.*uniform"):
        merged_config_dict(args)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.integration
def test_default_job_at_four_bits(tmp_path):
    """The acceptance on the default (digits, digits_cnn): the packed file >= 7x smaller than the float
    TFLite, accuracy within 2 points; the search starts from uniform 4 bits."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner", "uniform", "--target-bits", "4", "--trials", "2",
               "--finetune-epochs", "0.5", "--latency-runs", "5", "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert best["shipped_format"] == "packed low-bit"
    assert best["artifact_bytes"] == (out / "model_lowbit.npz").stat().st_size
    assert best["compression"] == pytest.approx(baseline["bytes"] / best["artifact_bytes"])
    assert best["compression"] >= 7.0
    assert best["average_bits"] <= 4.0 + 1e-9 and all(2 <= b <= 8 for b in best["layer_bits"].values())
    assert best["tflite_accuracy"] >= baseline["accuracy"] - 0.02
    assert best["packed_keras_accuracy"] >= baseline["accuracy"] - 0.02
    check_load_line(best["model_path"], tf.keras.models.load_model(best["model_path"], compile=False))
    assert_report_matches_files(out)
    assert best["tflite_latency_ms"] > 0 and best["int8_activations_tflite_accuracy"] >= baseline["accuracy"] - 0.03
    assert_search_summary_matches_trials(out)
