"""Dataset registry: name -> loader(DataConfig, seed) -> Dataset.

Loaders register themselves on import; ``DATASETS.get(name)`` raises a clear error for an
unknown name.
"""

from __future__ import annotations

from pocketflow.data.base import ArrayDataset, Dataset, Preprocess
from pocketflow.data.registry import DATASETS, DatasetSpec, load_dataset, preprocess_from, register_dataset

# Loaders register on import.
from pocketflow.data import digits  # noqa: E402,F401
from pocketflow.data import cifar10, imagenet, mnist, npz  # noqa: E402,F401

__all__ = ["DATASETS", "DatasetSpec", "register_dataset", "Dataset", "ArrayDataset", "Preprocess", "load_dataset", "preprocess_from"]
