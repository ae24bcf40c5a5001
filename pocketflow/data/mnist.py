"""MNIST and Fashion-MNIST (60,000 training + 10,000 test images, 28x28x1, 10 classes).

``config.dir`` holds the four canonical idx files, gzipped or not:
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``. The idx header is checked (magic 2051 for images, 2049 for
labels; big-endian counts and sizes) against the bytes that follow it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from pocketflow.config import DataConfig
from pocketflow.data.registry import preprocess_from, register_dataset
from pocketflow.data.base import ArrayDataset, missing_files
from pocketflow.data.files import data_path, read_bytes
from pocketflow.errors import DataError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # idx3 unsigned-byte images, idx1 unsigned-byte labels
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(folder: Path, stem: str, dataset: str) -> Path:
    """``stem.gz`` or ``stem`` in ``folder``."""
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise missing_files(dataset, str(folder), [f"{stem}.gz", stem])


def _header(data: bytes, path: Path, dataset: str, magic: int, dims: int) -> Tuple[int, ...]:
    kind = "images (idx3)" if magic == IMAGES_MAGIC else "labels (idx1)"
    header_bytes = 4 * (1 + dims)
    if len(data) < header_bytes:
        raise DataError(f"{dataset}: '{path}' has only {len(data)} bytes, too short for an idx header; "
                        f"the file is truncated, download it again")
    fields = np.frombuffer(data, ">u4", count=1 + dims)
    if int(fields[0]) != magic:
        raise DataError(f"{dataset}: '{path}' starts with magic number {int(fields[0])} but {kind} files start "
                        f"with {magic}; the file is not an idx {kind.split()[0]} file or is corrupt, use the "
                        f"canonical {path.name.split('.')[0]} file")
    shape = tuple(int(value) for value in fields[1:])
    expected = header_bytes + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{dataset}: '{path}' has {len(data):,} bytes but its header {shape} needs {expected:,}; "
                        f"the file is truncated or corrupt, download it again")
    return shape


def read_idx_images(path: Path, dataset: str) -> np.ndarray:
    """uint8 images (N, rows, cols) from an idx3-ubyte file."""
    data = read_bytes(path, dataset)
    shape = _header(data, path, dataset, IMAGES_MAGIC, 3)
    return np.frombuffer(data, np.uint8, offset=16).reshape(shape)


def read_idx_labels(path: Path, dataset: str) -> np.ndarray:
    """int64 labels (N,) from an idx1-ubyte file."""
    data = read_bytes(path, dataset)
    _header(data, path, dataset, LABELS_MAGIC, 1)
    labels = np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{dataset}: '{path}' has label {labels.max()} but there are {NUM_CLASSES} classes "
                        f"(0..{NUM_CLASSES - 1}); the file is corrupt, download it again")
    return labels


def load_idx_dataset(name: str, config: DataConfig, seed: int) -> ArrayDataset:
    """Read the four idx files from ``config.dir`` into an ArrayDataset of 28x28x1 raw images."""
    folder = data_path(config, name, "the folder with the four *-idx?-ubyte(.gz) files")
    if not folder.is_dir():
        raise DataError(f"{name}: '{folder}' is a file; pass --data-dir pointing at the folder that holds "
                        f"{', '.join(stem + '.gz' for stem in FILES.values())}")
    absent = [stem for stem in FILES.values()
              if not (folder / f"{stem}.gz").is_file() and not (folder / stem).is_file()]
    if len(absent) == len(FILES):
        raise missing_files(name, str(folder), ["the four idx files " + ", ".join(f"{stem}(.gz)" for stem in absent)])
    if absent:
        raise DataError(f"{name}: '{folder}' lacks {', '.join(absent)} (gzipped or not) but has the other idx "
                        f"files; the download is incomplete, fetch the missing file(s) into that folder")
    paths = {key: find_idx_file(folder, stem, name) for key, stem in FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        images = read_idx_images(paths[f"{split}_images"], name)
        labels = read_idx_labels(paths[f"{split}_labels"], name)
        if len(images) != len(labels):
            raise DataError(f"{name}: '{paths[f'{split}_images']}' has {len(images):,} images but "
                            f"'{paths[f'{split}_labels']}' has {len(labels):,} labels; the files come from "
                            f"different downloads or are corrupt, download both again")
        arrays[split] = (images[..., None], labels)
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return ArrayDataset(name, x_train, y_train, x_test, y_test, preprocess=preprocess_from(config),
                        validation_split=config.validation_split, seed=seed, num_classes=NUM_CLASSES)


@register_dataset("mnist", default_net="lenet", needs_dir=True,
                  description="MNIST handwritten digits from the four idx files (gzipped or not) in --data-dir")
def load_mnist(config: DataConfig, seed: int) -> ArrayDataset:
    return load_idx_dataset("mnist", config, seed)


@register_dataset("fashion-mnist", default_net="lenet", needs_dir=True,
                  description="Fashion-MNIST from the four idx files (gzipped or not) in --data-dir")
def load_fashion_mnist(config: DataConfig, seed: int) -> ArrayDataset:
    return load_idx_dataset("fashion-mnist", config, seed)
