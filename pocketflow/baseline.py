"""The uncompressed starting point: a user's model, a cached trained net, or a freshly trained one.

Training a built-in net is cached (keyed by everything that changes the result), so a
compression run on the default does not retrain the baseline every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Tuple

import tensorflow as tf

from nets import NetSpec
from pocketflow.config import DataConfig
from pocketflow.data.base import Dataset
from pocketflow.distributed import SingleProcess
from pocketflow.model_io import check_input_shape, load_user_model, save_model
from pocketflow.training import TrainSchedule, train

log = logging.getLogger(__name__)


def cache_directory() -> Path:
    return Path(os.environ.get("POCKETFLOW_CACHE_DIR", Path.home() / ".cache" / "pocketflow-tf2"))


def cache_key(net: NetSpec, data: DataConfig, schedule: TrainSchedule, seed: int) -> str:
    identity = {"net": net.name, "options": net.options, "data": asdict(data), "schedule": asdict(schedule),
                "seed": seed, "tensorflow": tf.__version__}
    identity["data"].pop("dir", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{net.name}-{data.name}-{digest}"


def load_baseline(model_path: str, dataset: Dataset) -> tf.keras.Model:
    model = load_user_model(model_path)
    check_input_shape(model, dataset.input_shape, dataset.num_classes, model_path)
    return model


def train_baseline(net: NetSpec, data_config: DataConfig, dataset: Dataset, schedule: TrainSchedule, *,
                   seed: int, distributed: SingleProcess, use_cache: bool) -> Tuple[tf.keras.Model, str]:
    """Build ``net`` and train it for ``schedule.epochs``; returns the model and where it came from."""
    cached = cache_directory() / f"{cache_key(net, data_config, schedule, seed)}.keras"
    if use_cache and schedule.epochs > 0 and cached.exists():
        log.info("baseline: using the cached %s trained for %s epochs (%s)", net.name, schedule.epochs, cached)
        return tf.keras.models.load_model(cached, compile=False), f"cache:{cached}"
    tf.keras.utils.set_random_seed(seed)
    model = net.make(dataset.input_shape, dataset.num_classes)
    if schedule.epochs <= 0:
        return model, "untrained"
    log.info("baseline: training %s on %s for %s epochs", net.name, dataset.name, schedule.epochs)
    train(model, dataset, schedule, distributed=distributed, seed=seed, description="baseline")
    if distributed.is_chief:
        try:
            save_model(model, cached)
        except OSError as error:  # a read-only home must not fail the run
            log.warning("baseline cache not written (%s)", error)
    return model, "trained"
