"""Training and evaluation loops shared by every learner.

A custom loop (not ``model.fit``) so that every learner gets the same things for free:
Horovod gradient averaging through the context's tape, a distillation or other extra loss,
a hook after each step (sparsity masks), weight decay that works on any user model, and a
clear failure when the loss diverges.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from nets import Schedule
from pocketflow.config import DataConfig, TrainConfig
from pocketflow.data.base import Dataset
from pocketflow.distributed import SingleProcess
from pocketflow.precision import AUTO, FLOAT16, FLOAT32, copy_weights, mixed_twin, model_precision, resolve_precision

log = logging.getLogger(__name__)

# (images, labels, logits) -> loss. A loss that also reads intermediate features names their layers in
# an attribute ``layer_outputs`` (a tuple of layer names): ``train`` then passes it a list, the model's
# output followed by those layers' outputs (feature distillation, learners/distillation.py).
LossFunction = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


PROGRESS_SECONDS = 30.0  # a progress line at least this often during long epochs


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainSchedule:
    """A fully resolved training recipe (net defaults overridden by the user's train section)."""

    epochs: float
    batch_size: int
    learning_rate: float
    schedule: str
    optimizer: str
    weight_decay: float
    augment: bool
    scale_learning_rate: bool = True
    # float32, bfloat16, float16, or auto where the hardware has bfloat16 (each training then picks by
    # its model's layer widths: pocketflow.precision.model_precision)
    precision: str = FLOAT32

    def with_epochs(self, epochs: float) -> "TrainSchedule":
        return replace(self, epochs=epochs)


def resolve_schedule(net_schedule: Schedule, train: TrainConfig, data: DataConfig) -> TrainSchedule:
    def pick(user_value, default):
        return default if user_value is None else user_value

    return TrainSchedule(
        epochs=float(pick(train.epochs, net_schedule.epochs)),  # 30 and 30.0 are one schedule (and cache key)
        batch_size=pick(train.batch_size, net_schedule.batch_size),
        learning_rate=pick(train.learning_rate, net_schedule.learning_rate),
        schedule=pick(train.schedule, net_schedule.schedule),
        optimizer=pick(train.optimizer, net_schedule.optimizer),
        weight_decay=pick(train.weight_decay, net_schedule.weight_decay),
        augment=pick(data.augment, net_schedule.augment),
        scale_learning_rate=train.scale_learning_rate,
        precision=resolve_precision(train.precision),
    )


FROM_TRAINED_LEARNING_RATE_FACTOR = 0.1


def from_trained(schedule: TrainSchedule) -> TrainSchedule:
    """Training that starts from trained weights (fine-tuning) uses a tenth of the from-scratch rate."""
    return replace(schedule, learning_rate=schedule.learning_rate * FROM_TRAINED_LEARNING_RATE_FACTOR)


def outputs_probabilities(model: tf.keras.Model) -> bool:
    """True when the model ends in a softmax (so the loss must not apply one again)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return isinstance(last, tf.keras.layers.Softmax) or getattr(activation, "__name__", "") == "softmax"


def cross_entropy_for(model: tf.keras.Model) -> LossFunction:
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))

    def cross_entropy(images: tf.Tensor, labels: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
        return loss(labels, outputs)

    return cross_entropy


def decayed_weights(model: tf.keras.Model) -> List[tf.Variable]:
    """Convolution and dense kernels: the weights L2 decay applies to (not BN, not biases)."""
    names = ("kernel", "depthwise_kernel", "pointwise_kernel")
    return [w for w in model.trainable_weights if any(w.name.split("/")[-1].startswith(n) for n in names)]


def _learning_rate(schedule: TrainSchedule, total_steps: int, scale: float):
    base = schedule.learning_rate * scale
    total_steps = max(1, total_steps)
    if schedule.schedule == "cosine":
        return tf.keras.optimizers.schedules.CosineDecay(base, decay_steps=total_steps, alpha=0.0)
    if schedule.schedule == "step":
        bounds = [int(total_steps * 0.5), int(total_steps * 0.75)]
        return tf.keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [base, base * 0.1, base * 0.01])
    return base


def _optimizer(schedule: TrainSchedule, learning_rate) -> tf.keras.optimizers.Optimizer:
    if schedule.optimizer == "adam":
        return tf.keras.optimizers.legacy.Adam(learning_rate)
    return tf.keras.optimizers.legacy.SGD(learning_rate, momentum=0.9, nesterov=True)


def _step_plan(data: Dataset, schedule: TrainSchedule, workers: int) -> tuple:
    """(batch size per worker, steps per epoch, total optimizer steps) of ``train``."""
    batch_size = min(schedule.batch_size, max(1, data.num_train // workers))
    steps_per_epoch = max(1, data.num_train // (batch_size * workers))
    return batch_size, steps_per_epoch, max(1, int(math.ceil(schedule.epochs * steps_per_epoch)))


def training_steps(data: Dataset, schedule: TrainSchedule, workers: int = 1) -> int:
    """Optimizer steps ``train`` takes for ``schedule`` on ``workers`` processes."""
    return _step_plan(data, schedule, workers)[2]


def batchnorm_layers(model: tf.keras.Model) -> List[tf.keras.layers.BatchNormalization]:
    """Every BatchNormalization of ``model``, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            found.extend(batchnorm_layers(layer))
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            found.append(layer)
    return found


STALE_BATCHNORM_FRACTION = 0.05  # re-estimate BatchNorm statistics when more of the old ones are left
SETTLE_BATCHES = 20


def settle_batchnorm(model: tf.keras.Model, data: Dataset, schedule: TrainSchedule, *, workers: int = 1,
                     seed: int = 0) -> int:
    """After a training too short for BatchNorm's moving averages to forget the values they started
    from (more than 5% of them left: momentum ** steps), re-estimate them from training batches;
    returns the batches used (0: the statistics had settled, or there is no BatchNorm).

    Otherwise the model is evaluated with statistics of weights it no longer has (a 0.3-epoch
    fine-tuning of a pruned digits CNN: 96.5% -> 88.9% validation accuracy, 98.6% with fresh ones).
    A training that freezes BatchNorm on purpose (quantization-aware training) does not call this.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    steps = training_steps(data, schedule, workers)
    if max(layer.momentum for layer in layers) ** steps <= STALE_BATCHNORM_FRACTION:
        return 0
    done = recalibrate_batchnorm(model, data, SETTLE_BATCHES, schedule.batch_size, seed=seed)
    log.info("the training took %d steps, too few for BatchNorm's running statistics to settle: "
             "re-estimated them from %d training batches", steps, done, extra={"console": False})
    return done


def recalibrate_batchnorm(model: tf.keras.Model, data: Dataset, batches: int, batch_size: int,
                          seed: int = 0) -> int:
    """Replace BatchNorm moving statistics by their average over ``batches`` training batches;
    returns how many batches were used.

    Compression shifts every layer's activation statistics, and a short training cannot move
    moving averages with momentum 0.99 far enough, so a model would be scored with stale ones.
    With momentum 0 each forward pass leaves that batch's statistics in the moving variables;
    they are averaged here. The pass runs as one traced function: eager calls took 1.24x longer
    on ResNet-56 (scripts/time_recalibration.py).
    """
    layers = batchnorm_layers(model)
    if not layers or batches <= 0:
        return 0
    # The same batches whatever ran before in this process (a baseline trained here or loaded from
    # the cache, a search resumed): the shuffle's order also depends on TensorFlow's global seed.
    tf.random.set_seed(seed)
    momenta = [layer.momentum for layer in layers]
    statistics = [(layer.moving_mean, layer.moving_variance) for layer in layers]
    totals = [[np.zeros(mean.shape, np.float64), np.zeros(variance.shape, np.float64)]
              for mean, variance in statistics]
    done = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when the pass is traced: the moving values become the batch's
        forward = traced(lambda images: model(images, training=True))
        for images, _ in data.train(batch_size, shuffle=True, seed=seed + 1, repeat=True).take(batches):
            forward(images)
            for total, (mean, variance) in zip(totals, statistics):
                total[0] += mean.numpy()
                total[1] += variance.numpy()
            done += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    if done:
        for (mean, variance), (mean_total, variance_total) in zip(statistics, totals):
            mean.assign((mean_total / done).astype(mean.dtype.as_numpy_dtype))
            variance.assign((variance_total / done).astype(variance.dtype.as_numpy_dtype))
    return done


def train(model: tf.keras.Model, data: Dataset, schedule: TrainSchedule, *,
          distributed: SingleProcess | None = None, seed: int = 0,
          loss_function: Optional[LossFunction] = None,
          after_step: Optional[Callable[[], None]] = None,
          description: str = "train", step_seconds: Optional[List[float]] = None) -> List[float]:
    """Train ``model`` in place for ``schedule.epochs`` (fractions allowed); returns the loss per epoch.
    ``step_seconds``, when given, receives the wall time of every step (batch included)."""
    distributed = distributed or SingleProcess()
    if schedule.epochs <= 0:
        return []
    # Every training starts from the same random state (data order, dropout, augmentation) whatever
    # ran before it in this process: a baseline trained here or loaded from the cache, a search run
    # straight through or killed and resumed, all train their candidates identically.
    tf.random.set_seed(seed)
    precision, auto_reason = model_precision(model, schedule.precision)
    if auto_reason:
        log.info("%s runs in float32: %s", description, auto_reason, extra={"console": False})
    trained = _precision_twin(model, precision, after_step, description, asked=schedule.precision != AUTO)
    loss_function = loss_function or cross_entropy_for(model)
    try:
        return _train_loop(with_layer_outputs(trained, getattr(loss_function, "layer_outputs", ())), data, schedule,
                           distributed, seed, loss_function, after_step, description, step_seconds)
    finally:
        if trained is not model:
            copy_weights(trained, model)


def with_layer_outputs(model: tf.keras.Model, layer_names) -> tf.keras.Model:
    """``model`` itself, or a view of it (the same layers and weights) that returns its output followed
    by the named layers' outputs, for a loss that reads them."""
    if not layer_names:
        return model
    if len(model.outputs) != 1:
        raise ValueError(f"model '{model.name}' has {len(model.outputs)} outputs; a loss that reads layer outputs "
                         "needs a single-output model")
    return tf.keras.Model(model.inputs, [model.outputs[0]] + [model.get_layer(name).output for name in layer_names],
                          name=f"{model.name}_with_features")


def _precision_twin(model: tf.keras.Model, precision: str, after_step: Optional[Callable[[], None]],
                    description: str, asked: bool) -> tf.keras.Model:
    """The model the loop trains: ``model`` itself in float32, or its mixed-precision twin. A fallback
    the user asked against (``asked``: an explicit train.precision) is said on the console too."""
    if precision == FLOAT32:
        return model
    if after_step is not None:
        twin, reason = None, "its per-step hook edits the model's own weights"
    else:
        twin, reason = mixed_twin(model, precision)
    if twin is None:
        log.info("%s runs in float32, not %s: %s", description, precision, reason, extra={"console": asked})
        return model
    log.debug("%s runs in %s (mixed precision: float32 weights)", description, precision)
    return twin


def _train_loop(model: tf.keras.Model, data: Dataset, schedule: TrainSchedule, distributed: SingleProcess,
                seed: int, loss_function: LossFunction, after_step: Optional[Callable[[], None]],
                description: str, step_seconds: Optional[List[float]]) -> List[float]:
    batch_size, steps_per_epoch, total_steps = _step_plan(data, schedule, distributed.size)
    scale = distributed.size if schedule.scale_learning_rate else 1
    optimizer = _optimizer(schedule, _learning_rate(schedule, total_steps, scale))
    scaled = any(layer.dtype_policy.compute_dtype == FLOAT16 for layer in model.layers)
    if scaled:  # float16's narrow range: the loss is scaled up so small gradients do not flush to zero
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    decayed = decayed_weights(model)
    weight_decay = float(schedule.weight_decay)
    variables = model.trainable_variables

    def step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss = loss_function(images, labels, outputs)
            if weight_decay > 0 and decayed:
                loss += 0.5 * weight_decay * tf.add_n([tf.reduce_sum(tf.square(w)) for w in decayed])
            differentiated = optimizer.get_scaled_loss(loss) if scaled else loss  # recorded by the tape
        tape = distributed.wrap_tape(tape)
        gradients = tape.gradient(differentiated, variables)
        if scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])
        return loss

    step = traced(step, reduce_retracing=True)

    batches = data.train(batch_size, shuffle=True, augment=schedule.augment, seed=seed,
                         shard=distributed.shard(), repeat=True)
    losses: List[float] = []
    epoch_losses: List[float] = []
    started = last_note = last_epoch_note = time.time()
    epoch = 0
    step_started = time.perf_counter()
    for step_index, (images, labels) in enumerate(batches.take(total_steps)):
        loss = float(step(images, labels))
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - step_started)
        if step_index == 0:
            # Every rank starts from rank 0's weights (and optimizer slots).
            distributed.broadcast_variables(model.variables + optimizer.variables())
            first_step_done = time.time()  # the first step traces the graph: the ETA leaves it out
        if after_step is not None:
            after_step()
        if not math.isfinite(loss):
            raise DivergenceError(f"{description}: the loss became {loss} at step {step_index + 1}; "
                                  f"lower the learning rate (--learning-rate)")
        epoch_losses.append(loss)
        if distributed.is_chief and time.time() - last_note >= PROGRESS_SECONDS:
            last_note = time.time()
            done = (step_index + 1) / total_steps
            elapsed = last_note - started
            eta = (last_note - first_step_done) / max(step_index, 1) * (total_steps - step_index - 1)
            log.info("%s step %d/%d (%.0f%%) loss %.4f  elapsed %.0fs  eta %.0fs", description, step_index + 1,
                     total_steps, 100 * done, float(np.mean(epoch_losses)), elapsed, eta)
        last_step = step_index + 1 == total_steps
        if (step_index + 1) % steps_per_epoch == 0 or last_step:
            epoch += 1
            mean_loss = distributed.average(float(np.mean(epoch_losses)))
            losses.append(mean_loss)
            epoch_losses = []
            if distributed.is_chief:
                # Short epochs would flood the console: an epoch line at most every PROGRESS_SECONDS
                # (and the first and the last); the others go to the debug log.
                now = time.time()
                shown = epoch == 1 or last_step or now - last_epoch_note >= PROGRESS_SECONDS
                last_epoch_note = now if shown else last_epoch_note
                log.log(logging.INFO if shown else logging.DEBUG, "%s epoch %d/%s loss %.4f (%.0fs)", description,
                        epoch, _format_epochs(schedule.epochs), mean_loss, now - started)
        step_started = time.perf_counter()
    distributed.average_variables(model.non_trainable_variables)  # BatchNorm statistics: one value on every rank
    return losses


def _format_epochs(epochs: float) -> str:
    return str(int(epochs)) if float(epochs).is_integer() else f"{epochs:.2f}"


_INFERENCE_FUNCTIONS: "weakref.WeakKeyDictionary[tf.keras.Model, Callable]" = weakref.WeakKeyDictionary()


class _OwnKey:
    """Calls ``function``. TensorFlow's retracing detector counts traces per traced callable's *code*, so
    the one trace every new model needs (a search builds a model per trial, each with its own inference,
    BatchNorm and training functions) added up to "N out of the last N calls triggered tf.function
    retracing" although no function traced twice. A wrapper object has no code of its own: the detector
    keys it by the object, so each function's traces are counted apart and a real retracing still shows."""

    def __init__(self, function: Callable) -> None:
        self._function = function

    def __call__(self, *args):
        return self._function(*args)


def traced(function: Callable, **options) -> Callable:
    """``tf.function(function, **options)``, counted apart by TensorFlow's retracing detector (``_OwnKey``)."""
    return tf.function(_OwnKey(function), **options)


def inference_function(model: tf.keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """The model's inference pass as one traced function, kept for as long as the model lives.

    Traced once for any batch size: Keras's own predict function traces again for a split's last,
    smaller batch, which cost 0.3 s (ResNet-20) to 0.7 s (ResNet-56) per evaluated candidate.
    A search traces once per candidate (each is a new graph), each in a function of its own (``traced``).
    """
    function = _INFERENCE_FUNCTIONS.get(model)
    if function is None:
        if len(model.inputs) != 1:
            return model.predict_on_batch
        owner = weakref.ref(model)  # the cache must not keep the model alive
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
        function = traced(lambda images: owner()(images, training=False), input_signature=[spec])
        _INFERENCE_FUNCTIONS[model] = function
    return function


def predict_logits(model: tf.keras.Model, batches: tf.data.Dataset) -> tuple:
    """Model outputs and labels over a whole split."""
    infer = inference_function(model)
    outputs, labels = [], []
    for images, batch_labels in batches:
        outputs.append(np.asarray(infer(images)))
        labels.append(batch_labels.numpy())
    return np.concatenate(outputs), np.concatenate(labels)


def accuracy(model: tf.keras.Model, batches: tf.data.Dataset) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    outputs, labels = predict_logits(model, batches)
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))
