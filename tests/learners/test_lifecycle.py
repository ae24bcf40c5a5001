"""The learner contract (``learners/base.py``), checked on every registered learner and strategy.

A learner added to the registry without a case here fails ``test_every_learner_has_a_case``, so the
contract is checked for it from the first commit: steps out of order raise, the baseline is never
modified, candidates carry their own state, a candidate replaced by a later ``compress`` either
still works or raises (never silently computes with another candidate's weights), ``finalize``
gives plain Keras that saves, loads and converts to TFLite with the same outputs, fine-tuning uses
the teacher it is given, and the options and ``describe`` round-trip through the config and JSON.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np
import optuna
import pytest
import tensorflow as tf

from learners import LEARNERS
from hpo.targets import meets
from learners.base import Candidate, LearnerContext
from learners.distillation import Distiller
from nets.digits_cnn import build_digits_cnn
from pocketflow.config import DataConfig, TargetConfig
from pocketflow.data import load_dataset
from pocketflow.distributed import SingleProcess
from pocketflow.export import TFLiteModel, convert
from pocketflow.metrics import count_macs
from pocketflow.model_io import load_user_model, save_model
from pocketflow.training import TrainSchedule

# case name -> (registered learner, target, options): small, fast settings of each strategy.
CASES: Dict[str, Tuple[str, TargetConfig, Dict[str, Any]]] = {
    "full-prec": ("full-prec", TargetConfig(), {}),
    "channel": ("channel", TargetConfig(speedup=1.5),
                {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1}),
    "weight-sparse": ("weight-sparse", TargetConfig(sparsity=0.5),
                      {"recovery_epochs": 0.0, "calibration_batches": 2}),
    "uniform int8": ("uniform", TargetConfig(bits=8), {"representative_samples": 32, "compare_dynamic": False}),
    "uniform low-bit": ("uniform", TargetConfig(bits=4),
                        {"recovery_epochs": 0.0, "calibration_batches": 2, "sensitivity_samples": 32,
                         "representative_samples": 32}),
    "non-uniform": ("non-uniform", TargetConfig(bits=4), {"recovery_epochs": 0.0, "calibration_batches": 2}),
    "product-quant": ("product-quant", TargetConfig(compression=6.0),
                      {"recovery_epochs": 0.0, "calibration_batches": 2, "samples": 64, "rows": 512,
                       "iterations": 3}),
    "channel then int8": ("channel+uniform", TargetConfig(speedup=1.5), {"stages": {
        "channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
        "uniform": {"representative_samples": 32, "compare_dynamic": False}}}),
    "channel then low-bit": ("channel+uniform", TargetConfig(speedup=1.5, bits=4), {"stages": {
        "channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
        "uniform": {"recovery_epochs": 0.0, "calibration_batches": 2, "sensitivity_samples": 32,
                    "representative_samples": 32}}}),
    "channel then codebooks": ("channel+non-uniform", TargetConfig(speedup=1.5, compression=8.0), {"stages": {
        "channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
        "non-uniform": {"recovery_epochs": 0.0, "calibration_batches": 2}}}),
    "channel and codebooks, joint": ("channel+non-uniform", TargetConfig(speedup=1.5, compression=8.0), {
        "search": "joint", "stages": {
            "channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
            "non-uniform": {"recovery_epochs": 0.0, "calibration_batches": 2}}}),
    "channel then sparse": ("channel+weight-sparse", TargetConfig(speedup=1.5, sparsity=0.5), {"stages": {
        "channel": {"recalibrate_batches": 2, "sample_images": 64, "min_channels": 1, "channel_multiple": 1},
        "weight-sparse": {"recovery_epochs": 0.0, "calibration_batches": 2}}}),
    "sparse then int8": ("weight-sparse+uniform", TargetConfig(sparsity=0.5), {"stages": {
        "weight-sparse": {"recovery_epochs": 0.0, "calibration_batches": 2}}}),
}


class SpyDistiller(Distiller):
    """Counts the students it builds a loss for, so a test sees that a learner used the teacher."""

    students = 0

    def loss_for(self, student, matches=()):
        SpyDistiller.students += 1
        return super().loss_for(student, matches)


@pytest.fixture(scope="module")
def setup():
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    tf.keras.utils.set_random_seed(0)
    baseline = build_digits_cnn(dataset.input_shape, dataset.num_classes, width=16)
    return dataset, baseline, len(convert(baseline, "float"))


def make_learner(case: str, setup):
    dataset, baseline, float_bytes = setup
    name, target, options = CASES[case]
    registered = LEARNERS.get(name)
    parsed = registered.parse_options(options, "the test")
    learner_class = registered.strategy(parsed, target)
    context = LearnerContext(dataset=dataset, schedule=TrainSchedule(1, 32, 0.01, "cosine", "sgd", 5e-4, False),
                             target=target, distributed=SingleProcess(), seed=0, baseline_macs=count_macs(baseline),
                             baseline_tflite_bytes=float_bytes, latency_runs=3)
    # config round trip: the sections config.yaml records read back to the same options
    assert registered.run_options(registered.recorded_sections(parsed), "the round trip") == parsed
    return learner_class(parsed, context)


def test_every_learner_has_a_case():
    covered = {name for name, _, _ in CASES.values()}
    missing = [name for name in LEARNERS.names() if name not in covered]
    assert not missing, f"add a case for {missing} to CASES so the learner contract is checked for it"


def _hparams(learner):
    return learner.search_space(optuna.trial.FixedTrial(learner.reference_params()))


def _outputs(model: tf.keras.Model, images: np.ndarray) -> np.ndarray:
    return model(images, training=False).numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_lifecycle_contract(case, setup, tmp_path):
    dataset, baseline, _ = setup
    images = dataset.sample_train(16, seed=3)
    weights_before = [w.copy() for w in baseline.get_weights()]
    learner = make_learner(case, setup)

    with pytest.raises(RuntimeError, match="prepare"):  # a step before prepare(baseline) refuses to guess
        learner.compress(_hparams(learner))

    learner.prepare(baseline)
    reached = learner.reachable()
    assert set(reached) <= set(learner.targets)
    first = learner.compress(_hparams(learner))
    assert isinstance(first, Candidate) and isinstance(first.model, tf.keras.Model)
    metrics = learner.candidate_metrics(first)
    # the reference trial meets the targets the search checks (a chain's later stages: checked when shipped)
    assert meets(learner.searched_targets(learner.context.target), metrics), metrics

    # A second candidate: the first one still computes what it did, or refuses to be used.
    first_outputs = _outputs(first.model, images)
    learner.compress(_hparams(learner))
    try:
        still = learner.candidate_metrics(first)
    except RuntimeError:
        pass
    else:
        assert still == pytest.approx(metrics)
        np.testing.assert_allclose(_outputs(first.model, images), first_outputs, atol=1e-6)

    candidate = learner.compress(_hparams(learner))
    SpyDistiller.students = 0
    tuned = learner.finetune(candidate, 0.05, teacher=SpyDistiller(baseline, 2.0, 0.5))
    assert isinstance(tuned, Candidate)
    # every learner that fine-tunes a compressed model trains with the teacher's loss (a chain: each stage)
    assert SpyDistiller.students == (len(getattr(learner, "stage_classes", ())) or 1 if learner.searches else 0)
    finished = learner.finalize(tuned)
    assert isinstance(finished, Candidate)
    model = finished.model
    foreign = [type(layer).__module__ for layer in model.layers
               if not type(layer).__module__.startswith(("tf_keras.", "keras."))]
    assert not foreign, f"finalize left layers that are not plain Keras: {foreign}"
    path = save_model(model, tmp_path / "model.keras")
    np.testing.assert_allclose(_outputs(load_user_model(str(path)), images), _outputs(model, images), atol=1e-5)
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(convert(model, "float"))
    np.testing.assert_allclose(TFLiteModel(tflite).predict(images), _outputs(model, images), atol=1e-4)

    described = learner.describe(finished)
    json.dumps(described)  # it goes into report.json as it is
    fields = learner.write_artifacts(finished, tmp_path)
    json.dumps(fields)
    assert all(np.array_equal(a, b) for a, b in zip(weights_before, baseline.get_weights())), \
        "the baseline was modified"
