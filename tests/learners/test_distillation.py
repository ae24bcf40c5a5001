"""Distillation: the loss numerics (known answers), the frozen teacher, every learner's fine-tuning
taking the teacher, the configuration checks, and `main.py --distill` end to end on digits."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import optuna
import pytest
import tensorflow as tf

from learners.base import LEARNERS
from learners.distillation import (Distiller, FeatureMatch, as_distiller, check_run, distillation_loss,
                                   distillation_loss_value, feature_loss_value,
                                   make_distiller, reference_values, resolve_enabled, suggest)
from nets.digits_cnn import build_digits_cnn
from pocketflow.config import DataConfig, DistillationConfig, build_run_config
from pocketflow.data import load_dataset
from pocketflow.errors import ConfigError
from pocketflow.training import TrainSchedule, train
from tests.conftest import ROOT

LOGITS_S = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
LOGITS_T = np.array([[1.5, 1.0, -0.5], [-1.0, 0.0, 2.0]], np.float32)
LABELS = np.array([0, 2], np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _reference(s: np.ndarray, t: np.ndarray, labels: np.ndarray, temperature: float, alpha: float) -> float:
    """The formula in numpy: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE, both averaged over the batch."""
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1).mean()
    ce = -np.log(_softmax(s)[np.arange(len(labels)), labels]).mean()
    return float(alpha * temperature ** 2 * kl + (1 - alpha) * ce)


def _loss(temperature: float, alpha: float, s=LOGITS_S, t=LOGITS_T) -> float:
    return float(distillation_loss_value(tf.constant(LABELS), tf.constant(s), tf.constant(t), temperature, alpha))


# --------------------------------------------------------------------------- numerics


def test_alpha_zero_is_plain_cross_entropy():
    expected = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(LABELS, LOGITS_S).numpy()
    assert _loss(4.0, 0.0) == pytest.approx(float(expected), rel=1e-6)
    assert _loss(1.0, 0.0) == pytest.approx(float(expected), rel=1e-6)  # T does not touch the hard term


def test_known_answer_against_numpy():
    for temperature, alpha in ((1.0, 1.0), (2.0, 0.5), (4.0, 0.9), (0.5, 0.3)):
        assert _loss(temperature, alpha) == pytest.approx(_reference(LOGITS_S, LOGITS_T, LABELS, temperature, alpha),
                                                          rel=1e-5)
    # One hand-checkable value: T = 1, alpha = 1 is KL(p_t || p_s) of the two rows, averaged.
    p_s, p_t = _softmax(LOGITS_S), _softmax(LOGITS_T)
    assert _loss(1.0, 1.0) == pytest.approx(float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=-1))), rel=1e-5)


def test_t_squared_scaling_and_zero_when_student_equals_teacher():
    p_s, p_t = _softmax(LOGITS_S / 3.0), _softmax(LOGITS_T / 3.0)
    kl_at_3 = float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=-1)))
    assert _loss(3.0, 1.0) == pytest.approx(9.0 * kl_at_3, rel=1e-5)
    assert _loss(5.0, 1.0, s=LOGITS_T, t=LOGITS_T) == pytest.approx(0.0, abs=1e-6)


def test_soft_gradient_is_t_times_the_probability_gap():
    """d/ds [T^2 KL] = T (softmax(s/T) - softmax(t/T)) per example (/ batch for the mean): the T^2
    factor keeps the soft gradient on the scale of the hard one as T grows (Hinton et al.)."""
    for temperature in (1.0, 2.0, 8.0):
        student = tf.Variable(LOGITS_S)
        with tf.GradientTape() as tape:
            loss = distillation_loss_value(tf.constant(LABELS), student, tf.constant(LOGITS_T), temperature, 1.0)
        gradient = tape.gradient(loss, student).numpy()
        expected = temperature * (_softmax(LOGITS_S / temperature) - _softmax(LOGITS_T / temperature)) / len(LABELS)
        np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-7)


def test_no_gradient_reaches_the_teacher():
    teacher = tf.Variable(LOGITS_T)
    with tf.GradientTape() as tape:
        loss = distillation_loss_value(tf.constant(LABELS), tf.constant(LOGITS_S), teacher, 2.0, 0.7)
    assert tape.gradient(loss, teacher) is None


def _pair(softmax_student: bool):
    inputs = tf.keras.Input((4,))
    teacher = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="t")(inputs))
    student_inputs = tf.keras.Input((4,))
    student = tf.keras.Model(student_inputs, tf.keras.layers.Dense(
        3, activation="softmax" if softmax_student else None, name="s")(student_inputs))
    return teacher, student


def test_softmax_outputs_give_the_same_loss_as_logits():
    teacher, logits_student = _pair(False)
    _, softmax_student = _pair(True)
    softmax_student.set_weights(logits_student.get_weights())
    images = tf.constant(np.random.default_rng(0).normal(size=(5, 4)), tf.float32)
    labels = tf.constant([0, 1, 2, 1, 0])
    distiller = Distiller(teacher, 3.0, 0.6)
    from_logits = distiller.loss_for(logits_student)(images, labels, logits_student(images))
    from_probabilities = distiller.loss_for(softmax_student)(images, labels, softmax_student(images))
    assert float(from_probabilities) == pytest.approx(float(from_logits), rel=1e-4)


def test_teacher_forms_and_values():
    teacher, student = _pair(False)
    assert distillation_loss(None, student) is None
    default = as_distiller(teacher)
    assert (default.temperature, default.alpha) == (4.0, 0.9)
    assert as_distiller(default) is default
    with pytest.raises(TypeError, match="teacher"):
        as_distiller("baseline")
    with pytest.raises(ValueError, match="alpha"):
        Distiller(teacher, 2.0, 1.5)
    assert default.with_values(2.0, 0.5).describe() == {"temperature": 2.0, "alpha": 0.5}


def test_the_feature_term_is_a_relative_error_on_the_kept_channels():
    teacher = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 3, 6)), tf.float32)
    kept = tf.constant([1, 3, 4])
    student = tf.gather(teacher, kept, axis=-1)
    assert float(feature_loss_value([student], [teacher], [kept])) == pytest.approx(0.0, abs=1e-7)
    # twice the teacher: the error equals the teacher's own mean square, whatever the layer's scale
    for scale in (1.0, 100.0):
        value = feature_loss_value([2 * scale * student, student], [scale * teacher, teacher], [kept, kept])
        assert float(value) == pytest.approx(0.5, rel=1e-5)  # the mean of 1 and 0 over the two layers
    assert float(feature_loss_value([teacher], [teacher], [None])) == pytest.approx(0.0, abs=1e-7)


def _residual(name: str, width: int = 6) -> tf.keras.Model:
    layers = tf.keras.layers
    inputs = tf.keras.Input((8, 8, 1))
    stem = layers.Conv2D(width, 3, padding="same", name="stem")(inputs)
    branch = layers.Conv2D(width, 3, padding="same", name="branch")(layers.ReLU(name="stem_relu")(stem))
    joined = layers.ReLU(name="joined")(layers.Add(name="add")([stem, branch]))
    outputs = layers.Dense(10, name="head")(layers.GlobalAveragePooling2D(name="gap")(joined))
    return tf.keras.Model(inputs, outputs, name=name)


def test_a_loss_that_reads_a_layer_trains_the_student_through_a_view_of_it(digits):
    """The loss names the layer it reads; the training loop hands it the layer's output, the teacher
    stays frozen, and the student keeps its own single output. Against the same training on the logits
    alone, the student's feature map ends much closer to the teacher's."""
    tf.keras.utils.set_random_seed(0)
    teacher, initial = _residual("teacher"), _residual("student")
    images = digits.sample_train(64)
    teacher_features = tf.keras.Model(teacher.inputs, teacher.get_layer("joined").output)
    before_teacher = teacher.get_weights()
    errors = {}
    for weight in (0.0, 1.0):
        student = tf.keras.models.clone_model(initial)
        student.set_weights(initial.get_weights())
        loss = Distiller(teacher, 4.0, 0.9, feature_weight=weight).loss_for(student, [FeatureMatch("joined")])
        assert getattr(loss, "layer_outputs", ()) == (("joined",) if weight else ())  # weight 0: logits only
        losses = train(student, digits, TrainSchedule(2, 32, 0.05, "cosine", "sgd", 0.0, False), seed=0,
                       loss_function=loss)
        assert losses and all(np.isfinite(losses)) and len(student.outputs) == 1
        features = tf.keras.Model(student.inputs, student.get_layer("joined").output)
        errors[weight] = float(feature_loss_value([features(images)], [teacher_features(images)], [None]))
    assert errors[1.0] < 0.75 * errors[0.0], errors  # measured 0.56 against 0.87
    assert all(np.array_equal(a, b) for a, b in zip(before_teacher, teacher.get_weights()))


def test_a_match_that_does_not_fit_the_models_is_refused():
    teacher, student = _residual("teacher"), _residual("student", width=4)
    distiller = Distiller(teacher, 4.0, 0.9, feature_weight=1.0)
    with pytest.raises(ValueError, match="'joined' has 4 channels in the student and 6 in the teacher"):
        distiller.loss_for(student, [FeatureMatch("joined")])
    assert distiller.loss_for(student, [FeatureMatch("joined", np.array([0, 2, 3, 5]))]).layer_outputs == ("joined",)
    with pytest.raises(ValueError, match="no layer 'missing'"):
        distiller.loss_for(student, [FeatureMatch("missing")])
    with pytest.raises(ValueError, match="feature weight"):
        Distiller(teacher, 4.0, 0.9, feature_weight=-1.0)


# --------------------------------------------------------------------------- configuration


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"distillation.temperature = 0 .*> 0 or 'search'"):
        DistillationConfig(enabled=True, temperature=0)
    with pytest.raises(ConfigError, match=r"distillation.alpha = 1.5"):
        DistillationConfig(enabled=True, alpha=1.5)
    with pytest.raises(ConfigError, match="--distill"):
        DistillationConfig(enabled=False, temperature="search")
    with pytest.raises(ConfigError, match=r"distillation.enabled = 'yes'"):
        DistillationConfig(enabled="yes")
    with pytest.raises(ConfigError, match="temperature_range"):
        DistillationConfig(enabled=True, temperature_range=(4.0, 2.0))
    with pytest.raises(ConfigError, match=r"distillation.temperature = 'hot'"):
        build_run_config({"distillation": {"enabled": True, "temperature": "hot"}}, LEARNERS.names())
    with pytest.raises(ConfigError, match=r"distillation.feature_weight = -1.0 .*>= 0"):
        build_run_config({"distillation": {"feature_weight": -1}}, LEARNERS.names())
    with pytest.raises(ConfigError, match="unknown key 'distillation.temprature'"):
        build_run_config({"distillation": {"temprature": 2}}, LEARNERS.names())
    config = build_run_config({"learner": "full-prec", "distillation": {"enabled": True}}, LEARNERS.names())
    with pytest.raises(ConfigError, match="does not fine-tune"):
        check_run(LEARNERS.get("full-prec"), config)
    check_run(LEARNERS.get("channel"), config)


def test_the_feature_flag_sets_the_feature_weight():
    from pocketflow.cli import build_parser, merged_config_dict

    data, _ = merged_config_dict(build_parser().parse_args(["--learner", "channel", "--distill-features", "2.5"]))
    assert build_run_config(data, LEARNERS.names()).distillation.feature_weight == 2.5
    assert DistillationConfig().feature_weight == 0.0  # off unless asked (docs/channel-recovery.md: why)


def test_auto_distils_channel_fine_tuning_only():
    """distillation.enabled = auto (the default) resolves per learner: on for channel pruning, off elsewhere."""
    config = build_run_config({}, LEARNERS.names())
    assert config.distillation.enabled == "auto"
    assert resolve_enabled(LEARNERS.get("channel"), config).distillation.enabled is True
    for name in ("uniform", "weight-sparse", "non-uniform", "full-prec"):
        assert resolve_enabled(LEARNERS.get(name), config).distillation.enabled is False, name
    off = build_run_config({"distillation": {"enabled": False}}, LEARNERS.names())
    assert resolve_enabled(LEARNERS.get("channel"), off).distillation.enabled is False
    searched_t = build_run_config({"distillation": {"temperature": "search"}}, LEARNERS.names())
    assert resolve_enabled(LEARNERS.get("channel"), searched_t).distillation.enabled is True
    with pytest.raises(ConfigError, match="pass --distill"):
        resolve_enabled(LEARNERS.get("uniform"), searched_t)


def test_searched_values_suggest_reference_and_make():
    config = DistillationConfig(enabled=True, temperature="search", alpha="search")
    middle = reference_values(config)
    assert middle["distill_temperature"] == pytest.approx(np.sqrt(10.0))
    chosen = suggest(optuna.trial.FixedTrial(middle), config)
    assert chosen == {"temperature": pytest.approx(np.sqrt(10.0)), "alpha": pytest.approx(0.625)}
    teacher, _ = _pair(False)
    assert make_distiller(DistillationConfig(), teacher) is None
    made = make_distiller(config, teacher, {"temperature": 2.5, "alpha": 0.4})
    assert (made.temperature, made.alpha) == (2.5, 0.4)
    assert make_distiller(config, teacher).temperature == pytest.approx(np.sqrt(10.0))  # no trial chose: middle


# --------------------------------------------------------------------------- training with a teacher


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"), seed=0)


def _teacher(digits) -> tf.keras.Model:
    """An untrained digits CNN: the plumbing, not the accuracy, is under test here."""
    return build_digits_cnn(digits.input_shape, digits.num_classes, width=8)


def test_the_teacher_stays_frozen_while_the_student_learns(digits):
    teacher = _teacher(digits)
    student = tf.keras.models.clone_model(teacher)
    student.set_weights(teacher.get_weights())
    before_teacher = [w.copy() for w in teacher.get_weights()]  # BatchNorm moving statistics included
    before_student = [w.copy() for w in student.get_weights()]
    losses = train(student, digits, TrainSchedule(0.2, 32, 0.05, "cosine", "sgd", 0.0, False), seed=0,
                   loss_function=distillation_loss(Distiller(teacher, 4.0, 0.9), student))
    assert losses and all(np.isfinite(losses))
    assert all(np.array_equal(a, b) for a, b in zip(before_teacher, teacher.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(before_student, student.get_weights()))


# --------------------------------------------------------------------------- end to end


def shared_cache(tmp_path_factory) -> str:
    """One baseline cache for the end-to-end tests of this session (the digits baseline is trained once)."""
    path = tmp_path_factory.getbasetemp() / "distill-pareto-cache"
    path.mkdir(exist_ok=True)
    return str(path)


E2E_BASELINE_EPOCHS = "20"  # enough steps for BatchNorm moving statistics to settle (8 are not)


def test_main_distill_with_searched_temperature_and_alpha(tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), "--learner=channel", "--target-speedup", "2", "--trials", "2",
               "--epochs", E2E_BASELINE_EPOCHS, "--finetune-epochs", "0.3", "--latency-runs", "5",
               "--distill", "--distill-temperature", "search", "--distill-alpha", "search",
               "--set", "distillation.search_epochs=0.1", "--output-dir", str(out)]
    env = dict(os.environ, POCKETFLOW_CACHE_DIR=shared_cache(tmp_path_factory))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    chosen = report["best"]["hyperparameters"]["distillation"]
    assert 1.0 <= chosen["temperature"] <= 10.0 and 0.3 <= chosen["alpha"] <= 0.95
    assert report["distillation"] == chosen  # the final fine-tuning used the chosen trial's T and alpha
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2 and all("distill_temperature" in json.loads(row["params"]) for row in rows)
    assert "distilled from the baseline" in result.stderr
    assert "distillation:" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------- a teacher other than the baseline


def _fit(model: tf.keras.Model, batches: tf.data.Dataset, epochs: int) -> tf.keras.Model:
    from pocketflow.training import outputs_probabilities
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3), loss=loss)
    model.fit(batches, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def teacher_files(digits, tmp_path_factory):
    """Saved digits CNNs: one trained on the true labels (the run's baseline), one trained with every 7
    labelled 1 (a teacher whose advice is visible in what the student learns), one untrained."""
    directory = tmp_path_factory.mktemp("teachers")
    tf.keras.utils.set_random_seed(0)
    batches = digits.train(32, shuffle=True, seed=0)
    seven_is_one = batches.map(lambda x, y: (x, tf.where(tf.equal(y, 7), tf.ones_like(y), y)))
    models = {"baseline": _fit(build_digits_cnn(digits.input_shape, digits.num_classes, width=16), batches, 15),
              "seven_is_one": _fit(build_digits_cnn(digits.input_shape, digits.num_classes, width=16), seven_is_one,
                                   15),
              "untrained": build_digits_cnn(digits.input_shape, digits.num_classes, width=16)}
    paths = {}
    for name, model in models.items():
        paths[name] = str(directory / f"{name}.keras")
        model.save(paths[name])
    return paths


def test_the_teacher_option_is_checked_before_any_work():
    from pocketflow.cli import build_parser, merged_config_dict
    data, _ = merged_config_dict(build_parser().parse_args(["--learner", "channel", "--teacher", "big.keras"]))
    assert build_run_config(data, LEARNERS.names()).distillation.teacher == "big.keras"
    with pytest.raises(ConfigError, match=r"--teacher .* distillation is off .*drop one"):
        build_run_config({"distillation": {"teacher": "big.keras", "enabled": False}}, LEARNERS.names())
    with pytest.raises(ConfigError, match=r"--distill-features .* baseline as teacher"):
        build_run_config({"distillation": {"teacher": "big.keras", "feature_weight": 1.0}}, LEARNERS.names())
    with pytest.raises(ConfigError, match=r"distillation.teacher"):
        build_run_config({"distillation": {"teacher": ""}}, LEARNERS.names())
    uniform = build_run_config({"learner": "uniform", "distillation": {"teacher": "big.keras"}}, LEARNERS.names())
    with pytest.raises(ConfigError, match=r"learner 'uniform'.*--teacher would not be used; pass --distill"):
        resolve_enabled(LEARNERS.get("uniform"), uniform)


def test_load_teacher_scores_the_teacher_and_refuses_one_that_expects_other_inputs(digits, teacher_files, caplog):
    from learners.distillation import load_teacher
    from pocketflow.errors import DataError
    baseline = tf.keras.models.load_model(teacher_files["baseline"])
    assert load_teacher(DistillationConfig(enabled=True), baseline, digits) == (baseline, None)  # no file: baseline
    assert load_teacher(DistillationConfig(enabled=False), baseline, digits) == (baseline, None)

    teacher, described = load_teacher(DistillationConfig(enabled=True, teacher=teacher_files["seven_is_one"]),
                                      baseline, digits)
    assert teacher is not baseline and not teacher.trainable
    assert described["path"] == teacher_files["seven_is_one"]
    # about one class in ten is taught wrong: below the baseline, well above chance
    assert 0.5 < described["validation_accuracy"] < described["baseline_validation_accuracy"] - 0.05
    assert "below the baseline" in caplog.text

    with pytest.raises(DataError, match=r"scores .* on validation against the baseline's .*other inputs"):
        load_teacher(DistillationConfig(enabled=True, teacher=teacher_files["untrained"]), baseline, digits)
    with pytest.raises(DataError, match=r"model 'missing.keras' does not exist; .* to --teacher"):
        load_teacher(DistillationConfig(enabled=True, teacher="missing.keras"), baseline, digits)
    seven_classes = build_digits_cnn(digits.input_shape, 7, width=4)
    seven_classes.save(os.path.join(os.path.dirname(teacher_files["untrained"]), "seven.keras"))
    with pytest.raises(DataError, match=r"predicts 7 classes but the dataset has 10"):
        load_teacher(DistillationConfig(enabled=True, teacher=os.path.join(
            os.path.dirname(teacher_files["untrained"]), "seven.keras")), baseline, digits)


def _distil_from_seven_is_one(out, teacher_files, *options: str) -> subprocess.CompletedProcess:
    """The channel job on the digits baseline, distilled from the teacher that says every 7 is a 1, alone
    in the loss (alpha 1), hard enough that the student takes the teacher's mistake."""
    command = [sys.executable, str(ROOT / "main.py"), "--learner=channel", "--model", teacher_files["baseline"],
               "--target-speedup", "1.5", "--finetune-epochs", "4", "--learning-rate", "0.5",
               "--distill-alpha", "1.0", "--distill-temperature", "1", "--teacher", teacher_files["seven_is_one"],
               "--latency-runs", "5", "--output-dir", str(out), *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _ones_among_sevens(digits, path: str) -> float:
    images, labels = digits.test_arrays()
    outputs = tf.keras.models.load_model(path, compile=False).predict(images[labels == 7], verbose=0)
    return float(np.mean(np.argmax(outputs, axis=-1) == 1))


def test_main_distils_from_the_named_teacher(tmp_path, digits, teacher_files):
    """The pruned model learns to call the test set's 7s ones, which the baseline it was pruned from does not."""
    out = tmp_path / "run"
    result = _distil_from_seven_is_one(out, teacher_files, "--trials", "1")
    report = json.loads((out / "report.json").read_text())
    assert report["distillation"]["teacher"]["path"] == teacher_files["seven_is_one"]
    assert f"distilled from {teacher_files['seven_is_one']}" in result.stderr
    assert "Fine-tuning distilled from `" in (out / "report.md").read_text()
    assert _ones_among_sevens(digits, teacher_files["baseline"]) < 0.1
    assert _ones_among_sevens(digits, report["best"]["model_path"]) > 0.5


def test_every_pareto_front_model_distils_from_the_named_teacher(tmp_path, digits, teacher_files):
    """--objective pareto fine-tunes each front model on its own path (hpo/pareto.py): each one learns the
    named teacher's mistake, and the report names the teacher once for the front."""
    out = tmp_path / "run"
    _distil_from_seven_is_one(out, teacher_files, "--objective", "pareto", "--trials", "4",
                              "--set", "pareto.min_models=2", "--set", "pareto.max_models=2")
    report = json.loads((out / "report.json").read_text())
    assert report["distillation"] == {"teacher": report["distillation"]["teacher"]}
    assert report["distillation"]["teacher"]["path"] == teacher_files["seven_is_one"]
    assert "Fine-tuning distilled from `" in (out / "report.md").read_text()
    rows = report["pareto"]["rows"]
    assert len(rows) + len(report["pareto"]["dropped_after_finetuning"]) >= 2  # two models fine-tuned
    for row in rows:
        assert row["distillation"] == {"temperature": 1.0, "alpha": 1.0}
        assert _ones_among_sevens(digits, row["model_path"]) > 0.5, row["trial"]
