"""weight-sparse: exact allocation, masks and the 2:4 pattern, the polynomial schedule, the sparse
container round trip, sparse TFLite size and parity, the learner's targets, and the default job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import tensorflow as tf

from learners.base import LEARNERS, LearnerContext
from learners.weight_sparsification.artifact import (
    container_members, container_to_tflite, load_container, read_container, sparse_tflite, write_container,
)
from learners.weight_sparsification.learner import WeightSparseConfig, WeightSparseLearner
from learners.weight_sparsification.masks import (
    MaskSet, PrunableWeight, allocate, apply_masks, load_masks, magnitude_mask, nm_pattern_holds,
    prunable_weights, save_masks, variables_by_key,
)
from learners.weight_sparsification.schedule import GradualPruning, is_pruning_step, polynomial_sparsity
from pocketflow.config import TargetConfig
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteModel, convert, tflite_accuracy
from pocketflow.training import accuracy
from tests.conftest import ROOT, shared_file
from tests.learners.digits import trained_digits
from tests.loading import check_load_line
from tests.verify_run import assert_report_matches_files

L = tf.keras.layers


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained():
    return trained_digits(6)


def learner_for(trained, target: TargetConfig, **options) -> WeightSparseLearner:
    dataset, model, schedule = trained
    float_bytes = len(convert(model, "float")) if target.compression else 0
    context = LearnerContext(dataset=dataset, schedule=schedule, target=target, distributed=SingleProcess(),
                             baseline_tflite_bytes=float_bytes)
    learner = WeightSparseLearner(WeightSparseConfig(**options), context)
    learner.prepare(model)
    return learner


def odd_model() -> tf.keras.Model:
    """Reshape/Permute glue (like the shared ResNets' shortcuts) and a depthwise convolution."""
    inputs = tf.keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    flat = L.Reshape((64, 8), name="flat")(x)
    flat = L.Permute((2, 1), name="perm")(flat)
    flat = L.Permute((2, 1), name="perm_back")(flat)
    x = L.Reshape((8, 8, 8), name="unflat")(flat)
    x = L.Conv2D(16, 1, name="pointwise")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, L.Dense(4, name="head")(x), name="odd")


def nested_model() -> tf.keras.Model:
    inner_in = tf.keras.Input((8, 8, 8), name="inner_image")
    inner = tf.keras.Model(inner_in, L.Conv2D(16, 1, name="pointwise")(inner_in), name="inner")
    inputs = tf.keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = L.GlobalAveragePooling2D(name="gap")(inner(x))
    return tf.keras.Model(inputs, L.Dense(4, name="head")(x), name="nested")


# ---------------------------------------------------------------------------- allocation and masks
def _weights(*shapes):
    return [PrunableWeight(f"w{i}/kernel", f"w{i}", "kernel", shape, len(shape) - 2, shape[-2])
            for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_allocation_hits_the_exact_number_of_zeros_for_any_proposal(pattern):
    weights = _weights((3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (1, 1, 64, 64), (64, 10))
    total = sum(w.size for w in weights)
    rng = np.random.default_rng(1)
    for sparsity in (0.55, 0.7, 0.8, 0.9):
        for _ in range(15):
            shape = {w.key: float(rng.uniform(0.05, 1.0)) for w in weights}
            protected = ("w0/kernel", "w4/kernel") if rng.uniform() < 0.5 else ()
            target = int(np.ceil(sparsity * total))
            zeros = allocate(weights, shape, target, pattern=pattern, max_sparsity=0.98, protected=protected)
            assert sum(zeros.values()) == target, (sparsity, shape, zeros)
            for w in weights:
                assert 0 <= zeros[w.key] <= int(0.98 * w.size) + 1
                if w.key in protected or (pattern == "2:4" and not w.groupable):
                    assert zeros[w.key] == 0
                elif pattern == "2:4":
                    assert zeros[w.key] >= w.size // 2
    # Uniform proposal: every free tensor at (about) the same sparsity.
    zeros = allocate(weights, {w.key: 0.5 for w in weights}, int(0.8 * total), pattern="unstructured",
                     max_sparsity=0.98)
    fractions = [zeros[w.key] / w.size for w in weights]
    assert max(fractions) - min(fractions) < 0.01


def test_magnitude_mask_removes_exactly_the_smallest():
    values = np.random.default_rng(0).normal(size=(3, 3, 8, 16)).astype(np.float32)
    for zeros in (0, 1, 500, 1151, 1152):
        keep = magnitude_mask(values, zeros)
        assert keep.shape == values.shape and int((~keep).sum()) == zeros
        if 0 < zeros < values.size:
            assert np.abs(values[~keep]).max() <= np.abs(values[keep]).min()


@pytest.mark.parametrize("shape,axis", [((3, 3, 16, 8), 2), ((32, 10), 0)])
def test_2_4_pattern_is_exact(shape, axis):
    values = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    half = values.size // 2
    keep = magnitude_mask(values, half, pattern="2:4", input_axis=axis)
    pruned = values * keep
    assert int((~keep).sum()) == half
    grouped = np.moveaxis(pruned, axis, -1).reshape(-1, 4)
    assert np.all((grouped == 0).sum(axis=1) == 2)  # exactly 2 of every 4 consecutive input channels
    original = np.moveaxis(np.abs(values), axis, -1).reshape(-1, 4)
    kept_min = np.where(grouped != 0, original, np.inf).min(axis=1)
    removed_max = np.where(grouped == 0, original, -np.inf).max(axis=1)
    assert np.all(removed_max <= kept_min)  # the two largest of each group survive
    more = magnitude_mask(values, int(values.size * 0.7), pattern="2:4", input_axis=axis)
    assert int((~more).sum()) == int(values.size * 0.7)
    assert nm_pattern_holds(values * more, axis)
    assert not np.any(more & ~keep)  # past 50%, the 2:4 zeros stay zero


def test_prunable_weights_walk_odd_graphs_and_masks_apply():
    model = odd_model()
    weights = prunable_weights(model)
    assert [w.key for w in weights] == ["stem/kernel", "dw/depthwise_kernel", "pointwise/kernel", "head/kernel"]
    nested = nested_model()  # nested models are walked (keys carry the sub-model's name)
    assert [w.key for w in prunable_weights(nested)] == ["stem/kernel", "inner/pointwise/kernel", "head/kernel"]
    apply_masks(nested, {"inner/pointwise/kernel": np.zeros((1, 1, 8, 16), bool)})
    assert not np.any(nested.get_layer("inner").get_layer("pointwise").kernel.numpy())
    depthwise = weights[1]
    assert depthwise.input_axis is None and not depthwise.groupable and depthwise.tflite_inner == 8
    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    variables = variables_by_key(clone, weights)
    zeros = allocate(weights, {}, int(0.6 * sum(w.size for w in weights)), pattern="unstructured",
                     max_sparsity=0.95)
    masks = MaskSet(variables, {k: magnitude_mask(v.numpy(), zeros[k]) for k, v in variables.items()})
    masks.apply()
    for key, variable in variables.items():
        assert int(np.sum(variable.numpy() == 0)) == zeros[key]
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    assert np.all(np.isfinite(clone(images).numpy()))


def test_masks_file_round_trip(tmp_path):
    model = odd_model()
    weights = prunable_weights(model)
    masks = {w.key: np.random.default_rng(3).uniform(size=w.shape) > 0.7 for w in weights}
    save_masks(tmp_path / "masks.npz", masks)
    loaded = load_masks(tmp_path / "masks.npz")
    assert set(loaded) == set(masks) and all(np.array_equal(loaded[k], masks[k]) for k in masks)
    apply_masks(model, loaded)
    for key, variable in variables_by_key(model, weights).items():
        assert np.all(variable.numpy()[~masks[key]] == 0)


# ---------------------------------------------------------------------------- schedule
def test_polynomial_schedule_known_answers():
    assert polynomial_sparsity(0, 0.8, 0, 100) == 0.0
    assert polynomial_sparsity(100, 0.8, 0, 100) == pytest.approx(0.8)
    assert polynomial_sparsity(50, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7
    assert polynomial_sparsity(40, 0.5, 20, 120, initial_sparsity=0.1) == pytest.approx(0.5 - 0.4 * 0.8 ** 3)
    assert polynomial_sparsity(5, 0.8, 10, 100) == 0.0 and polynomial_sparsity(500, 0.8, 10, 100) == pytest.approx(0.8)
    from tensorflow_model_optimization.sparsity.keras import PolynomialDecay

    reference = PolynomialDecay(0.1, 0.9, begin_step=10, end_step=110, power=3, frequency=7)
    for step in range(0, 130, 3):
        should, value = reference(tf.constant(step, tf.int64))
        assert polynomial_sparsity(step, 0.9, 10, 110, 0.1) == pytest.approx(float(value), abs=1e-6)
        if step != 110:
            assert is_pruning_step(step, 10, 110, 7) == bool(should)
    assert is_pruning_step(110, 10, 110, 7)  # the end step always prunes (TFMOT skips it here)


def test_gradual_pruning_reaches_the_final_zeros_monotonically():
    model = odd_model()
    weights = prunable_weights(model)
    variables = variables_by_key(model, weights)
    final = {w.key: int(0.75 * w.size) for w in weights}
    masks = MaskSet(variables, {w.key: np.ones(w.shape, bool) for w in weights})
    hook = GradualPruning(masks, weights, final, pattern="unstructured", total_steps=40, begin=0.1, end=0.6,
                          frequency=5)
    assert (hook.begin_step, hook.end_step) == (4, 24)
    previous = 0
    for _ in range(40):
        hook()
        zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables.values())
        assert zeros >= previous
        previous = zeros
    hook.finish()
    assert {k: int(np.sum(v.numpy() == 0)) for k, v in variables.items()} == final
    assert hook.updates == 5  # steps 4, 9, 14, 19, 24


# ---------------------------------------------------------------------------- the shipped files
def _sparsify(model: tf.keras.Model, sparsities) -> None:
    for weight, sparsity in zip(prunable_weights(model), sparsities):
        variable = variables_by_key(model, [weight])[weight.key]
        keep = magnitude_mask(variable.numpy(), int(sparsity * weight.size))
        variable.assign(np.where(keep, variable.numpy(), 0.0))


def test_container_round_trip_is_bit_exact(tmp_path):
    model = odd_model()
    _sparsify(model, [0.0, 0.5, 0.999, 1.0])  # dense, bitmap, gaps with fillers, all zeros
    path = tmp_path / "model.npz"
    size = write_container(model, path)
    assert size == path.stat().st_size
    _, weights = read_container(path)
    assert len(weights) == len(model.weights)
    for stored, original in zip(weights, model.get_weights()):
        assert stored.dtype == original.dtype and stored.shape == original.shape
        assert np.array_equal(stored.view(np.uint32), original.view(np.uint32))  # bit for bit
    loaded = load_container(path)
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())
    assert "values.npy" in container_members(path)
    # int8 values: within half a quantization step, zeros stay zeros, and smaller than float.
    names = [v.name for v in variables_by_key(model, prunable_weights(model)).values()]
    int8_path = tmp_path / "model_int8.npz"
    assert write_container(model, int8_path, names, bits=8) < size
    _, dequantized = read_container(int8_path)
    for stored, original in zip(dequantized, model.get_weights()):
        step = np.abs(original).max(axis=tuple(range(original.ndim - 1)), keepdims=True) / 127 if original.ndim > 1 \
            else 0
        assert np.all(np.abs(stored - original) <= step / 2 + 1e-7)
        assert np.all(stored[original == 0] == 0)


def test_sparse_tflite_is_smaller_and_agrees_with_keras(trained, tmp_path):
    dataset, model, _ = trained
    learner = learner_for(trained, TargetConfig(sparsity=0.8), recovery_epochs=0.0, protect="none", mode="uniform")
    sparse = learner.compress(learner.search_space(optuna.trial.FixedTrial({})))
    assert learner.candidate_metrics(sparse)["sparsity"] == pytest.approx(0.8, abs=1e-4)
    candidate = sparse.model
    dense_bytes = len(convert(candidate, "float"))
    sparse_path = tmp_path / "sparse.tflite"
    sparse_path.write_bytes(sparse_tflite(candidate))
    assert sparse_path.stat().st_size < dense_bytes / 3
    images, labels = dataset.test_arrays()
    interpreter = TFLiteModel(sparse_path)
    np.testing.assert_allclose(interpreter.predict(images[:64]), candidate.predict(images[:64], verbose=0),
                               atol=1e-4)
    assert tflite_accuracy(interpreter, images, labels) == pytest.approx(accuracy(candidate, dataset.test(256)),
                                                                       abs=0.003)
    int8_path = tmp_path / "sparse_int8.tflite"
    int8_path.write_bytes(sparse_tflite(candidate, bits=8))
    assert int8_path.stat().st_size < sparse_path.stat().st_size
    assert tflite_accuracy(TFLiteModel(int8_path), images, labels) >= accuracy(candidate, dataset.test(256)) - 0.02
    # The container converts back to a TFLite file that runs.
    write_container(candidate, tmp_path / "c.npz")
    assert container_to_tflite(tmp_path / "c.npz", tmp_path / "c.tflite") == pytest.approx(
        sparse_path.stat().st_size, rel=0.01)
    assert tflite_accuracy(TFLiteModel(tmp_path / "c.tflite"), images, labels) == \
        tflite_accuracy(interpreter, images, labels)


# ---------------------------------------------------------------------------- the learner
def test_searched_candidates_meet_the_sparsity_target_exactly(trained):
    dataset, model, _ = trained
    learner = learner_for(trained, TargetConfig(sparsity=0.75), recovery_epochs=0.1)
    assert learner.reachable()["sparsity"] == pytest.approx(0.98, abs=1e-3)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(learner.reference_params())
    for _ in range(3):
        trial = study.ask()
        hparams = learner.search_space(trial)
        candidate = learner.compress(hparams)
        assert learner.candidate_metrics(candidate)["sparsity"] == pytest.approx(
            np.ceil(0.75 * learner.total) / learner.total)
        study.tell(trial, accuracy(candidate.model, dataset.validation(256)))
    assert study.trials[0].value > 0.8  # BatchNorm recalibration keeps a one-shot candidate useful
    finetuned = learner.finalize(learner.finetune(candidate, 0.5))
    assert learner.candidate_metrics(finetuned)["sparsity"] == pytest.approx(np.ceil(0.75 * learner.total)
                                                                            / learner.total)


@pytest.mark.parametrize("options", [{}, {"bits": 8}, {"format": "tflite"}])
def test_compression_target_is_met_on_the_real_file(trained, tmp_path, options):
    dataset, model, _ = trained
    learner = learner_for(trained, TargetConfig(compression=5.0), recovery_epochs=0.0, **options)
    reached = learner.reachable()
    assert reached["compression"] > 5.0
    hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    candidate = learner.compress(hparams)
    assert 5.0 <= learner.candidate_metrics(candidate)["compression"] < 5.0 * 1.03
    report = learner.write_artifacts(learner.finalize(candidate), tmp_path)
    assert learner.context.baseline_tflite_bytes / report["artifact_bytes"] >= 5.0
    files = report["sparse_files"]
    assert report["artifact_path"] == files["tflite" if options.get("format") == "tflite" else
                                            min(files, key=lambda k: files[k]["bytes"])]["path"]
    assert load_masks(report["masks_path"])


def test_config_keys_and_errors():
    options = WeightSparseLearner.parse_options({"pattern": 124, "bits": 8}, "the test")  # YAML reads 2:4 as 124
    assert options.pattern == "2:4" and options.bits == 8
    assert WeightSparseLearner.parse_options({"pattern": "2:4"}, "the test").pattern == "2:4"
    for bad in ({"bits": 4}, {"pattern": "1:4"}, {"begin": 0.8, "end": 0.5}, {"max_layer_sparsity": 1.0}):
        with pytest.raises(ConfigError):
            WeightSparseLearner.parse_options(bad, "the test")
    with pytest.raises(ConfigError, match="needs a target"):
        WeightSparseLearner.check_target(TargetConfig())
    with pytest.raises(ConfigError, match="cannot meet target speedup"):
        WeightSparseLearner.check_target(TargetConfig(speedup=2.0))
    assert LEARNERS.get("weight-sparse") is WeightSparseLearner


def test_shared_resnet20_with_reshape_and_permute_layers_is_pruned():
    model = tf.keras.models.load_model(shared_file("pretrained/resnet20_cifar10.h5"), compile=False)
    assert any(isinstance(layer, L.Permute) for layer in model.layers)
    weights = prunable_weights(model)
    assert len(weights) == 20 and sum(w.size for w in weights) == 268_336
    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    variables = variables_by_key(clone, weights)
    zeros = allocate(weights, {}, int(np.ceil(0.8 * 268_336)), pattern="2:4", max_sparsity=0.98)
    assert zeros[weights[0].key] == 0  # 3 input channels: no 2:4 groups, kept dense
    masks = MaskSet(variables, {w.key: magnitude_mask(variables[w.key].numpy(), zeros[w.key], pattern="2:4",
                                                      input_axis=w.input_axis) for w in weights})
    masks.apply()
    assert sum(int(np.sum(v.numpy() == 0)) for v in variables.values()) == int(np.ceil(0.8 * 268_336))
    assert all(nm_pattern_holds(variables[w.key].numpy(), w.input_axis) for w in weights[1:])


# ---------------------------------------------------------------------------- the default job
@pytest.mark.integration
def test_default_weight_sparse_job_ships_a_3x_smaller_file_within_2_points(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner=weight-sparse", "--target-sparsity", "0.8",
               "--trials", "4", "--output-dir", str(out)]
    process = subprocess.Popen([sys.executable, "-X", "faulthandler", *command[1:]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        _, stderr = process.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
        _, stderr = process.communicate()
        pytest.fail(f"the default weight-sparse job did not finish in 8 minutes:\n{stderr[-6000:]}")
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    baseline, best = report["baseline"], report["best"]
    assert best["sparsity"] >= 0.8
    assert best["compression"] >= 3.0
    assert best["compression"] == pytest.approx(baseline["bytes"] / best["artifact_bytes"])
    assert best["artifact_accuracy"] >= baseline["accuracy"] - 0.02
    assert best["accuracy"] >= baseline["accuracy"] - 0.02
    shipped = best["sparse_files"]["tflite" if best["shipped_format"].startswith("sparse TFLite") else "container"]
    assert shipped["path"] == best["artifact_path"] and (out / best["artifact_path"]).stat().st_size == \
        best["artifact_bytes"]
    assert best["sparse_files"]["tflite"]["bytes"] < baseline["bytes"] / 3
    masks = load_masks(out / "masks.npz")
    assert sum(int((~m).sum()) for m in masks.values()) >= 0.8 * best["prunable_weights"]
    check_load_line(best["model_path"], tf.keras.models.load_model(best["model_path"], compile=False))
    assert_report_matches_files(out)


def test_format_fast_ships_the_file_that_runs_fastest(trained, tmp_path):
    """format: fast measures the sparse TFLite file and the dense one of the same weights and ships the
    quicker (the smaller within 5%): the runtime's fast kernels take some encodings and not others."""
    from learners.weight_sparsification.artifact import FAST_TOLERANCE

    learner = learner_for(trained, TargetConfig(sparsity=0.8), recovery_epochs=0.0, bits=8, format="fast")
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    report = learner.write_artifacts(learner.finalize(candidate), tmp_path)
    files = report["sparse_files"]
    assert set(files) == {"tflite", "dense", "container"}
    timed = {kind: files[kind]["latency_ms"] for kind in ("tflite", "dense")}
    shipped = next(kind for kind, file in files.items() if file["path"] == report["artifact_path"])
    assert shipped in timed and timed[shipped] <= min(timed.values()) * (1 + FAST_TOLERANCE)
    # the shipped TFLite file is the run's TFLite result: the one timed against the baseline's
    assert report["tflite_path"] == report["artifact_path"] and report["tflite_latency_ms"] == timed[shipped]
    images, labels = trained[0].test_arrays()
    dense = TFLiteModel(files["dense"]["path"])
    assert tflite_accuracy(dense, images, labels) == pytest.approx(files["dense"]["accuracy"], abs=1e-9)
    assert dense.interpreter.get_input_details()[0]["dtype"] == np.int8  # full-integer, as the sparse file

    with pytest.raises(ConfigError, match="format = fast ships whichever file runs fastest"):
        learner_for(trained, TargetConfig(compression=5.0), format="fast").reachable()


@pytest.mark.parametrize("int8_mode, kept", [("full", True), ("dynamic", False)])
def test_a_full_integer_file_keeps_the_classifier_dense_so_the_runtime_takes_it_whole(trained, tmp_path, int8_mode,
                                                                                       kept):
    """XNNPACK refuses a full-integer file whose fully-connected weights are sparse (every op then runs on the
    reference kernels); the classifier stays dense there, whatever the protection, and the file is delegated."""
    from pocketflow.export import delegation_of_file

    learner = learner_for(trained, TargetConfig(sparsity=0.8), recovery_epochs=0.0, bits=8, int8_mode=int8_mode,
                          protect="none", format="tflite")
    classifier = learner._weights[-1]  # the digits CNN's only fully-connected kernel, 1% of its weights
    assert len(classifier.shape) == 2 and (classifier.key in learner._protected("none")) == kept
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    assert learner.candidate_metrics(candidate)["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (learner.describe(candidate)["layer_sparsity"][classifier.key] == 0.0) == kept
    if kept:
        report = learner.write_artifacts(learner.finalize(candidate), tmp_path)
        assert delegation_of_file(report["artifact_path"]).full


@pytest.mark.integration
def test_a_shipped_sparse_tflite_file_is_the_one_timed_against_the_baseline(tmp_path):
    """When a TFLite file ships (format fast here), the report's latency ratio and TFLite figures are that
    file's, timed in turn with the baseline's, not the float export's."""
    from pocketflow.cli import main

    out = tmp_path / "run"
    assert main(["--learner", "weight-sparse", "--target-sparsity", "0.8", "--bits", "8", "--set",
                 "weight-sparse.format=fast", "--trials", "2", "--finetune-epochs", "1", "-q",
                 "--output-dir", str(out)]) == 0
    best = json.loads((out / "report.json").read_text())["best"]
    assert best["artifact_path"].endswith(".tflite") and best["tflite_path"] == best["artifact_path"]
    shipped = next(file for file in best["sparse_files"].values() if file["path"] == best["artifact_path"])
    assert best["tflite_latency_ms"] == shipped["latency_ms"] and best["tflite_accuracy"] == shipped["accuracy"]
    assert (out / best["latency_comparison"]["shipped_file"]).resolve() == Path(best["artifact_path"]).resolve()
    assert_report_matches_files(out)


def test_fully_connected_kernels_holding_most_weights_are_pruned_even_in_full_integer(trained, caplog):
    """An MLP: keeping its fully-connected kernels dense would leave nothing to prune, so they are pruned
    (the run warns that the runtime will not accelerate the sparse int8 file)."""
    dataset, _, schedule = trained
    inputs = tf.keras.Input(dataset.input_shape)
    hidden = L.Dense(32, activation="relu", name="hidden")(L.Flatten()(inputs))
    mlp = tf.keras.Model(inputs, L.Dense(dataset.num_classes, name="logits")(hidden))
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(sparsity=0.5),
                             distributed=SingleProcess())
    learner = WeightSparseLearner(WeightSparseConfig(bits=8, int8_mode="full", protect="none"), context)
    with caplog.at_level("WARNING"):
        learner.prepare(mlp)
    assert learner._protected("none") == ()
    assert "will run on the reference kernels" in caplog.text
