"""The small trained baseline the learner tests share: digits_cnn trained briefly on the digits data."""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from pocketflow.training import recalibrate_batchnorm
from nets import NETS
from pocketflow.config import DataConfig
from pocketflow.data import load_dataset
from pocketflow.data.base import Dataset
from pocketflow.training import TrainSchedule, train


def trained_digits(epochs: int) -> Tuple[Dataset, tf.keras.Model, TrainSchedule]:
    """(dataset, model, schedule): the same seed every time, so a test module's fixture is reproducible.

    A few epochs leave BatchNorm's moving statistics (momentum 0.99) far from the data: after 4
    epochs the model scores 10% in inference mode while its training batches are mostly right. The
    statistics are re-estimated afterwards, so the baseline (and a teacher made from it) is what a
    longer training would give, and tests that compare with it compare with a real baseline."""
    tf.keras.utils.set_random_seed(0)
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = NETS.get("digits_cnn").make(dataset.input_shape, dataset.num_classes)
    schedule = TrainSchedule(epochs, 32, 0.05, "cosine", "sgd", 5e-4, False)
    train(model, dataset, schedule)
    recalibrate_batchnorm(model, dataset, batches=20, batch_size=32)
    return dataset, model, schedule
