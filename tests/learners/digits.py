"""The small trained baseline the learner tests share: digits_cnn trained briefly on the digits data."""

from __future__ import annotations

from typing import Tuple

import tensorflow as tf

from nets import NETS
from pocketflow.config import DataConfig
from pocketflow.data import load_dataset
from pocketflow.data.base import Dataset
from pocketflow.training import TrainSchedule, train


def trained_digits(epochs: int) -> Tuple[Dataset, tf.keras.Model, TrainSchedule]:
    """(dataset, model, schedule): the same seed every time, so a test module's fixture is reproducible."""
    tf.keras.utils.set_random_seed(0)
    dataset = load_dataset(DataConfig(name="digits"), seed=0)
    model = NETS.get("digits_cnn").make(dataset.input_shape, dataset.num_classes)
    schedule = TrainSchedule(epochs, 32, 0.05, "cosine", "sgd", 5e-4, False)
    train(model, dataset, schedule)
    return dataset, model, schedule
