"""The dataset registry: name -> loader(DataConfig, seed) -> Dataset, and what loaders share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from pocketflow.config import DataConfig
from pocketflow.data.base import Dataset, Preprocess
from pocketflow.registry import Registry

Loader = Callable[[DataConfig, int], Dataset]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Loader
    default_net: Optional[str]  # None: the user must name a net or a model
    needs_dir: bool = True
    description: str = ""


DATASETS: Registry[DatasetSpec] = Registry("dataset", flag="--dataset")


def register_dataset(name: str, default_net: Optional[str], needs_dir: bool = True,
                     description: str = "") -> Callable[[Loader], Loader]:
    def decorate(load: Loader) -> Loader:
        DATASETS.add(name, DatasetSpec(name, load, default_net, needs_dir, description))
        return load

    return decorate


def preprocess_from(config: DataConfig) -> Preprocess:
    return Preprocess(scale=config.scale, mean=config.mean, std=config.std)


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    """Load the dataset named in ``config`` (its name must be resolved already)."""
    assert config.name is not None, "resolve the dataset name before loading"
    return DATASETS.get(config.name).load(config, seed)
