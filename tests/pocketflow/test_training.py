"""Shared training helpers: the BatchNorm rule after a training, and the evaluation pass."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import tensorflow as tf

from pocketflow.config import DataConfig
from pocketflow.data import load_dataset
from pocketflow.training import TrainSchedule, inference_function, predict_logits, settle_batchnorm, training_steps


def _net() -> tf.keras.Model:
    inputs = tf.keras.Input((8, 8, 1))
    x = tf.keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = tf.keras.layers.BatchNormalization(momentum=0.99)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.ReLU()(x))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x))


def test_stale_statistics_are_re_estimated_and_settled_ones_are_kept():
    digits = load_dataset(DataConfig(name="digits"), seed=0)
    schedule = TrainSchedule(epochs=1.0, batch_size=64, learning_rate=0.01, schedule="cosine", optimizer="sgd",
                             weight_decay=0.0, augment=False)
    model = _net()
    batchnorm = model.layers[2]
    assert 0.99 ** training_steps(digits, schedule) > 0.05  # one epoch: 20 steps, 82% of the old values left
    before = batchnorm.moving_mean.numpy().copy()  # the initial zeros: stale for any data
    assert settle_batchnorm(model, digits, schedule) == 20
    assert not np.allclose(batchnorm.moving_mean.numpy(), before)

    long_schedule = schedule.with_epochs(20.0)  # 400 steps: 1.8% left, the statistics have settled
    settled = batchnorm.moving_mean.numpy().copy()
    assert settle_batchnorm(model, digits, long_schedule) == 0
    np.testing.assert_array_equal(batchnorm.moving_mean.numpy(), settled)
    assert settle_batchnorm(tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Flatten()]),
                            digits, schedule) == 0  # nothing to settle


def test_evaluation_traces_once_per_model_for_any_batch_size_and_keeps_no_model_alive():
    model = _net()
    images = np.random.default_rng(0).random((150, 8, 8, 1), dtype=np.float32)
    labels = np.arange(150) % 10
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(64)  # 64, 64 and a last 22
    outputs, seen = predict_logits(model, batches)
    np.testing.assert_allclose(outputs, model.predict(images, verbose=0), atol=1e-5)
    np.testing.assert_array_equal(seen, labels)
    function = inference_function(model)
    assert function is inference_function(model)
    assert function.experimental_get_tracing_count() == 1  # Keras's predict function traces twice here

    watched = weakref.ref(model)
    del model, function
    gc.collect()
    assert watched() is None  # a search's discarded candidates are freed
