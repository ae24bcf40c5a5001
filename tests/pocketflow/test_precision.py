"""Training precision: auto's choice, the mixed-precision twin, and what falls back to float32."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from pocketflow import precision
from pocketflow.config import DataConfig, TrainConfig
from pocketflow.data import load_dataset
from pocketflow.errors import ConfigError
from pocketflow.training import TrainSchedule, train, training_steps


def _net() -> tf.keras.Model:
    tf.random.set_seed(1)
    inputs = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.Flatten()(tf.keras.layers.MaxPooling2D()(tf.keras.layers.ReLU()(x)))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x))


def _schedule(precision_name: str) -> TrainSchedule:
    return TrainSchedule(epochs=3.0, batch_size=64, learning_rate=0.05, schedule="cosine", optimizer="sgd",
                         weight_decay=1e-4, augment=False, precision=precision_name)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"), seed=0)


def test_auto_picks_bfloat16_only_where_the_cpu_computes_it(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    assert precision.cpu_flags(cpuinfo) >= {"avx2", "amx_bf16"}
    assert precision.cpu_flags(tmp_path / "absent") == set()
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU decides auto here")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert precision.resolve_precision("auto") == "auto"  # each training decides by its model
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert precision.resolve_precision("auto") == "float32"
    assert precision.resolve_precision("bfloat16") == "bfloat16"  # an explicit choice is kept


def _widths(first: int, second: int) -> tf.keras.Model:
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(first, 3, name="first")(inputs)
    x = tf.keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = tf.keras.layers.Dense(second, name="hidden")(tf.keras.layers.GlobalAveragePooling2D()(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10, name="logits")(x))


def test_auto_trains_in_bfloat16_only_models_whose_widths_its_kernels_are_fast_for():
    assert precision.model_precision(_widths(16, 32), "auto") == ("bfloat16", None)  # the 10 logits do not count
    chosen, reason = precision.model_precision(_widths(11, 32), "auto")
    assert chosen == "float32" and "first (11), depthwise (11)" in reason and "multiples of 16" in reason
    assert precision.model_precision(_widths(16, 24), "auto")[0] == "float32"
    assert precision.model_precision(_widths(11, 24), "bfloat16") == ("bfloat16", None)  # asked for: kept
    assert precision.model_precision(_widths(11, 24), "float32") == ("float32", None)

    class Subclassed(tf.keras.Model):
        def call(self, inputs):
            return inputs

    chosen, reason = precision.model_precision(Subclassed(), "auto")
    assert chosen == "float32" and "widths are unknown" in reason


def test_bfloat16_trains_a_twin_and_hands_back_float32_weights(digits, caplog):
    reference, model = _net(), _net()
    model.set_weights(reference.get_weights())
    float_losses = train(reference, digits, _schedule("float32"))
    step_seconds = []
    with caplog.at_level(logging.INFO, logger="pocketflow.training"):
        mixed_losses = train(model, digits, _schedule("bfloat16"), step_seconds=step_seconds)
    assert "runs in float32" not in caplog.text
    assert len(step_seconds) == training_steps(digits, _schedule("bfloat16")) and min(step_seconds) > 0
    # The model handed back is the float32 model it was: same policies, float32 variables.
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    assert all(weight.dtype == tf.float32 for weight in model.weights)
    # It computed in bfloat16 (the losses are not float32's to the last bit) and learned as much.
    assert mixed_losses != float_losses
    assert mixed_losses[-1] < 0.5 * mixed_losses[0]
    assert abs(mixed_losses[-1] - float_losses[-1]) < 0.1 * float_losses[-1] + 0.02
    # And its trained weights, BatchNorm statistics included, are the twin's.
    batchnorm = model.layers[2]
    assert not np.allclose(batchnorm.moving_mean.numpy(), 0.0)
    images = digits.sample_train(64, seed=3)
    np.testing.assert_allclose(model(images, training=False), reference(images, training=False), atol=0.5)


def test_trainings_the_twin_cannot_serve_run_in_float32_and_say_why(digits, caplog):
    hooked, reference = _net(), _net()
    reference.set_weights(hooked.get_weights())
    steps = []
    with caplog.at_level(logging.INFO, logger="pocketflow.training"):
        train(hooked, digits, _schedule("bfloat16"), after_step=lambda: steps.append(1))
    train(reference, digits, _schedule("float32"), after_step=lambda: None)
    assert "runs in float32, not bfloat16: its per-step hook edits the model's own weights" in caplog.text
    for mine, theirs in zip(hooked.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(mine, theirs)  # exactly the float32 training

    class Custom(tf.keras.layers.Layer):
        def call(self, inputs):
            return inputs * 2.0

    inputs = tf.keras.Input((8, 8, 1))
    foreign = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(Custom()(inputs))))
    twin, reason = precision.mixed_twin(foreign, "bfloat16")
    assert twin is None and "layers from outside Keras (Custom)" in reason

    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf.keras.layers.Dense(10)

        def call(self, inputs):
            return self.dense(tf.reshape(inputs, (-1, 64)))

    twin, reason = precision.mixed_twin(Subclassed(), "bfloat16")
    assert twin is None and "subclassed" in reason


def test_float16_scales_the_loss_and_trains(digits):
    model = _net()
    losses = train(model, digits, _schedule("float16"))
    assert losses[-1] < 0.5 * losses[0]
    assert all(weight.dtype == tf.float32 for weight in model.weights)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError):
        from pocketflow.config import build_run_config
        build_run_config({"train": {"precision": "int4"}}, ["full-prec"])
    assert TrainConfig().precision == "auto"


def test_a_distillation_teacher_computes_in_the_trainings_precision(digits):
    from learners.distillation import Distiller

    teacher = _net()
    images = tf.constant(digits.sample_train(32, seed=2))
    exact = Distiller(teacher).teacher_logits(images).numpy()
    np.testing.assert_array_equal(exact, teacher(images, training=False).numpy())
    mixed = Distiller(teacher, precision="bfloat16").with_values(2.0, 0.5)  # a trial's values keep it
    logits = mixed.teacher_logits(images).numpy()
    assert logits.dtype == np.float32 and not np.array_equal(logits, exact)  # bfloat16's rounding ...
    np.testing.assert_allclose(logits, exact, atol=0.05)  # ... of the same teacher
    # auto: the teacher's widths decide (this one's 16 channels are fast in bfloat16; 11 are not).
    assert not np.array_equal(Distiller(teacher, precision="auto").teacher_logits(images).numpy(), exact)
    odd = _widths(11, 32)
    odd_images = tf.constant(np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32))
    np.testing.assert_array_equal(Distiller(odd, precision="auto").teacher_logits(odd_images).numpy(),
                                  odd(odd_images, training=False).numpy())
