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


def cache_key(net: NetSpec, data: DataConfig, schedule: TrainSchedule, seed: int, world_size: int = 1) -> str:
    identity = {"net": net.name, "options": net.options, "data": asdict(data), "schedule": asdict(schedule),
                "seed": seed, "tensorflow": tf.__version__}
    if world_size > 1:  # more workers: larger global batch, scaled learning rate, another result
        identity["world_size"] = world_size
    identity["data"].pop("dir", None)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{net.name}-{data.name}-{digest}"


def load_baseline(model_path: str, dataset: Dataset, trust: bool = False) -> tf.keras.Model:
    model = load_user_model(model_path, trust=trust)
    check_input_shape(model, dataset.input_shape, dataset.num_classes, model_path, labels_from=dataset.labels_from)
    return model


# From-scratch trainings at least this long (epochs x training images) get a warning first: the
# default digits net (30 epochs x 1,294 images) is about 39,000; ResNet-20 on CIFAR-10 (30 x 45,000) 1,350,000.
FROM_SCRATCH_WARNING_IMAGES = 200_000


def train_baseline(net: NetSpec, data_config: DataConfig, dataset: Dataset, schedule: TrainSchedule, *,
                   seed: int, distributed: SingleProcess, use_cache: bool) -> Tuple[tf.keras.Model, str]:
    """Build ``net`` and train it for ``schedule.epochs``; returns the model and where it came from.

    Under Horovod the chief decides whether the cache is used (other ranks, perhaps on other
    machines, may not see the file) and the other ranks receive its weights, so every rank
    starts the search from the same baseline.
    """
    cached = cache_directory() / f"{cache_key(net, data_config, schedule, seed, distributed.size)}.keras"
    cache_hit = use_cache and schedule.epochs > 0 and distributed.is_chief and cached.exists()
    if distributed.broadcast_object(cache_hit):
        log.info("baseline: using the cached %s trained for %s epochs (%s)", net.name, schedule.epochs, cached)
        if distributed.is_chief:
            model = tf.keras.models.load_model(cached, compile=False)
        else:
            model = net.make(dataset.input_shape, dataset.num_classes)
        distributed.broadcast_variables(model.variables)
        return model, f"cache:{cached}"
    tf.keras.utils.set_random_seed(seed)
    model = net.make(dataset.input_shape, dataset.num_classes)
    if schedule.epochs <= 0:
        return model, "untrained"
    log.info("baseline: training %s on %s for %s epochs", net.name, dataset.name, schedule.epochs)
    images = schedule.epochs * dataset.num_train
    if images >= FROM_SCRATCH_WARNING_IMAGES and distributed.is_chief:
        log.warning("training %s from scratch: %s epochs over %s images (%s image passes), which takes long on a "
                    "CPU; the progress lines give the time left. To compress a model you already trained, pass --model FILE; for a quicker, weaker "
                    "baseline pass --epochs N", net.name, f"{schedule.epochs:g}", f"{dataset.num_train:,}",
                    f"{images:,.0f}")
    train(model, dataset, schedule, distributed=distributed, seed=seed, description="baseline")
    if distributed.is_chief:
        try:
            save_model(model, cached)
        except OSError as error:  # a read-only home must not fail the run
            log.warning("baseline cache not written (%s)", error)
    return model, "trained"
