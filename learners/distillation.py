"""Knowledge distillation: a component (teacher + loss) that any learner's fine-tuning accepts.

The teacher is the uncompressed baseline (or a model file the user names, ``distillation.teacher``:
a stronger net for the same task, see ``load_teacher``), frozen (called with ``training=False`` and behind
``stop_gradient``, so neither its weights nor its BatchNorm statistics move) and evaluated
once per training batch on the same (augmented) images as the student. The loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels, student)

(Hinton et al. 2015): T softens both distributions, and T^2 keeps the soft term's gradient
on the same scale as the hard term's when T changes. ``alpha = 0`` is plain cross-entropy.

A learner whose student keeps a subset of the teacher's channels (channel pruning) can add a
feature term: ``loss_for(student, matches)`` with ``FeatureMatch(layer, channels)`` entries makes
the student's output of ``layer`` reproduce the teacher's output of the same layer on the channels
it kept, by squared error relative to the teacher's mean square there (so every layer weighs the
same whatever its scale); the mean over the matched layers, times ``feature_weight``, is added.

A learner uses it with one argument to the shared training loop::

    train(model, ..., loss_function=distillation_loss(teacher, model))

where ``teacher`` is what the runner passed to ``finetune`` (a ``Distiller`` or None). Under
Horovod every rank runs its own copy of the teacher on its own shard: the teacher is the same
on every rank (the baseline is broadcast or loaded identically), so nothing extra is exchanged.

T and alpha are hyperparameters: fixed in the ``distillation:`` section, or ``search`` to let
the optimizer tune them (``suggest``); the search then fine-tunes every trial's candidate
briefly with its own T and alpha before scoring it, so the choice is measured, not guessed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from pocketflow.config import AUTO, SEARCH, DistillationConfig, RunConfig
from pocketflow.errors import ConfigError, DataError
from pocketflow.model_io import check_input_shape, load_user_model
from pocketflow.precision import FLOAT32, mixed_twin, model_precision
from pocketflow.training import LossFunction, accuracy, outputs_probabilities, with_layer_outputs

log = logging.getLogger(__name__)

TEMPERATURE_PARAM = "distill_temperature"
ALPHA_PARAM = "distill_alpha"
_PROBABILITY_FLOOR = 1e-7


def _as_logits(outputs: tf.Tensor, probabilities: bool) -> tf.Tensor:
    """Logits, or log-probabilities for a model that ends in softmax (softmax(log p / T) is the same
    tempered distribution as softmax(z / T) for the logits z behind p)."""
    outputs = tf.cast(outputs, tf.float32)
    if probabilities:
        return tf.math.log(tf.clip_by_value(outputs, _PROBABILITY_FLOOR, 1.0))
    return outputs


def distillation_loss_value(labels: tf.Tensor, student_logits: tf.Tensor, teacher_logits: tf.Tensor,
                            temperature: float, alpha: float) -> tf.Tensor:
    """alpha * T^2 * mean KL(teacher_T || student_T) + (1 - alpha) * mean cross-entropy (from logits)."""
    student_logits = tf.cast(student_logits, tf.float32)
    teacher_logits = tf.stop_gradient(tf.cast(teacher_logits, tf.float32))
    loss = tf.constant(0.0, tf.float32)
    if alpha > 0.0:
        teacher_log_p = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
        student_log_p = tf.nn.log_softmax(student_logits / temperature, axis=-1)
        kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
        loss += alpha * temperature ** 2 * tf.reduce_mean(kl)
    if alpha < 1.0:
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(tf.reshape(labels, [-1]), tf.int32), logits=student_logits)
        loss += (1.0 - alpha) * tf.reduce_mean(cross_entropy)
    return loss


@dataclasses.dataclass(frozen=True)
class FeatureMatch:
    """A layer whose output the student should reproduce: the teacher's layer of the same name, at
    ``channels`` (the teacher's channel positions the student's channels are, in order; None: all)."""

    layer: str
    channels: Optional[np.ndarray] = None


def feature_loss_value(student_features: Sequence[tf.Tensor], teacher_features: Sequence[tf.Tensor],
                       channels: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """Mean over layers of mean((student - teacher[..., channels])^2) / mean(teacher[..., channels]^2)."""
    terms = []
    for student, teacher, kept in zip(student_features, teacher_features, channels):
        teacher = tf.stop_gradient(tf.cast(teacher, tf.float32))
        if kept is not None:
            teacher = tf.gather(teacher, kept, axis=-1)
        error = tf.reduce_mean(tf.square(tf.cast(student, tf.float32) - teacher))
        terms.append(error / (tf.reduce_mean(tf.square(teacher)) + 1e-6))
    return tf.add_n(terms) / float(len(terms))


class Distiller:
    """A frozen teacher and the distillation loss parameters; shared by every student of a run."""

    def __init__(self, teacher: tf.keras.Model, temperature: float = 4.0, alpha: float = 0.9,
                 precision: str = FLOAT32, feature_weight: float = 0.0) -> None:
        check_values(temperature, alpha)
        if not feature_weight >= 0:
            raise ValueError(f"distillation feature weight must be >= 0, not {feature_weight}")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.feature_weight = float(feature_weight)
        self.precision = precision  # the trainings' (train.precision): the teacher computes in it too
        self._teacher_probabilities = outputs_probabilities(teacher)
        self._computing_teacher: Optional[tf.keras.Model] = None
        self._teacher_views: Dict[Tuple[str, ...], tf.keras.Model] = {}

    def with_values(self, temperature: float, alpha: float) -> "Distiller":
        """The same teacher with other loss parameters (a trial's T and alpha)."""
        return Distiller(self.teacher, temperature, alpha, self.precision, self.feature_weight)

    def _teacher_model(self) -> tf.keras.Model:
        """The teacher, or its mixed-precision twin when the trainings run in bfloat16 / float16: its
        forward pass is a quarter of a distilled step in float32 (ResNet-20, 37 of 180 ms next to a
        bfloat16 student), and soft targets at T = 4 do not need float32's last digits."""
        if self._computing_teacher is None:
            precision = model_precision(self.teacher, self.precision)[0]
            twin = mixed_twin(self.teacher, precision)[0] if precision != FLOAT32 else None
            self._computing_teacher = twin or self.teacher
        return self._computing_teacher

    def teacher_logits(self, images: tf.Tensor) -> tf.Tensor:
        outputs = self._teacher_model()(images, training=False)
        return tf.stop_gradient(_as_logits(outputs, self._teacher_probabilities))

    def loss_for(self, student: tf.keras.Model, matches: Sequence[FeatureMatch] = ()) -> LossFunction:
        """The training loss for ``student``: (images, labels, student outputs) -> scalar; with
        ``matches`` and a feature weight > 0, the feature term too (the loss then names the layers it
        reads in ``layer_outputs``, which the training loop honours)."""
        student_probabilities = outputs_probabilities(student)
        temperature, alpha = self.temperature, self.alpha
        matches = list(matches) if self.feature_weight > 0 else []
        if not matches:
            def distillation(images: tf.Tensor, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
                return distillation_loss_value(labels, _as_logits(outputs, student_probabilities),
                                               self.teacher_logits(images), temperature, alpha)

            return distillation

        names = tuple(match.layer for match in matches)
        self._check_matches(student, matches)
        channels = [None if match.channels is None else tf.constant(np.asarray(match.channels), tf.int32)
                    for match in matches]
        teacher_view, weight = self._teacher_view(names), self.feature_weight

        def distillation_with_features(images: tf.Tensor, labels: tf.Tensor, outputs) -> tf.Tensor:
            teacher_outputs = teacher_view(images, training=False)
            teacher_logits = tf.stop_gradient(_as_logits(teacher_outputs[0], self._teacher_probabilities))
            value = distillation_loss_value(labels, _as_logits(outputs[0], student_probabilities), teacher_logits,
                                            temperature, alpha)
            return value + weight * feature_loss_value(outputs[1:], teacher_outputs[1:], channels)

        distillation_with_features.layer_outputs = names
        return distillation_with_features

    def _teacher_view(self, names: Tuple[str, ...]) -> tf.keras.Model:
        if names not in self._teacher_views:
            self._teacher_views[names] = with_layer_outputs(self._teacher_model(), names)
        return self._teacher_views[names]

    def _check_matches(self, student: tf.keras.Model, matches: Sequence[FeatureMatch]) -> None:
        """Each matched layer exists on both sides with compatible widths (else a ValueError: a learner bug)."""
        for match in matches:
            widths = []
            for side, model in (("student", student), ("teacher", self.teacher)):
                try:
                    widths.append(int(model.get_layer(match.layer).output.shape[-1]))
                except ValueError:
                    raise ValueError(f"feature distillation: the {side} has no layer '{match.layer}'") from None
            expected = widths[1] if match.channels is None else len(match.channels)
            if widths[0] != expected or (match.channels is not None and len(match.channels) and
                                         not 0 <= int(np.max(match.channels)) < widths[1]):
                raise ValueError(f"feature distillation: layer '{match.layer}' has {widths[0]} channels in the "
                                 f"student and {widths[1]} in the teacher; the match names {expected}")

    def describe(self) -> Dict[str, float]:
        described = {"temperature": self.temperature, "alpha": self.alpha}
        if self.feature_weight > 0:
            described["feature_weight"] = self.feature_weight
        return described

    def __repr__(self) -> str:
        return f"Distiller(teacher={self.teacher.name!r}, temperature={self.temperature}, alpha={self.alpha})"


Teacher = Union[Distiller, tf.keras.Model, None]


def as_distiller(teacher: Teacher) -> Optional[Distiller]:
    """A Distiller from what a learner's ``finetune`` received (a bare Keras model gets the defaults)."""
    if teacher is None or isinstance(teacher, Distiller):
        return teacher
    if isinstance(teacher, tf.keras.Model):
        defaults = DistillationConfig()
        return Distiller(teacher, float(defaults.temperature), float(defaults.alpha),
                         feature_weight=float(defaults.feature_weight))
    raise TypeError(f"teacher must be a Distiller, a Keras model or None, not {type(teacher).__name__}")


def distillation_loss(teacher: Teacher, student: tf.keras.Model,
                      matches: Sequence[FeatureMatch] = ()) -> Optional[LossFunction]:
    """The loss a learner passes to ``train``: distillation with ``teacher`` (and the feature term on
    ``matches``, where the run's feature weight is > 0), or None (cross-entropy)."""
    distiller = as_distiller(teacher)
    return distiller.loss_for(student, matches) if distiller is not None else None


def check_values(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, not {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], not {alpha}")


# --------------------------------------------------------------------------- the search's side


def searched(config: DistillationConfig) -> bool:
    """True when the optimizer chooses T or alpha (each trial is then fine-tuned with distillation)."""
    return config.enabled is True and (config.temperature == "search" or config.alpha == "search")


def suggest(trial: Any, config: DistillationConfig) -> Dict[str, float]:
    """T and alpha for one trial: suggested where the config says ``search``, fixed otherwise."""
    if config.temperature == "search":
        low, high = config.temperature_range
        temperature = trial.suggest_float(TEMPERATURE_PARAM, low, high, log=True)
    else:
        temperature = float(config.temperature)
    if config.alpha == "search":
        low, high = config.alpha_range
        alpha = trial.suggest_float(ALPHA_PARAM, low, high)
    else:
        alpha = float(config.alpha)
    return {"temperature": temperature, "alpha": alpha}


def reference_values(config: DistillationConfig) -> Dict[str, float]:
    """Parameters of the reference trial for searched T/alpha: the middle of each range (log middle for T)."""
    params: Dict[str, float] = {}
    if config.temperature == "search":
        low, high = config.temperature_range
        params[TEMPERATURE_PARAM] = float((low * high) ** 0.5)
    if config.alpha == "search":
        low, high = config.alpha_range
        params[ALPHA_PARAM] = (low + high) / 2.0
    return params


def make_distiller(config: DistillationConfig, teacher: tf.keras.Model,
                   chosen: Optional[Mapping[str, Any]] = None, precision: str = FLOAT32) -> Optional[Distiller]:
    """The run's Distiller (None when distillation is off); ``chosen`` holds a trial's T and alpha."""
    if config.enabled is not True:
        return None
    chosen = dict(chosen or {})
    temperature = chosen.get("temperature", config.temperature)
    alpha = chosen.get("alpha", config.alpha)
    if temperature == "search" or alpha == "search":  # no trial chose them (e.g. a learner that does not search)
        middle = reference_values(config)
        temperature = middle.get(TEMPERATURE_PARAM, temperature)
        alpha = middle.get(ALPHA_PARAM, alpha)
    return Distiller(teacher, float(temperature), float(alpha), precision, float(config.feature_weight))


def resolve_enabled(learner_class: type, config: RunConfig) -> RunConfig:
    """``config`` with ``distillation.enabled = auto`` decided for ``learner_class``: on where the
    learner fine-tunes a compressed model and declares distillation worth it, off elsewhere."""
    if config.distillation.enabled != AUTO:
        return config
    enabled = bool(learner_class.searches and learner_class.distill_by_default)
    if not enabled and config.distillation.teacher is not None:
        raise ConfigError(f"distillation is off by default for learner '{learner_class.name}', so --teacher would not "
                          f"be used; pass --distill too (or --set distillation.enabled=true)")
    if not enabled and (config.distillation.temperature == SEARCH or config.distillation.alpha == SEARCH):
        raise ConfigError(f"distillation is off by default for learner '{learner_class.name}', so its temperature "
                          f"or alpha cannot be searched; pass --distill (or --set distillation.enabled=true)")
    return dataclasses.replace(config, distillation=dataclasses.replace(config.distillation, enabled=enabled))


# A named teacher that keeps less than this share of the baseline's lead over chance on validation is
# refused: it almost surely expects other inputs (another normalization), and would teach noise.
TEACHER_MINIMUM_SHARE = 0.5


def load_teacher(config: DistillationConfig, baseline: tf.keras.Model, dataset: Any,
                 trust: bool = False) -> Tuple[tf.keras.Model, Optional[Dict[str, Any]]]:
    """The model to distil from, and what the report says of it (None for the baseline itself).

    A named teacher must take the dataset's images and predict its classes, and is scored on the
    validation split beside the baseline: one that scores below the baseline is used with a warning
    (a weaker teacher rarely helps); one that keeps less than half of the baseline's lead over chance
    is refused, since it most likely expects differently scaled inputs. Every Horovod rank loads and
    checks the same file, so every rank reaches the same verdict."""
    if config.enabled is not True or config.teacher is None:
        return baseline, None
    teacher = load_user_model(config.teacher, trust=trust, flag="--teacher")
    check_input_shape(teacher, dataset.input_shape, dataset.num_classes, config.teacher,
                      labels_from=dataset.labels_from)
    teacher.trainable = False
    scores = [accuracy(model, dataset.validation(256)) for model in (teacher, baseline)]
    chance = 1.0 / dataset.num_classes
    described = {"path": config.teacher, "validation_accuracy": scores[0], "baseline_validation_accuracy": scores[1]}
    if scores[0] < chance + TEACHER_MINIMUM_SHARE * (scores[1] - chance):
        raise DataError(f"teacher '{config.teacher}' scores {scores[0]:.2%} on validation against the baseline's "
                        f"{scores[1]:.2%}: it probably expects other inputs (data.scale, data.mean, data.std); "
                        f"pass a teacher trained with this run's input scaling, or drop --teacher")
    if scores[0] < scores[1]:
        log.warning("teacher '%s' scores %.2f%% on validation, below the baseline's %.2f%%: distilling from a "
                    "weaker model rarely helps", config.teacher, 100 * scores[0], 100 * scores[1])
    else:
        log.info("teacher '%s': validation accuracy %.2f%% (baseline %.2f%%)", config.teacher, 100 * scores[0],
                 100 * scores[1])
    return teacher, described


def check_run(learner_class: type, config: RunConfig) -> None:
    """Reject --distill where there is no fine-tuning to distil, before any work is done."""
    if config.distillation.enabled is not True:
        return
    if not learner_class.searches:
        raise ConfigError(f"--distill distils the fine-tuning of a compressed model, and learner "
                          f"'{learner_class.name}' does not fine-tune one (it trains or evaluates the baseline); "
                          f"use it with a compressing learner (--learner channel, weight-sparse, uniform, ...) "
                          f"or drop --distill")
    if config.train.finetune_epochs == 0 and not searched(config.distillation):
        log.warning("--distill with --finetune-epochs 0: there is no fine-tuning, so the teacher is not used")
