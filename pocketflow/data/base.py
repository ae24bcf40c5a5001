"""The dataset interface every loader returns, and the in-memory implementation.

Loaders deliver *raw* pixels (0-255 scale, NHWC) and integer labels; preprocessing
(scale, then per-channel mean/std) is applied here, the same way for training,
evaluation, calibration and TFLite evaluation, so a user's model sees what it was
trained on. The validation split is carved from the training data with the run's seed
and is what the search chooses on; the test split is only ever used for the final
measurement.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pocketflow.errors import ConfigError, DataError


@dataclass(frozen=True)
class Preprocess:
    """x -> (x * scale - mean) / std, per channel."""

    scale: float = 1.0 / 255.0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def check_channels(self, channels: int) -> None:
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise ConfigError(f"data.{name} has {len(values)} entries but the images have "
                                  f"{channels} channel(s); give 1 or {channels} values")

    def numpy(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) * np.float32(self.scale)
        if self.mean is not None:
            x -= np.asarray(self.mean, np.float32)
        if self.std is not None:
            x /= np.asarray(self.std, np.float32)
        return x

    def tensor(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32) * self.scale
        if self.mean is not None:
            x -= tf.constant(self.mean, tf.float32)
        if self.std is not None:
            x /= tf.constant(self.std, tf.float32)
        return x


def augment_crop_flip(image: tf.Tensor, padding: int = 4) -> tf.Tensor:
    """Standard CIFAR augmentation: pad, random crop back to size, random horizontal flip."""
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
    cropped = tf.image.random_crop(padded, shape)
    return tf.image.random_flip_left_right(cropped)


class Dataset(abc.ABC):
    """Train / validation / test splits as tf.data pipelines of (preprocessed image, label)."""

    name: str
    input_shape: Tuple[int, int, int]
    num_classes: int

    @property
    @abc.abstractmethod
    def num_train(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_validation(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_test(self) -> int: ...

    @abc.abstractmethod
    def train(self, batch_size: int, *, shuffle: bool = True, augment: bool = False, seed: int = 0,
              shard: Tuple[int, int] = (0, 1), repeat: bool = False) -> tf.data.Dataset:
        """Training split (without the validation examples); ``shard=(rank, size)`` for Horovod."""

    @abc.abstractmethod
    def validation(self, batch_size: int) -> tf.data.Dataset:
        """The held-out part of the training data the search chooses on."""

    @abc.abstractmethod
    def test(self, batch_size: int) -> tf.data.Dataset:
        """The test split: only for final measurement, never for choosing."""

    @abc.abstractmethod
    def sample_train(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` preprocessed training images (calibration, feature-map sampling)."""

    def labels_from(self, classes: int) -> Optional[int]:
        """How many labels (all splits) are ``classes`` or more; None where the loader cannot count."""
        return None

    def test_arrays(self, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Preprocessed test images and labels as arrays (used by the TFLite evaluator)."""
        xs, ys, seen = [], [], 0
        for x, y in self.test(256):
            xs.append(x.numpy())
            ys.append(y.numpy())
            seen += len(y)
            if limit is not None and seen >= limit:
                break
        x_all, y_all = np.concatenate(xs), np.concatenate(ys)
        return (x_all[:limit], y_all[:limit]) if limit else (x_all, y_all)


class ArrayDataset(Dataset):
    """A dataset held in memory as raw uint8/float arrays (digits, MNIST, CIFAR-10, npz)."""

    def __init__(self, name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, *, preprocess: Preprocess, validation_split: float, seed: int,
                 num_classes: Optional[int] = None) -> None:
        x_train, x_test = _as_nhwc(x_train), _as_nhwc(x_test)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise ConfigError(f"{name}: training images are {x_train.shape[1:]} but test images are "
                              f"{x_test.shape[1:]}; both splits must have one image shape")
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ConfigError(f"{name}: {len(x_train)} training images but {len(y_train)} labels "
                              f"(test: {len(x_test)} vs {len(y_test)}); counts must match")
        preprocess.check_channels(x_train.shape[-1])
        self.name = name
        self.input_shape = tuple(int(d) for d in x_train.shape[1:])  # type: ignore[assignment]
        labels = np.concatenate([np.ravel(y_train), np.ravel(y_test)]).astype(np.int64)
        self.num_classes = int(num_classes or labels.max() + 1)
        outside = int(((labels < 0) | (labels >= self.num_classes)).sum())
        if outside:
            raise DataError(f"{name}: {outside:,} label(s) lie outside the {self.num_classes} classes "
                            f"0..{self.num_classes - 1}; fix or drop those examples")
        self.preprocess = preprocess
        order = np.random.default_rng(seed).permutation(len(x_train))
        n_val = max(1, int(round(len(x_train) * validation_split)))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        y_train = np.ravel(y_train).astype(np.int64)
        self._x_train, self._y_train = x_train[train_idx], y_train[train_idx]
        self._x_val, self._y_val = x_train[val_idx], y_train[val_idx]
        self._x_test, self._y_test = x_test, np.ravel(y_test).astype(np.int64)

    def labels_from(self, classes: int) -> Optional[int]:
        return int(sum((labels >= classes).sum() for labels in (self._y_train, self._y_val, self._y_test)))

    @property
    def num_train(self) -> int:
        return len(self._y_train)

    @property
    def num_validation(self) -> int:
        return len(self._y_val)

    @property
    def num_test(self) -> int:
        return len(self._y_test)

    def _pipeline(self, x: np.ndarray, y: np.ndarray, batch_size: int, *,
                  map_fn: Optional[Callable] = None) -> tf.data.Dataset:
        data = tf.data.Dataset.from_tensor_slices((x, y))
        if map_fn is not None:
            data = data.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
        data = data.batch(batch_size)
        return data.map(lambda a, b: (self.preprocess.tensor(a), b),
                        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def train(self, batch_size: int, *, shuffle: bool = True, augment: bool = False, seed: int = 0,
              shard: Tuple[int, int] = (0, 1), repeat: bool = False) -> tf.data.Dataset:
        index, count = shard
        x, y = self._x_train[index::count], self._y_train[index::count]
        data = tf.data.Dataset.from_tensor_slices((x, y))
        if repeat:
            data = data.repeat()
        if shuffle:
            data = data.shuffle(min(len(y), 20000), seed=seed, reshuffle_each_iteration=True)
        if augment:
            data = data.map(lambda a, b: (augment_crop_flip(tf.cast(a, tf.float32)), b),
                            num_parallel_calls=tf.data.AUTOTUNE)
        data = data.batch(batch_size, drop_remainder=repeat)
        return data.map(lambda a, b: (self.preprocess.tensor(a), b),
                        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def validation(self, batch_size: int) -> tf.data.Dataset:
        return self._pipeline(self._x_val, self._y_val, batch_size)

    def test(self, batch_size: int) -> tf.data.Dataset:
        return self._pipeline(self._x_test, self._y_test, batch_size)

    def sample_train(self, count: int, seed: int = 0) -> np.ndarray:
        count = min(count, self.num_train)
        pick = np.random.default_rng(seed).choice(self.num_train, size=count, replace=False)
        return self.preprocess.numpy(self._x_train[np.sort(pick)])

    def validation_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.preprocess.numpy(self._x_val), self._y_val

    def test_arrays(self, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        x, y = self._x_test[:limit], self._y_test[:limit]
        return self.preprocess.numpy(x), y


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """Accept (N, H, W) grey images or (N, H, W, C)."""
    images = np.asarray(images)
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"images must be (N, H, W) or (N, H, W, C); got shape {images.shape}")
    return images


def missing_files(description: str, directory: str, candidates: Sequence[str]) -> "DataError":
    """The error for a data directory that lacks the expected files; it names what was looked for."""
    return DataError(f"{description}: looked in '{directory}' for {' or '.join(candidates)} and found "
                     f"none; point --data-dir at the folder that holds them")
