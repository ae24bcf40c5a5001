"""The channel learner: target projection, uniform mode, candidates that are really smaller."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import tensorflow as tf

from learners.base import Candidate, LearnerContext
from learners.channel_pruning.learner import L1_FROM_EPOCHS, ChannelConfig, ChannelPruningLearner
from nets import NETS
from pocketflow.config import DataConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.metrics import count_macs
from pocketflow.training import accuracy, recalibrate_batchnorm
from tests.learners.digits import trained_digits


@pytest.fixture(scope="module")
def trained():
    return trained_digits(15)


def learner_for(trained, target=2.5, finetune_epochs=0.0, **options):
    dataset, model, schedule = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(speedup=target),
                             distributed=SingleProcess(), baseline_macs=count_macs(model),
                             finetune_epochs=finetune_epochs)
    learner = ChannelPruningLearner(ChannelConfig(**options), context)
    learner.prepare(model)
    return learner


@pytest.mark.parametrize("target", [1.5, 2.0, 2.5, 4.0])
def test_projection_lands_in_the_target_window_for_any_proposal(trained, target):
    learner = learner_for(trained, target)
    analysis = learner.analysis(trained[1])
    rng = np.random.default_rng(int(target * 10))
    for _ in range(20):
        raw = {name: float(rng.uniform(0.1, 1.0)) for name in analysis.groups}
        counts = learner.project(raw)
        speedup = analysis.total_macs / analysis.macs_for(counts)
        assert target <= speedup <= 1.05 * target, (raw, counts, speedup)


def test_candidate_is_physically_smaller_and_meets_the_target(trained, tmp_path):
    dataset, model, _ = trained
    learner = learner_for(trained, 2.5)
    hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    pruned = learner.compress(hparams)
    metrics = learner.candidate_metrics(pruned)
    candidate = pruned.model
    assert 2.5 <= metrics["speedup"] <= 2.625
    assert metrics["macs"] == count_macs(candidate)
    assert candidate.count_params() < model.count_params()
    filters_before = {l.name: l.filters for l in model.layers if isinstance(l, tf.keras.layers.Conv2D)}
    filters_after = {l.name: l.filters for l in candidate.layers if isinstance(l, tf.keras.layers.Conv2D)}
    assert all(filters_after[name] < filters_before[name] for name in filters_before)
    # Uniform reference: every group keeps (about) the same fraction.
    fractions = [filters_after[n] / filters_before[n] for n in filters_before]
    assert max(fractions) - min(fractions) <= 4 / 32 + 1e-9  # one channel_multiple step on a 32-wide group
    candidate.save(tmp_path / "pruned.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "pruned.keras", compile=False)
    images = dataset.sample_train(8)
    np.testing.assert_allclose(reloaded(images).numpy(), candidate(images).numpy(), atol=1e-5)
    # Reconstruction keeps the candidate useful before any fine-tuning.
    assert accuracy(candidate, dataset.validation(256)) > 0.8


def _size_learner(trained, speedup, baseline_bytes):
    dataset, model, schedule = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(speedup=speedup, compression=3.0),
                             distributed=SingleProcess(), baseline_macs=count_macs(model),
                             baseline_tflite_bytes=baseline_bytes)
    learner = ChannelPruningLearner(ChannelConfig(criterion="l1"), context)
    learner.prepare(model)
    return learner


def test_a_size_target_is_met_by_the_converted_float_file(trained):
    """--target-compression on channel pruning: the search's size arithmetic (4 bytes per weight removed)
    predicts the converted file, and every projected candidate's file meets the target; with a speedup
    too, the tighter ceiling decides (here the size: 1.5x fewer MACs alone leaves a larger file)."""
    from pocketflow.export import convert

    model = trained[1]
    baseline_bytes = len(convert(model, "float"))
    learner = _size_learner(trained, 1.5, baseline_bytes)
    assert learner.reachable()["compression"] > 3.0
    analysis = learner.analysis(model)
    rng = np.random.default_rng(3)
    for index in range(3):
        raw = {name: float(rng.uniform(0.1, 1.0)) for name in analysis.groups}
        if index == 0:
            hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
        else:
            hparams = learner.search_space(optuna.trial.FixedTrial({f"keep_{name}": value
                                                                    for name, value in raw.items()}))
        candidate = learner.compress(hparams)
        file_bytes = len(convert(candidate.model, "float"))
        predicted = learner.float_bytes(hparams.keep_counts)
        assert abs(predicted - file_bytes) <= 0.002 * file_bytes, (predicted, file_bytes)
        metrics = learner.candidate_metrics(candidate)
        assert 3.0 <= baseline_bytes / file_bytes <= 3.0 * 1.05, (hparams.keep_counts, file_bytes)
        assert metrics["compression"] == pytest.approx(baseline_bytes / predicted)
        assert metrics["speedup"] > 1.05 * 1.5  # the size ceiling bound, not the MACs one
    # a size target alone: every proposal lands in [R, 1.05 R] by the same arithmetic
    alone = _size_learner(trained, None, baseline_bytes)
    for _ in range(10):
        counts = alone.project({name: float(rng.uniform(0.1, 1.0)) for name in analysis.groups})
        assert 3.0 <= baseline_bytes / alone.float_bytes(counts) <= 3.0 * 1.05, counts


def test_l1_and_greedy_criteria(trained):
    dataset, model, _ = trained
    for criterion in ("l1", "greedy", "energy"):
        learner = learner_for(trained, 2.0, criterion=criterion)
        hparams = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
        assert hparams.criterion == criterion
        assert 2.0 <= learner.candidate_metrics(learner.compress(hparams))["speedup"] <= 2.1


def _copied_from(candidate: tf.keras.Model, baseline: tf.keras.Model) -> dict:
    """Per conv/dense layer of the candidate: whether every kernel weight is one of the baseline layer's
    (pruning only slices; a least-squares re-fit writes new values)."""
    return {layer.name: bool(np.isin(layer.kernel.numpy(), baseline.get_layer(layer.name).kernel.numpy()).all())
            for layer in candidate.layers if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))}


@pytest.mark.parametrize("criterion, refit, refitted", [("lasso", "auto", True), ("lasso", False, False),
                                                         ("l1", "auto", False), ("l1", True, True)])
def test_refit_option_decides_whether_the_readers_are_refitted(trained, criterion, refit, refitted):
    learner = learner_for(trained, 2.0, criterion=criterion, refit=refit, recalibrate_batches=0)
    hyperparameters = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    assert hyperparameters.refit is refitted  # what the report's hyperparameters say
    candidate = learner.compress(hyperparameters)
    copied = _copied_from(candidate.model, trained[1])
    assert candidate.model.count_params() < trained[1].count_params()
    if refitted:  # the readers of pruned channels hold new weights; the first conv reads the image, unpruned
        first = next(layer.name for layer in candidate.model.layers if isinstance(layer, tf.keras.layers.Conv2D))
        assert not all(copied.values()) and copied[first], copied
    else:
        assert all(copied.values()), copied


def test_lasso_without_a_refit_chooses_channels_for_what_they_vary(trained, monkeypatch):
    """Without the re-fit, LASSO's contributions are centred (a constant is what BatchNorm re-estimation and
    fine-tuning take up first), as with the re-fit, whose intercept takes it up."""
    import learners.channel_pruning.criteria as criteria

    seen = []
    original = criteria._contribution_gram
    monkeypatch.setattr(criteria, "_contribution_gram",
                        lambda *args, centered: seen.append(centered) or original(*args, centered=centered))
    for refit in (False, "auto"):
        learner = learner_for(trained, 2.0, criterion="lasso", refit=refit, recalibrate_batches=0)
        learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    assert seen and all(seen)


def test_uniform_mode_has_a_single_candidate(trained):
    learner = learner_for(trained, 2.0, mode="uniform")
    assert learner.max_trials() == 1 and learner.reference_params() == {}
    counts = learner.search_space(optuna.trial.FixedTrial({})).keep_counts
    groups = learner.analysis(trained[1]).groups
    fractions = [counts[n] / groups[n].channels for n in groups]
    assert max(fractions) - min(fractions) <= 4 / 32 + 1e-9  # one channel_multiple step on a 32-wide group


@pytest.mark.parametrize("criterion, epochs, used", [("auto", 0.0, "lasso"), ("auto", 1.0, "lasso"),
                                                     ("auto", L1_FROM_EPOCHS, "l1"), ("auto", 6.0, "l1"),
                                                     ("lasso", 6.0, "lasso"), ("l1", 1.0, "l1")])
def test_auto_criterion_follows_the_fine_tuning_budget(trained, criterion, epochs, used):
    learner = learner_for(trained, 2.0, finetune_epochs=epochs, criterion=criterion)
    hyperparameters = learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))
    assert hyperparameters.criterion == used
    candidate = learner.compress(hyperparameters)
    assert candidate.model.count_params() < trained[1].count_params()


def test_search_criterion_and_reachable(trained):
    learner = learner_for(trained, 2.0, criterion="search", min_ratio=0.25)
    assert learner.reference_params()["criterion"] == "lasso"
    reachable = learner.reachable()["speedup"]
    assert 4 < reachable < 20  # every group at a quarter of its channels


def test_bad_options():
    with pytest.raises(ConfigError, match="channel.min_ratio = 0.0"):
        ChannelConfig(min_ratio=0.0)
    with pytest.raises(ConfigError, match="channel.refit = 'sometimes' is not allowed; choose one of: auto, true"):
        ChannelConfig(refit="sometimes")
    with pytest.raises(ConfigError, match="not prunable groups"):
        learner_for_protect = ChannelConfig(protect=("no_such_layer",))
        dataset = load_dataset(DataConfig(name="digits"), seed=0)
        model = NETS.get("digits_cnn").make(dataset.input_shape, dataset.num_classes)
        context = LearnerContext(dataset=dataset, schedule=None, target=TargetConfig(speedup=2.0),
                                 distributed=SingleProcess(), baseline_macs=count_macs(model))
        ChannelPruningLearner(learner_for_protect, context).analysis(model)


def test_recalibrated_candidates_carry_the_statistics_of_their_own_activations(trained):
    """channel.recalibrate_batches: BatchNorm's moving mean becomes the average, over the batches
    used, of what the pruned conv now outputs in training mode; the momentum is given back."""
    dataset, model, schedule = trained
    learner = learner_for(trained, 2.5, recalibrate_batches=0)
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))).model
    first = [layer for layer in candidate.layers if isinstance(layer, tf.keras.layers.BatchNormalization)][0]
    conv = candidate.get_layer(first._inbound_nodes[0].inbound_layers.name)  # reads the image only
    before = first.moving_mean.numpy().copy()
    assert recalibrate_batchnorm(candidate, dataset, 5, schedule.batch_size, seed=7) == 5
    tf.random.set_seed(7)  # the same batches again
    batches = dataset.train(schedule.batch_size, shuffle=True, seed=8, repeat=True).take(5)
    expected = np.mean([conv(images).numpy().reshape(-1, conv.filters).mean(axis=0) for images, _ in batches], axis=0)
    np.testing.assert_allclose(first.moving_mean.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert np.abs(before - expected).max() > 1e-3  # the pre-training statistics were replaced
    assert first.momentum == 0.99


def test_a_band_of_a_residual_stream_keeps_one_channel_multiple():
    """min_channels is for a layer's whole width; a band (its layers carry other bands too) may go
    down to channel_multiple channels."""
    from tests.learners.test_channel_surgery import pad_shortcut

    model = pad_shortcut()
    context = LearnerContext(dataset=None, schedule=None, target=TargetConfig(speedup=1.5),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    learner = ChannelPruningLearner(ChannelConfig(min_channels=4, channel_multiple=1), context)
    learner.prepare(model)
    floors = learner._floor_counts(model)
    assert learner.analysis(model).groups["b[0:2]"].segment
    assert floors["b[0:2]"] == 1 and floors["b[6:8]"] == 1  # bands of 2: down to 1 channel
    assert floors["stem"] == 4 and floors["a"] == 4  # whole layers: min_channels


def _tf_op_resnet(input_shape, classes):
    """A small ResNet written the way many users write one: ``+``, tf.nn.relu, slicing and tf.pad
    (the option-A shortcut) on Keras tensors instead of Add / ReLU / ZeroPadding layers."""
    layers = tf.keras.layers

    def conv_bn(x, filters, name, strides=1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(x)
        return layers.BatchNormalization(name=f"{name}_bn")(x)

    inputs = tf.keras.Input(input_shape)
    stem = tf.nn.relu(conv_bn(inputs, 16, "stem"))
    x = tf.nn.relu(conv_bn(tf.nn.relu(conv_bn(stem, 16, "block1_a")), 16, "block1_b") + stem)
    shortcut = tf.pad(x[:, ::2, ::2, :], [[0, 0], [0, 0], [0, 0], [8, 8]])
    x = tf.nn.relu(conv_bn(tf.nn.relu(conv_bn(x, 32, "block2_a", strides=2)), 32, "block2_b") + shortcut)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return tf.keras.Model(inputs, layers.Dense(classes, name="head")(x), name="tf_op_resnet")


def test_a_model_written_with_tf_ops_is_pruned_through_its_shortcuts(tmp_path):
    """TF ops on Keras tensors are not barriers: the residual stream, through the tf.pad shortcut,
    is pruned like the Keras-layer version, and the candidate saves, loads and keeps its accuracy."""
    from pocketflow.training import TrainSchedule, train

    tf.keras.utils.set_random_seed(0)
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = _tf_op_resnet(dataset.input_shape, dataset.num_classes)
    schedule = TrainSchedule(10, 32, 0.05, "cosine", "sgd", 5e-4, False)
    train(model, dataset, schedule)
    model.save(tmp_path / "user.keras")
    model = tf.keras.models.load_model(tmp_path / "user.keras", compile=False)  # as a user's file arrives
    learner = learner_for((dataset, model, schedule), 2.0)
    analysis = learner.analysis(model)
    assert analysis.barriers == []
    assert set(analysis.groups) == {"stem", "block1_a", "block2_a", "block2_b[0:8]", "block2_b[24:32]"}
    assert analysis.groups["stem"].producers == ("stem", "block1_b", "block2_b")
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))).model
    assert 2.0 <= analysis.total_macs / count_macs(candidate) <= 2.1
    pad = candidate.get_layer("tf.compat.v1.pad")  # its widths are a call argument, in its node
    stream = candidate.get_layer("stem").filters
    assert stream < 16 and candidate.get_layer("block2_b").filters == stream + sum(
        pad._inbound_nodes[0].call_kwargs["paddings"][-1])
    candidate.save(tmp_path / "pruned.keras")
    reloaded = tf.keras.models.load_model(tmp_path / "pruned.keras", compile=False)
    images = dataset.sample_train(8)
    np.testing.assert_allclose(reloaded(images).numpy(), candidate(images).numpy(), atol=1e-5)
    assert accuracy(model, dataset.validation(256)) > 0.85
    assert accuracy(candidate, dataset.validation(256)) > 0.85  # re-fit through the TF ops (measured 0.99)


def test_feature_distillation_matches_the_joins_on_the_channels_kept(caplog):
    """The fine-tuning's feature term reads each residual join (here ``+`` then tf.nn.relu) on the
    baseline's channels the candidate kept: the stream's kept channels in stage 1, and in stage 2 the
    same channels shifted past the shortcut's zero band, between the bands of the stage's own conv."""
    from learners.distillation import Distiller
    from pocketflow.training import TrainSchedule

    tf.keras.utils.set_random_seed(0)
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = _tf_op_resnet(dataset.input_shape, dataset.num_classes)  # untrained: the wiring is under test
    schedule = TrainSchedule(1, 32, 0.05, "cosine", "sgd", 5e-4, False)
    learner = learner_for((dataset, model, schedule), 2.0, criterion="l1", recalibrate_batches=0)
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    matches = learner.feature_matches(candidate)
    kinds = [model.get_layer(match.layer).__class__.__name__ for match in matches]
    assert len(matches) == 2 and kinds == ["TFOpLambda", "TFOpLambda"], matches
    assert all("relu" in match.layer for match in matches)  # the activation after the join, not the sum
    kept = candidate.state.kept
    np.testing.assert_array_equal(matches[0].channels, kept["stem"])
    second = matches[1].channels
    assert list(second) == sorted(second)
    np.testing.assert_array_equal(second[(second >= 8) & (second < 24)], 8 + kept["stem"])
    assert len(second) == candidate.model.get_layer(matches[1].layer).output.shape[-1] < 32

    with caplog.at_level("INFO"):
        learner.finetune(candidate, 0.1, teacher=Distiller(model, 4.0, 0.9, feature_weight=1.0))
    assert "output of 2 residual joins" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        learner.finetune(candidate, 0.1, teacher=Distiller(model, 4.0, 0.9))
    assert "residual joins" not in caplog.text


def test_the_barriers_reach_the_report_through_the_learner():
    """report.md renders what the learner's describe() contributes; it knows nothing of barriers itself."""
    from pocketflow.report import render_markdown
    from tests.learners.test_channel_surgery import lambda_barrier

    model = lambda_barrier()
    context = LearnerContext(dataset=None, schedule=None, target=TargetConfig(speedup=1.5),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    learner = ChannelPruningLearner(ChannelConfig(), context)
    learner.prepare(model)
    described = learner.describe(Candidate(model))  # a model not built by compress: widths read off it
    assert {b["layer"] for b in described["barriers"]} == {"double", "reshape"}
    text = render_markdown({"best": {"accuracy": 0.5, **described}})
    assert "Barriers (layers the channel analysis does not see through" in text
    assert "- `double` (Lambda): Lambda is not known to be channel-transparent" in text


def test_a_latency_target_is_planned_on_the_width_curve_with_its_margin(trained, monkeypatch):
    """--target-latency-speedup: every projected candidate's predicted ratio clears the target by the
    planning margin, the MAC target still holds, and the search's metrics, the reachable figures and the
    report carry the prediction. The curve here is a fixed one with 16-channel tiles (the real one is
    measured per machine: tests/pocketflow/test_width_cost.py)."""
    from learners.channel_pruning import learner as channel_module
    from pocketflow import width_cost

    tiles = width_cost.WidthCost((16, 32, 48, 64), (1.0, 2.0, 3.0, 4.0), "16-channel tiles")
    monkeypatch.setattr(width_cost, "cached", lambda *args, **kwargs: tiles)
    dataset, model, schedule = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(speedup=1.5, latency_speedup=1.6),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    learner = ChannelPruningLearner(ChannelConfig(criterion="l1"), context)
    learner.prepare(model)
    analysis = learner.analysis(model)
    assert learner.reachable()["latency_speedup"] > 1.6
    rng = np.random.default_rng(5)
    for _ in range(10):
        counts = learner.project({name: float(rng.uniform(0.1, 1.0)) for name in analysis.groups})
        assert learner.latency_speedup(counts) >= 1.6 * (1 + channel_module.LATENCY_MARGIN) - 1e-9, counts
        assert analysis.total_macs / analysis.macs_for(counts) >= 1.5
        predicted = analysis.latency_for({}, tiles) / analysis.latency_for(counts, tiles)
        assert learner.latency_speedup(counts) == pytest.approx(predicted)
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    assert learner.candidate_metrics(candidate)["latency_speedup"] >= 1.6
    described = learner.describe(candidate)["latency_prediction"]
    assert described["width_cost"]["runtime"] == "16-channel tiles" and described["latency_speedup"] >= 1.6


def test_a_widening_that_starts_a_tile_is_priced_as_waste(trained, monkeypatch):
    """With 16-channel tiles, a layer widened from 16 to 20 channels pays for a whole new tile: its
    added time is several times its added MACs; from 20 to 24 it pays nothing extra on the output."""
    from pocketflow import width_cost

    tiles = width_cost.WidthCost((16, 32, 48, 64), (1.0, 2.0, 3.0, 4.0), "16-channel tiles")
    monkeypatch.setattr(width_cost, "cached", lambda *args, **kwargs: tiles)
    dataset, model, schedule = trained
    context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(latency_speedup=1.2),
                             distributed=SingleProcess(), baseline_macs=count_macs(model))
    learner = ChannelPruningLearner(ChannelConfig(criterion="l1"), context)
    learner.prepare(model)
    wide = {name: g.channels for name, g in learner.analysis(model).groups.items() if g.channels >= 32}
    name = list(wide)[-1]  # the last conv (into pooling and the classifier): its output side is what it costs
    at = lambda width: {**wide, name: width}  # noqa: E731
    assert learner._tile_waste(at(16), at(20)) > 2.5
    assert learner._tile_waste(at(20), at(24)) < 1.5


def test_a_time_in_milliseconds_is_the_ratio_the_baseline_file_must_be_sped_up_by(trained, monkeypatch):
    """--target-latency-ms: with the baseline's file measured at 2.0 ms, 1.25 ms plans like a 1.6x
    latency target; without a measured baseline (--export none) it is a clear error."""
    from learners.channel_pruning import learner as channel_module
    from pocketflow import width_cost

    tiles = width_cost.WidthCost((16, 32, 48, 64), (1.0, 2.0, 3.0, 4.0), "16-channel tiles")
    monkeypatch.setattr(width_cost, "cached", lambda *args, **kwargs: tiles)
    dataset, model, schedule = trained

    def prepared(baseline_ms):
        context = LearnerContext(dataset=dataset, schedule=schedule, target=TargetConfig(latency_ms=1.25),
                                 distributed=SingleProcess(), baseline_macs=count_macs(model),
                                 baseline_latency_ms=baseline_ms)
        learner = ChannelPruningLearner(ChannelConfig(criterion="l1"), context)
        learner.prepare(model)
        return learner

    learner = prepared(2.0)
    rng = np.random.default_rng(7)
    for _ in range(5):
        counts = learner.project({name: float(rng.uniform(0.1, 1.0)) for name in learner.analysis(model).groups})
        assert learner.latency_speedup(counts) >= 1.6 * (1 + channel_module.LATENCY_MARGIN) - 1e-9
    candidate = learner.compress(learner.search_space(optuna.trial.FixedTrial(learner.reference_params())))
    assert learner.candidate_metrics(candidate)["latency_ms"] <= 1.25
    assert learner.reachable()["latency_ms"] < 1.25
    with pytest.raises(ConfigError, match="--target-latency-ms needs the baseline's TFLite latency"):
        prepared(0.0)
