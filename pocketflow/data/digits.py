"""The built-in default dataset: scikit-learn's bundled 8x8 digits (1,797 images, no download)."""

from __future__ import annotations

import numpy as np

from pocketflow.config import DataConfig
from pocketflow.data.registry import preprocess_from, register_dataset
from pocketflow.data.base import ArrayDataset

TEST_FRACTION = 0.2  # held-out test split, fixed by the split seed below
SPLIT_SEED = 20240601  # the test split never changes with the run's seed


@register_dataset("digits", default_net="digits_cnn", needs_dir=False,
                  description="scikit-learn's bundled 8x8 digits (built in, no download)")
def load_digits(config: DataConfig, seed: int) -> ArrayDataset:
    """Digits as 8x8x1 images on the 0-255 scale (the raw 0-16 values times 255/16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = (bunch.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(len(labels) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return ArrayDataset("digits", images[train], labels[train], images[test], labels[test],
                        preprocess=preprocess_from(config), validation_split=config.validation_split,
                        seed=seed, num_classes=10)
