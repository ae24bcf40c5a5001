"""A user's own image classification data as one NumPy ``.npz`` file.

``config.dir`` is the .npz file, or a folder that holds ``data.npz`` or exactly one .npz.
Required arrays: ``x_train``, ``y_train``, ``x_test``, ``y_test``. Images are (N, H, W) or
(N, H, W, C) on the 0-255 scale (set data.scale otherwise); labels are class indices (N,) or
(N, 1), or one-hot / probability rows (N, K), which become indices by argmax (K classes).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from pocketflow.config import DataConfig
from pocketflow.data.registry import preprocess_from, register_dataset
from pocketflow.data.base import ArrayDataset, missing_files
from pocketflow.data.files import data_path, one_line
from pocketflow.errors import DataError

log = logging.getLogger(__name__)

NAME = "npz"
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
DEFAULT_FILE = "data.npz"


def find_npz(path: Path) -> Path:
    """The .npz file itself, ``data.npz`` in the folder, or the folder's only .npz."""
    if path.is_file():
        return path
    if (path / DEFAULT_FILE).is_file():
        return path / DEFAULT_FILE
    found = sorted(path.glob("*.npz"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise missing_files(NAME, str(path), [DEFAULT_FILE, "one *.npz file"])
    raise DataError(f"{NAME}: '{path}' holds {len(found)} .npz files ({', '.join(p.name for p in found)}) "
                    f"and no {DEFAULT_FILE}; pass --data-dir pointing at the one .npz file to use")


def _labels(raw: np.ndarray, key: str, source: Path) -> Tuple[np.ndarray, Optional[int]]:
    """Class indices (N,) int64, and the class count when the labels were one-hot rows."""
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim == 2:
        if not np.issubdtype(raw.dtype, np.number) or raw.shape[1] < 2:
            raise DataError(f"{NAME}: '{source}' {key} has shape {raw.shape} and dtype {raw.dtype}; give class "
                            f"indices (N,) or one-hot rows (N, classes)")
        broken = ~np.isfinite(raw).all(axis=1)
        if broken.any():
            raise DataError(f"{NAME}: '{source}' {key} holds {int(broken.sum()):,} one-hot row(s) with NaN or "
                            f"infinite values; fix or drop those examples")
        return np.argmax(raw, axis=1).astype(np.int64), int(raw.shape[1])
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.number):
        raise DataError(f"{NAME}: '{source}' {key} has shape {raw.shape} and dtype {raw.dtype}; give class "
                        f"indices (N,), (N, 1) or one-hot rows (N, classes)")
    with np.errstate(invalid="ignore"):
        labels = raw.astype(np.int64)
        bad = (labels != raw) | (labels < 0) | ~np.isfinite(raw)
    if bad.any():
        raise DataError(f"{NAME}: '{source}' {key} holds {int(bad.sum()):,} label(s) that are not class indices "
                        f"(the first: {raw[bad][0].item()!r}); labels must be integers >= 0 (or one-hot rows): fix or "
                        f"drop those examples")
    return labels, None


def _images(raw: np.ndarray, key: str, source: Path) -> np.ndarray:
    if raw.ndim not in (3, 4) or not (np.issubdtype(raw.dtype, np.number) or raw.dtype == bool):
        raise DataError(f"{NAME}: '{source}' {key} has shape {raw.shape} and dtype {raw.dtype}; give numeric "
                        f"images (N, H, W) or (N, H, W, C)")
    if np.issubdtype(raw.dtype, np.floating):
        finite = np.isfinite(raw)
        if not finite.all():
            images = int((~finite).reshape(len(raw), -1).any(axis=1).sum())
            raise DataError(f"{NAME}: '{source}' {key} holds {int((~finite).sum()):,} NaN or infinite value(s) in "
                            f"{images:,} image(s); training on them would diverge: fix or drop those images")
    return raw if raw.ndim == 4 else raw[..., None]


def read_npz(file: Path) -> Dict[str, np.ndarray]:
    """The four required arrays of ``file``; a DataError names missing keys and the keys found."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            keys = list(archive.files)
            absent = [key for key in REQUIRED_KEYS if key not in keys]
            if absent:
                raise DataError(f"{NAME}: '{file}' lacks {', '.join(absent)} (it has: {', '.join(keys) or 'nothing'});"
                                f" save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            return {key: archive[key] for key in REQUIRED_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{NAME}: cannot read '{file}' as an .npz of plain arrays ({one_line(error, 120)}); save "
                        f"it with np.savez (no object arrays) and check it is not truncated") from None


@register_dataset(NAME, default_net=None, needs_dir=True,
                  description="your own images in one .npz (x_train, y_train, x_test, y_test) via --data-dir")
def load_npz(config: DataConfig, seed: int) -> ArrayDataset:
    """Images as stored (assumed 0-255 unless data.scale says otherwise); labels as indices."""
    file = find_npz(data_path(config, NAME, "an .npz file with x_train, y_train, x_test, y_test"))
    arrays = read_npz(file)
    x_train, x_test = (_images(arrays[key], key, file) for key in ("x_train", "x_test"))
    (y_train, train_classes), (y_test, test_classes) = (_labels(arrays[key], key, file)
                                                        for key in ("y_train", "y_test"))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{NAME}: '{file}' x_train images are {x_train.shape[1:]} but x_test images are "
                        f"{x_test.shape[1:]}; both splits need one image shape")
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(images) != len(labels):
            raise DataError(f"{NAME}: '{file}' has {len(images)} x_{split} images but {len(labels)} y_{split} "
                            f"labels; the counts must match")
    if train_classes is not None and test_classes is not None and train_classes != test_classes:
        raise DataError(f"{NAME}: '{file}' y_train is one-hot over {train_classes} classes but y_test over "
                        f"{test_classes}; both must use the same classes")
    num_classes = max(train_classes or 0, test_classes or 0, int(max(y_train.max(initial=0),
                                                                     y_test.max(initial=0))) + 1)
    if np.issubdtype(x_train.dtype, np.floating) and x_train.size and float(x_train.max()) <= 1.0 \
            and abs(config.scale - 1.0 / 255.0) < 1e-12:
        log.warning("npz: '%s' images lie in [0, 1] but data.scale is 1/255 (it expects 0-255 pixels); "
                    "set data.scale: 1.0 if they are already scaled", file)
    return ArrayDataset(NAME, x_train, y_train, x_test, y_test, preprocess=preprocess_from(config),
                        validation_split=config.validation_split, seed=seed, num_classes=num_classes)
