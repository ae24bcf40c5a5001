"""CIFAR-10 (50,000 training + 10,000 test images, 32x32x3, 10 classes) from its official files.

``config.dir`` may hold any of the layouts Krizhevsky distributes, or be the folder or
tarball itself:

- ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``;
  each record is 1 label byte + 3,072 bytes: the R, G and B planes of 32x32),
- ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``: pickled dicts
  with ``b"data"`` (N, 3072) and ``b"labels"``),
- ``cifar-10-binary.tar.gz`` or ``cifar-10-python.tar.gz``, read in place (no extraction).

Extracted folders are preferred over tarballs (no gunzip). Every batch must hold exactly
10,000 records; anything else is reported as a truncated or corrupt file.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Dict, List, Tuple

import numpy as np

from pocketflow.config import DataConfig
from pocketflow.data.registry import preprocess_from, register_dataset
from pocketflow.data.base import ArrayDataset, missing_files
from pocketflow.data.files import data_path, one_line, read_bytes
from pocketflow.errors import DataError

NAME = "cifar10"
RECORDS_PER_BATCH = 10000  # every official batch holds exactly this many images
SIDE, CHANNELS, NUM_CLASSES = 32, 3, 10
IMAGE_BYTES = SIDE * SIDE * CHANNELS
RECORD_BYTES = 1 + IMAGE_BYTES
TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
TEST_BATCH = "test_batch"
BATCHES = TRAIN_BATCHES + (TEST_BATCH,)
BINARY_DIR, PYTHON_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
BINARY_TAR, PYTHON_TAR = "cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"
EXPECTED = (f"{BINARY_TAR}, {BINARY_DIR}/ or {PYTHON_DIR}/ (https://www.cs.toronto.edu/~kriz/cifar.html)")

Batch = Tuple[np.ndarray, np.ndarray]  # raw uint8 images (N, 32, 32, 3), int64 labels (N,)


@register_dataset(NAME, default_net="resnet20", needs_dir=True,
                  description="CIFAR-10 from cifar-10-binary.tar.gz, cifar-10-batches-bin/ or "
                              "cifar-10-batches-py/ in --data-dir")
def load_cifar10(config: DataConfig, seed: int) -> ArrayDataset:
    """CIFAR-10 as raw 0-255 uint8 images; the validation split is carved from the 50,000."""
    batches = read_cifar10(data_path(config, NAME, EXPECTED))
    x_train = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])
    y_train = np.concatenate([batches[name][1] for name in TRAIN_BATCHES])
    x_test, y_test = batches[TEST_BATCH]
    return ArrayDataset(NAME, x_train, y_train, x_test, y_test, preprocess=preprocess_from(config),
                        validation_split=config.validation_split, seed=seed, num_classes=NUM_CLASSES)


def read_cifar10(path: Path) -> Dict[str, Batch]:
    """The six batches, by name (``data_batch_1`` .. ``test_batch``), from whichever layout ``path`` has."""
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"{NAME}: '{path}' is a file but not a CIFAR-10 tarball ({BINARY_TAR}); pass "
                            f"--data-dir pointing at the tarball or at the folder that holds {EXPECTED}")
        return _read_tar(path)
    for folder in (path / BINARY_DIR, path):
        if any((folder / f"{name}.bin").is_file() for name in BATCHES):
            return _read_folder(folder, binary=True)
    for folder in (path / PYTHON_DIR, path):
        if any((folder / name).is_file() for name in BATCHES):
            return _read_folder(folder, binary=False)
    for tar_name in (BINARY_TAR, PYTHON_TAR):
        if (path / tar_name).is_file():
            return _read_tar(path / tar_name)
    raise missing_files(NAME, str(path), [BINARY_TAR, f"{BINARY_DIR}/{{data_batch_1..5,test_batch}}.bin",
                                          f"{PYTHON_DIR}/{{data_batch_1..5,test_batch}}", PYTHON_TAR])


def _read_folder(folder: Path, *, binary: bool) -> Dict[str, Batch]:
    suffix = ".bin" if binary else ""
    files = {name: folder / f"{name}{suffix}" for name in BATCHES}
    absent = [path.name for path in files.values() if not path.is_file()]
    if absent:
        raise DataError(f"{NAME}: '{folder}' lacks {', '.join(absent)} (it has the other CIFAR-10 batches); "
                        f"the download is incomplete, extract the full archive again")
    parse = _parse_binary if binary else _parse_pickle
    return {name: parse(read_bytes(path, NAME), str(path)) for name, path in files.items()}


def _read_tar(tar_path: Path) -> Dict[str, Batch]:
    """Read the batch members of a CIFAR-10 tarball straight from the (gzipped) stream."""
    wanted = {f"{name}.bin": (name, True) for name in BATCHES}
    wanted.update({name: (name, False) for name in BATCHES})
    found: Dict[bool, Dict[str, Batch]] = {True: {}, False: {}}
    try:
        with tarfile.open(tar_path, "r:*") as archive:
            for member in archive:
                key = PurePosixPath(member.name).name
                if not member.isfile() or key not in wanted:
                    continue
                name, binary = wanted[key]
                handle = archive.extractfile(member)
                assert handle is not None
                source = f"{tar_path}:{member.name}"
                found[binary][name] = (_parse_binary if binary else _parse_pickle)(handle.read(), source)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{NAME}: cannot read the tarball '{tar_path}' ({one_line(error)}); it is truncated "
                        f"or corrupt, download it again") from None
    for binary in (True, False):
        if len(found[binary]) == len(BATCHES):
            return found[binary]
    best = found[True] if len(found[True]) >= len(found[False]) else found[False]
    absent = [name for name in BATCHES if name not in best]
    raise DataError(f"{NAME}: the tarball '{tar_path}' lacks the batches {', '.join(absent)}; it is "
                    f"truncated or not a CIFAR-10 archive, download {BINARY_TAR} again")


def _corrupt(source: str, detail: str) -> DataError:
    return DataError(f"{NAME}: batch '{source}' is truncated or corrupt ({detail}); download CIFAR-10 again")


def _check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _corrupt(source, f"labels range {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def _parse_binary(data: bytes, source: str) -> Batch:
    expected = RECORDS_PER_BATCH * RECORD_BYTES
    if len(data) != expected:
        raise _corrupt(source, f"{len(data):,} bytes, expected {expected:,} = {RECORDS_PER_BATCH:,} records "
                               f"of {RECORD_BYTES} bytes")
    records = np.frombuffer(data, np.uint8).reshape(RECORDS_PER_BATCH, RECORD_BYTES)
    images = records[:, 1:].reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)
    return images, _check_labels(records[:, 0], source)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): no code runs."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"),
               ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
               ("_codecs", "encode")}  # Python 3 writes bytes in protocol 2 through _codecs.encode

    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's signature)
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _parse_pickle(data: bytes, source: str) -> Batch:
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # unpickling raises many types on damaged input
        raise _corrupt(source, f"cannot unpickle: {one_line(error, 120)}") from None
    if not isinstance(batch, dict):
        raise _corrupt(source, f"holds a {type(batch).__name__}, expected a dict with data and labels")
    lookup = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in lookup or "labels" not in lookup:
        raise _corrupt(source, f"keys {sorted(lookup)}, expected data and labels")
    images = np.asarray(lookup["data"])
    labels = np.asarray(lookup["labels"])
    if images.shape != (RECORDS_PER_BATCH, IMAGE_BYTES) or labels.shape != (RECORDS_PER_BATCH,):
        raise _corrupt(source, f"data {images.shape} and labels {labels.shape}, expected "
                               f"({RECORDS_PER_BATCH}, {IMAGE_BYTES}) and ({RECORDS_PER_BATCH},)")
    images = images.astype(np.uint8, copy=False).reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1)
    return images, _check_labels(labels, source)


__all__: List[str] = ["load_cifar10", "read_cifar10", "RECORDS_PER_BATCH"]
