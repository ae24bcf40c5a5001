"""non-uniform: codebook initializations and Lloyd iterations (known answers), cluster fine-tuning
keeps at most 2**b values per kernel, the bit allocation under --target-bits / --target-compression,
the codebook file round trip (Keras and TFLite), and the default job at 4 bits end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
import tensorflow as tf

from learners.base import LEARNERS, LearnerContext
from learners.bit_budget import average_bits
from learners.nonuniform_quantization.artifact import QuantizedKernel, load_artifact
from learners.nonuniform_quantization.clustering import (AdaptiveClusterProjection, ClusterProjection,
                                                         fit_bits_to_bytes)
from learners.nonuniform_quantization.codebooks import (Layout, assign_scalar, init_codebook, kmeans_1d,
                                                        kmeans_plus_plus, scalar_codebook, scalar_layout)
from learners.nonuniform_quantization.learner import NonUniformConfig, NonUniformLearner
from learners.packing import distinct_values, read_packed
from learners.weight_sparsification.masks import prunable_weights, variables_by_key
from pocketflow.training import batchnorm_layers
from pocketflow.config import TargetConfig
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteModel, convert
from pocketflow.training import accuracy
from tests.conftest import ROOT
from tests.learners.digits import trained_digits
from tests.loading import check_load_line
from tests.verify_run import assert_report_matches_files

L = tf.keras.layers


# ---------------------------------------------------------------------------- codebooks: known answers
def test_linear_init_spans_min_to_max():
    np.testing.assert_allclose(init_codebook(np.arange(11.0), 3, "linear"), [0.0, 5.0, 10.0])
    np.testing.assert_allclose(init_codebook(np.array([-1.0, 0.2, 3.0]), 5, "linear"), [-1.0, 0.0, 1.0, 2.0, 3.0])


def test_quantile_init_puts_centroids_at_the_mid_quantiles():
    # quantiles 1/8, 3/8, 5/8, 7/8 of 0..7 with linear interpolation: 7 * q
    np.testing.assert_allclose(init_codebook(np.arange(8.0), 4, "quantile"), [0.875, 2.625, 4.375, 6.125])
    skewed = np.concatenate([np.zeros(90), np.full(10, 5.0)])
    assert list(init_codebook(skewed, 2, "quantile")) == [0.0, 0.0]  # density-based: both in the mass


def test_kmeans_plus_plus_seeds_one_centroid_per_separated_cluster():
    values = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 20.0, 20.2])
    for seed in range(5):
        centroids = init_codebook(values, 3, "kmeans++", seed=seed)
        assert sorted(int(c // 5) for c in centroids) == [0, 2, 4], centroids  # one from each group
        np.testing.assert_array_equal(centroids, init_codebook(values, 3, "kmeans++", seed=seed))
    # fewer distinct points than centroids: the extra ones repeat a point instead of failing
    assert kmeans_plus_plus(np.zeros((4, 1)), 3).shape == (3, 1)


def test_lloyd_iterations_and_assignment():
    centroids, codes = kmeans_1d(np.array([0.0, 1.0, 9.0, 10.0]), np.array([0.0, 10.0]))
    np.testing.assert_allclose(centroids, [0.5, 9.5])
    np.testing.assert_array_equal(codes, [0, 0, 1, 1])
    # nearest centroid, whatever the codebook's order; a tie goes to the lower centroid
    np.testing.assert_array_equal(assign_scalar(np.array([0.1, 4.9, 5.0, 7.0]), np.array([10.0, 0.0])), [1, 1, 1, 0])
    # an empty cluster keeps its centroid and is never used
    centroids, codes = kmeans_1d(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 100.0]))
    assert centroids[2] == 100.0 and 2 not in codes


@pytest.mark.parametrize("method", ["linear", "quantile", "kmeans++"])
def test_scalar_codebook_has_at_most_2_to_the_bits_values_and_beats_its_init(method, rng):
    values = rng.standard_t(4, size=(3, 3, 16, 16)).astype(np.float32)
    for bits in (1, 2, 4):
        centroids, codes = scalar_codebook(values, bits, method, iterations=20)
        assert len(centroids) == 1 << bits and len(np.unique(centroids[codes])) <= 1 << bits
        error = np.mean((centroids[codes] - values.reshape(-1)) ** 2)
        start = init_codebook(values, 1 << bits, method)
        assert error <= np.mean((start[assign_scalar(values, start)] - values.reshape(-1)) ** 2) + 1e-12


def test_fit_bits_to_bytes_takes_bits_from_the_layers_above_their_proposal():
    cost = {name: [0] + [size * b for b in range(1, 9)] for name, size in (("a", 10), ("b", 100))}
    low, high = {"a": 1, "b": 1}, {"a": 8, "b": 8}
    assert fit_bits_to_bytes({"a": 8.0, "b": 2.0}, cost, 10 * 8 + 100 * 2, low, high) == {"a": 8, "b": 2}
    # 95 bytes over, both at their proposal: the step that saves most (a bit of "b") goes first
    assert fit_bits_to_bytes({"a": 4.0, "b": 4.0}, cost, 10 * 4 + 100 * 3 + 5, low, high) == {"a": 4, "b": 3}
    # slack is given back without exceeding the budget or the ceiling
    assert fit_bits_to_bytes({"a": 1.0, "b": 1.0}, cost, 10_000, low, {"a": 3, "b": 2}) == {"a": 3, "b": 2}
    assert fit_bits_to_bytes({"a": 1.0, "b": 1.0}, cost, 50, low, high) is None  # not even 1 bit fits


# ---------------------------------------------------------------------------- fine-tuning keeps the codebook
def small_model() -> tf.keras.Model:
    """Conv-BN-ReLU, a residual add, Reshape/Permute glue (as in the shared ResNets), a Dense head."""
    inputs = tf.keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    y = L.Conv2D(8, 3, name="conv")(L.ZeroPadding2D(1, name="pad")(x))
    x = L.ReLU(name="add_relu")(L.Add(name="add")([x, L.BatchNormalization(name="conv_bn")(y)]))
    x = L.Permute((2, 1), name="perm")(L.Reshape((64, 8), name="flat")(x))
    x = L.Reshape((8, 8, 8), name="unflat")(L.Permute((2, 1), name="perm_back")(x))
    return tf.keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def test_cluster_projection_keeps_2_to_the_bits_values_through_training_steps(rng):
    model = small_model()
    kernels = {}
    for layer_name, bits in (("stem", 2), ("conv", 3), ("head", 1)):
        variable = model.get_layer(layer_name).kernel
        centroids, codes = scalar_codebook(variable.numpy(), bits, "kmeans++")
        variable.assign(centroids[codes].reshape(variable.shape).astype(np.float32))
        kernels[layer_name] = (QuantizedKernel(layer_name, scalar_layout(variable.shape), bits, codes), variable)
    hook = ClusterProjection(kernels)
    optimizer = tf.keras.optimizers.legacy.SGD(0.5, momentum=0.9)
    images, labels = rng.normal(size=(16, 8, 8, 3)).astype(np.float32), rng.integers(0, 4, 16)
    before = {name: v.numpy().copy() for name, (_, v) in kernels.items()}
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, model(images), True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        hook()
    for name, (kernel, variable) in kernels.items():
        values = variable.numpy()
        assert not np.allclose(values, before[name])  # the centroids moved ...
        assert len(np.unique(values)) <= kernel.centroids  # ... and every weight still sits on one
        np.testing.assert_array_equal(kernel.decode(kernel.codebook_of(values)), values)


def test_adaptive_codes_follow_a_weight_that_crosses_the_midpoint():
    variable = tf.Variable(np.array([0.05, 0.05, 0.95, 0.95], np.float32))
    kernel = QuantizedKernel("k", scalar_layout((4,)), 1, np.array([0, 0, 1, 1]))
    hook = AdaptiveClusterProjection({"k": (kernel, variable)}, {"k": np.array([0.0, 0.1, 0.9, 1.0])})
    variable.assign_add([0.0, 0.5, 0.0, 0.0])  # a training step moves the second weight by +0.5
    hook()
    # its shadow (0.1 + 0.5) is past the midpoint 0.5: it joins the upper cluster, and both centroids
    # move to their members' means: {0.0} and {0.6, 0.9, 1.0}
    np.testing.assert_allclose(variable.numpy(), [0.0, 2.5 / 3, 2.5 / 3, 2.5 / 3], rtol=1e-6)
    shadows = hook.finish()
    np.testing.assert_array_equal(kernel.codes, [0, 1, 1, 1])
    np.testing.assert_allclose(shadows["k"], [0.0, 0.6, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(kernel.decode(kernel.codebook_of(variable.numpy())), variable.numpy())
    product = QuantizedKernel("p", Layout((4,), (0,), 2), 1, np.array([0, 1]))
    with pytest.raises(ValueError, match="scalar codebook"):
        AdaptiveClusterProjection({"p": (product, variable)}, {})


# ---------------------------------------------------------------------------- the learner on a trained net
@pytest.fixture(scope="module")
def trained():
    dataset, model, schedule = trained_digits(4)
    return dataset, model, schedule, len(convert(model, "float"))


def learner_for(trained, target: TargetConfig, **options) -> NonUniformLearner:
    dataset, model, schedule, float_bytes = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=target, distributed=SingleProcess(),
                             baseline_tflite_bytes=float_bytes)
    learner = NonUniformLearner(NonUniformConfig(**{"recovery_epochs": 0.05, "calibration_batches": 5, **options}),
                                context)
    learner.prepare(model)
    learner.reachable()
    return learner


def test_registered_targets_and_options():
    assert LEARNERS.get("non-uniform") is NonUniformLearner
    with pytest.raises(ConfigError, match="needs a target"):
        NonUniformLearner.check_target(TargetConfig())
    with pytest.raises(ConfigError, match="cannot meet target speedup"):
        NonUniformLearner.check_target(TargetConfig(speedup=2.0))
    with pytest.raises(ConfigError, match="min_bits"):
        NonUniformConfig(min_bits=3, max_bits=2)
    with pytest.raises(ConfigError, match="is not allowed"):
        NonUniformLearner.parse_options({"init": "random"}, "test")


def test_searched_allocations_meet_the_bits_target_and_never_outgrow_the_uniform_file(trained):
    learner = learner_for(trained, TargetConfig(bits=4))
    sizes = {w.key: w.size for w in learner._weights}
    layouts = learner._layouts()
    uniform = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    assert set(uniform.bits.values()) == {4} and uniform.init == "kmeans++"
    uniform_bytes = learner.predicted_bytes(uniform.bits, layouts)
    rng = np.random.default_rng(3)
    for _ in range(20):
        params = {f"bits_{key}": float(rng.uniform(1, 8)) for key in sizes}
        params["init"] = "linear"
        bits = learner.search_space(optuna.trial.FixedTrial(params)).bits
        assert average_bits(bits, sizes) <= 4.0 + 1e-9
        assert learner.predicted_bytes(bits, layouts) <= uniform_bytes
        assert average_bits(bits, sizes) >= 3.0  # most of the budget is used


def test_uniform_4_bit_candidate_round_trips_through_the_codebook_file(trained, tmp_path):
    dataset, baseline, _, float_bytes = trained
    learner = learner_for(trained, TargetConfig(bits=4))
    hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    candidate = learner.compress(hparams)
    metrics = learner.candidate_metrics(candidate)
    assert metrics["bits"] == 4.0 and metrics["compression"] >= 7.0
    finished = learner.finalize(learner.finetune(candidate, 0.1))
    model = finished.model
    kernels = variables_by_key(model, learner._weights)
    assert all(n <= 16 for n in distinct_values([v.numpy() for v in kernels.values()]))

    fields = learner.write_artifacts(finished, tmp_path)
    path = tmp_path / "model_codebook.npz"
    assert fields["artifact_bytes"] == path.stat().st_size and float_bytes / fields["artifact_bytes"] >= 7.0
    assert metrics["bytes"] == fields["artifact_bytes"]  # the search measured the real file size
    assert fields["artifact_weight_max_difference"] == 0.0
    assert all(n <= 16 for n in fields["distinct_values"].values())
    _, _, entries = read_packed(path)
    packed = {e["name"]: e for e in entries if e["encoding"] == "packed"}
    assert {packed[v.name]["bits"] for v in kernels.values()} == {4}
    assert {packed[v.name]["decoder"] for v in kernels.values()} == {"codebook"}

    rebuilt = load_artifact(path)
    images, labels = dataset.test_arrays()
    np.testing.assert_array_equal(rebuilt(images[:64]), model(images[:64]))
    assert all(n <= 16 for n in distinct_values([v.numpy() for v in variables_by_key(rebuilt, learner._weights)
                                                 .values()]))
    tflite = TFLiteModel(fields["tflite_path"])
    np.testing.assert_allclose(tflite.predict(images[:64]), model(images[:64]), atol=1e-4)
    assert fields["tflite_accuracy"] == pytest.approx(accuracy(model, dataset.test(256)), abs=0.01)
    assert fields["artifact_accuracy"] >= accuracy(baseline, dataset.test(256)) - 0.03


def test_batchnorm_auto_re_estimates_stale_statistics_and_keep_keeps_them(trained):
    _, baseline, _, _ = trained
    stale = tf.keras.models.clone_model(baseline)
    stale.set_weights(baseline.get_weights())
    for layer in batchnorm_layers(stale):
        layer.moving_mean.assign(layer.moving_mean + 3.0)  # statistics that no longer match the data
    options = dict(mode="uniform", init="kmeans++", selection_samples=144)
    learner = learner_for(trained, TargetConfig(bits=8), batchnorm="auto", recovery_epochs=0.05, **options)
    learner.prepare(stale)
    learner.reachable()
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial({})))
    notes = learner.describe(candidate)
    assert notes["batchnorm"] == {"quantized": "recalibrate", "recovery": notes["batchnorm"]["recovery"]}
    selection = notes["batchnorm_selection"]["quantized"]
    assert selection["recalibrate"] > selection["keep"] + 0.2
    learner = learner_for(trained, TargetConfig(bits=8), batchnorm="keep", recovery_epochs=0.0, **options)
    learner.prepare(stale)
    learner.reachable()
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial({})))
    assert learner.describe(candidate)["batchnorm"] == {"quantized": "keep"}
    for kept, original in zip(batchnorm_layers(candidate.model), batchnorm_layers(stale)):
        np.testing.assert_array_equal(kept.moving_mean.numpy(), original.moving_mean.numpy())


def test_adaptive_codes_recover_more_than_fixed_codes_at_1_bit(trained):
    """The same 1-bit candidate fine-tuned with the same budget: re-assigning codes ends more accurate,
    and every kernel still holds at most 2 values and matches its (updated) codes."""
    dataset, baseline, _, _ = trained
    scores = {}
    for assignment in ("fixed", "adaptive"):
        learner = learner_for(trained, TargetConfig(bits=1), mode="uniform", init="kmeans++", recovery_epochs=0.0,
                              assignment=assignment)
        candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial({})))
        finished = learner.finalize(learner.finetune(candidate, 1))
        scores[assignment] = accuracy(finished.model, dataset.validation(256))
        for kernel, variable in finished.state.kernels.values():
            values = variable.numpy()
            assert len(np.unique(values)) <= 2
            np.testing.assert_array_equal(kernel.decode(kernel.codebook_of(values)), values)
        if assignment == "adaptive":
            assert learner.describe(finished)["codes_changed"]["codebook fine-tune"] > 0
    assert scores["adaptive"] > scores["fixed"] + 0.05, scores


def test_compression_target_is_met_on_the_real_file(trained):
    _, baseline, _, _ = trained
    learner = learner_for(trained, TargetConfig(compression=10.0), recovery_epochs=0.0)
    assert learner.reachable()["compression"] > 10.0
    rng = np.random.default_rng(5)
    params = {f"bits_{w.key}": float(rng.uniform(1, 8)) for w in learner._weights}
    params["init"] = "quantile"
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(params)))
    metrics = learner.candidate_metrics(candidate)
    assert 10.0 <= metrics["compression"] <= 11.0  # met, and most of the budget used


# ---------------------------------------------------------------------------- the default job
@pytest.fixture(scope="session")
def shared_baseline_cache(tmp_path_factory):
    """The environment for main.py runs: one baseline cache for the codebook tests' end-to-end runs,
    so the digits baseline is trained once per session."""
    return {**os.environ, "POCKETFLOW_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "codebook-baseline-cache")}


@pytest.mark.integration
def test_default_job_at_4_bits(tmp_path, shared_baseline_cache):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner", "non-uniform", "--target-bits", "4",
               "--trials", "2", "--finetune-epochs", "0.5", "--latency-runs", "5", "--output-dir", str(out),
               "--set", "non-uniform.recovery_epochs=0.05"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env=shared_baseline_cache)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert best["average_bits"] <= 4.0
    assert best["compression"] >= 7.0
    assert best["compression"] == pytest.approx(baseline["bytes"] / best["artifact_bytes"])
    assert (out / "model_codebook.npz").stat().st_size == best["artifact_bytes"]
    assert best["accuracy"] >= baseline["accuracy"] - 0.02
    assert best["artifact_accuracy"] >= baseline["accuracy"] - 0.02
    rebuilt = load_artifact(out / "model_codebook.npz")
    check_load_line(best["model_path"], tf.keras.models.load_model(best["model_path"], compile=False))
    assert_report_matches_files(out)
    learner_weights = prunable_weights(rebuilt)
    counts = distinct_values([v.numpy() for v in variables_by_key(rebuilt, learner_weights).values()])
    for weight, count in zip(learner_weights, counts):
        bits = best["layer_bits"][weight.key]
        assert count <= 1 << bits and best["distinct_values"][weight.key] == count
        if bits <= 4:
            assert count <= 16
