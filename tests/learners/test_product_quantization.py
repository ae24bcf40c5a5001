"""product-quant: sub-vector layouts, im2col rows that reproduce the convolution, the EM in the
metric of the layer's inputs (it must reconstruct output activations better than k-means on the
weights), the product-quantized file with float16 codebooks (Keras and TFLite round trip), the
compression target on the real file, and the job end to end on digits."""

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
from learners.nonuniform_quantization.activations import LayerStatistics, input_rows, layer_statistics
from learners.nonuniform_quantization.artifact import QuantizedKernel, load_artifact, write_artifact
from learners.nonuniform_quantization.codebooks import (Layout, block_metrics, fitting_block, input_major_perm,
                                                        kmeans_plus_plus, reconstruction_error, weighted_kmeans)
from learners.nonuniform_quantization.product import ProductQuantConfig, ProductQuantLearner, product_layout
from learners.packing import read_packed
from learners.weight_sparsification.masks import prunable_weights, variables_by_key
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


# ---------------------------------------------------------------------------- layouts and rows
def test_layout_cuts_spatial_kernels_and_puts_them_back(rng):
    kernel = rng.normal(size=(3, 3, 4, 5))
    layout = Layout(kernel.shape, input_major_perm(kernel.shape), 9)
    rows = layout.subvectors(kernel)
    assert rows.shape == (20, 9) and layout.count == 20
    np.testing.assert_array_equal(rows[0], kernel[:, :, 0, 0].reshape(-1))  # block 0, output 0
    np.testing.assert_array_equal(rows[6], kernel[:, :, 1, 1].reshape(-1))  # block 1, output 1
    np.testing.assert_array_equal(layout.assemble(rows), kernel)
    np.testing.assert_array_equal(layout.from_matrix(layout.matrix(kernel)), kernel)
    assert fitting_block(27, 8) == 3 and fitting_block(144, 16) == 16 and fitting_block(64, 9) == 8
    dense = prunable_weights(tf.keras.Sequential([tf.keras.Input((64,)), L.Dense(10)]))[0]
    assert product_layout(dense, 9).block == 8 and product_layout(dense, 9).count == 80


@pytest.mark.parametrize("padding,strides", [("same", 1), ("same", 2), ("valid", 1), ("valid", 2)])
def test_im2col_rows_reproduce_the_convolution(padding, strides, rng):
    layer = L.Conv2D(5, 3, strides=strides, padding=padding, use_bias=False)
    images = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
    outputs = layer(images).numpy()
    layout = Layout(tuple(layer.kernel.shape), input_major_perm(layer.kernel.shape), 9)
    rows = input_rows(layer, tf.constant(images))
    np.testing.assert_allclose(rows @ layout.matrix(layer.kernel.numpy()), outputs.reshape(-1, 5), atol=1e-4)


# ---------------------------------------------------------------------------- the activation objective
def test_weighted_kmeans_with_the_identity_metric_is_kmeans():
    points = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
    layout = Layout((2, 4), (0, 1), 2)  # 1 block, 4 columns: 4 sub-vectors of length 2
    codebook, codes = weighted_kmeans(points, block_metrics(None, layout), 2, columns=4, damping=0.0,
                                      init=np.array([[0.0, 0.0], [10.0, 10.0]]))
    np.testing.assert_allclose(codebook, [[0.0, 0.5], [10.0, 10.5]])
    np.testing.assert_array_equal(codes, [0, 0, 1, 1])


def _relu_features(count: int = 300):
    """Inputs of a second conv on real digits (ReLU features: strongly correlated, far from isotropic)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:count, :, :, None].astype(np.float32) / 16.0
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 1))
    features = L.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    conv = L.Conv2D(16, 3, padding="same", use_bias=False)
    conv(features)
    return input_rows(conv, tf.keras.Model(inputs, features)(images)).astype(np.float64), conv.kernel.numpy()


@pytest.mark.parametrize("k", [4, 16])
def test_activation_objective_reconstructs_outputs_better_than_weight_kmeans(k):
    rows, kernel = _relu_features()
    layout = Layout(kernel.shape, input_major_perm(kernel.shape), 9)
    subvectors = layout.subvectors(kernel).astype(np.float64)
    gram = rows.T @ rows
    errors = {}
    for name, gram_used in (("weights", None), ("activations", gram)):
        codebook, codes = weighted_kmeans(subvectors, block_metrics(gram_used, layout), k, columns=layout.columns,
                                          init=kmeans_plus_plus(subvectors, k, 0))
        approximation = layout.matrix(layout.assemble(codebook[codes]))
        errors[name] = reconstruction_error(rows, layout.matrix(kernel), approximation)
        # the statistics give the same error without keeping the rows
        outputs = rows @ layout.matrix(kernel)
        statistics = LayerStatistics(gram, rows.T @ outputs, float(np.sum(outputs ** 2)), len(rows))
        assert statistics.error(approximation) == pytest.approx(errors[name], rel=1e-6)
    assert errors["activations"] < 0.6 * errors["weights"], errors


def test_layer_statistics_match_the_sampled_rows_and_refit_recovers_the_kernel(rng):
    model = small_model()
    images = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    layer = model.get_layer("conv")
    layout = Layout(tuple(layer.kernel.shape), input_major_perm(layer.kernel.shape), 9)
    statistics = layer_statistics(model, model, "conv", layout, layer.kernel.numpy(), images, rows=10_000)
    assert statistics.rows == 8 * 64  # every position (fewer than asked for)
    assert statistics.error(layout.matrix(layer.kernel.numpy())) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(statistics.refit(ridge=0.0), layout.matrix(layer.kernel.numpy()), atol=1e-4)


# ---------------------------------------------------------------------------- the file
def small_model() -> tf.keras.Model:
    inputs = tf.keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    y = L.Conv2D(8, 3, name="conv")(L.ZeroPadding2D(1, name="pad")(x))
    x = L.ReLU(name="add_relu")(L.Add(name="add")([x, L.BatchNormalization(name="conv_bn")(y)]))
    x = L.Permute((2, 1), name="perm")(L.Reshape((64, 8), name="flat")(x))
    x = L.Reshape((8, 8, 8), name="unflat")(L.Permute((2, 1), name="perm_back")(x))
    return tf.keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def test_product_file_round_trip_with_float16_codebooks(tmp_path, rng):
    model = small_model()
    kernels = {}
    for weight, bits in zip(prunable_weights(model), (2, 3, 1)):
        variable = variables_by_key(model, [weight])[weight.key]
        layout = product_layout(weight, 9)
        codes = rng.integers(0, 1 << bits, layout.count)
        codebook = rng.normal(size=(1 << bits, layout.block)).astype(np.float16).astype(np.float32)
        kernel = QuantizedKernel(weight.key, layout, bits, codes, half_table=True)
        variable.assign(kernel.decode(codebook))
        kernels[weight.key] = (kernel, variable)
    for bn in ("stem_bn", "conv_bn"):  # the other tensors ship in float16: make them exactly representable
        for variable in model.get_layer(bn).weights:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(np.float16).astype(np.float32))
    size = write_artifact(model, kernels, tmp_path / "m.npz", half_rest=True)
    assert size == (tmp_path / "m.npz").stat().st_size
    _, _, entries = read_packed(tmp_path / "m.npz")
    decoders = {e["name"]: e.get("decoder") for e in entries}
    assert [decoders[v.name] for _, v in kernels.values()] == ["product"] * 3
    assert decoders[model.get_layer("stem_bn").gamma.name] == "float16"
    assert all(e.get("table_dtype") == "float16" for e in entries if e.get("decoder") == "product")
    rebuilt = load_artifact(tmp_path / "m.npz")
    for original, loaded in zip(model.get_weights(), rebuilt.get_weights()):
        np.testing.assert_array_equal(original, loaded)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt(images), model(images))


# ---------------------------------------------------------------------------- the learner
@pytest.fixture(scope="module")
def trained():
    dataset, model, schedule = trained_digits(4)
    return dataset, model, schedule, len(convert(model, "float"))


def learner_for(trained, target: TargetConfig, **options) -> ProductQuantLearner:
    dataset, model, schedule, float_bytes = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=target, distributed=SingleProcess(),
                             baseline_tflite_bytes=float_bytes)
    defaults = {"samples": 128, "rows": 2048, "iterations": 10, "calibration_batches": 5}
    learner = ProductQuantLearner(ProductQuantConfig(**{**defaults, **options}), context)
    learner.prepare(model)
    learner.reachable()
    return learner


def test_registered_targets_and_options():
    assert LEARNERS.get("product-quant") is ProductQuantLearner
    with pytest.raises(ConfigError, match="--target-compression R"):
        ProductQuantLearner.check_target(TargetConfig())
    with pytest.raises(ConfigError, match="block_size"):
        ProductQuantConfig(block_size=0)
    assert ProductQuantLearner.parse_options({"block_size": 9}, "test").block_size == 9
    assert ProductQuantLearner.parse_options({"block_size": "search"}, "test").block_size == "search"


def test_candidate_meets_15x_on_the_real_file_and_round_trips(trained, tmp_path):
    dataset, baseline, _, float_bytes = trained
    learner = learner_for(trained, TargetConfig(compression=15.0))
    hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    assert hparams.block == 9
    candidate = learner.compress(hparams)
    metrics = learner.candidate_metrics(candidate)
    assert metrics["compression"] >= 15.0
    notes = learner.describe(candidate)
    assert notes["weight_space_layers"] == [] and set(notes["layer_output_error"]) == set(hparams.bits)
    finished = learner.finalize(learner.finetune(candidate, 0.1))  # distilled from the baseline
    model = finished.model
    fields = learner.write_artifacts(finished, tmp_path)
    assert fields["artifact_bytes"] == (tmp_path / "model_pq.npz").stat().st_size
    assert float_bytes / fields["artifact_bytes"] >= 15.0
    assert fields["artifact_weight_max_difference"] == 0.0
    rebuilt = load_artifact(tmp_path / "model_pq.npz")
    images, _ = dataset.test_arrays()
    np.testing.assert_array_equal(rebuilt(images[:64]), model(images[:64]))
    np.testing.assert_allclose(TFLiteModel(fields["tflite_path"]).predict(images[:64]),
                               model(images[:64]), atol=1e-4)
    for weight, variable in variables_by_key(rebuilt, learner._weights).items():
        layout = product_layout(next(w for w in learner._weights if w.key == weight), hparams.block)
        distinct = np.unique(layout.subvectors(variable.numpy()), axis=0)
        assert len(distinct) <= 1 << hparams.bits[weight]  # every sub-vector is a codebook entry
    assert fields["artifact_accuracy"] >= accuracy(baseline, dataset.test(256)) - 0.05


def test_block_size_is_searched_and_every_proposal_fits_the_budget(trained):
    learner = learner_for(trained, TargetConfig(compression=15.0))
    rng = np.random.default_rng(2)
    limit = trained[3] / 15.0
    for block in (4, 8, 16):
        params = {f"bits_{w.key}": float(rng.uniform(1, 8)) for w in learner._weights}
        params["block_size"] = block
        hparams = learner.search_space(optuna.trial.FixedTrial(params))
        layouts = learner._layouts(block)
        assert learner.predicted_bytes(hparams.bits, layouts, block) <= limit
    bits_learner = learner_for(trained, TargetConfig(bits=2.0))
    hparams = bits_learner.search_space(optuna.trial.FixedTrial(bits_learner.reference_params()))
    assert bits_learner.bits_of(hparams.bits, bits_learner._layouts(hparams.block)) <= 2.0


# ---------------------------------------------------------------------------- the job
@pytest.fixture(scope="session")
def shared_baseline_cache(tmp_path_factory):
    """The environment for main.py runs: one baseline cache for the codebook tests' end-to-end runs."""
    return {**os.environ, "POCKETFLOW_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "codebook-baseline-cache")}


@pytest.mark.integration
def test_product_quant_job_ships_a_15x_smaller_file(tmp_path, shared_baseline_cache):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner", "product-quant", "--target-compression", "15",
               "--trials", "2", "--finetune-epochs", "0.5", "--latency-runs", "5", "--output-dir", str(out),
               "--set", "product-quant.samples=128"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env=shared_baseline_cache)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert best["compression"] >= 15.0
    assert best["compression"] == pytest.approx(baseline["bytes"] / best["artifact_bytes"])
    assert (out / "model_pq.npz").stat().st_size == best["artifact_bytes"]
    assert best["artifact_accuracy"] == pytest.approx(best["accuracy"], abs=0.003)
    assert best["accuracy"] >= baseline["accuracy"] - 0.05  # the drop is reported; on digits it is small
    check_load_line(best["model_path"], tf.keras.models.load_model(best["model_path"], compile=False))
    assert_report_matches_files(out)
