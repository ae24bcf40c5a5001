"""Small file helpers shared by the loaders: find the data directory, read (gzipped) bytes,
and turn low-level exceptions into one-line DataErrors."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from pocketflow.config import DataConfig
from pocketflow.errors import DataError


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (TensorFlow's messages span several), cut to ``limit``."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def data_path(config: DataConfig, dataset: str, expected: str) -> Path:
    """``config.dir`` as an existing path, or a DataError that says what the loader wants there."""
    if not config.dir:
        raise DataError(f"{dataset}: no data directory given; pass --data-dir pointing at {expected}")
    path = Path(config.dir).expanduser()
    if not path.exists():
        raise DataError(f"{dataset}: data path '{path}' does not exist; pass --data-dir pointing at {expected}")
    return path


def read_bytes(path: Path, dataset: str) -> bytes:
    """The whole file, gunzipped when its name ends in .gz; a damaged file is a DataError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{dataset}: cannot read '{path}' ({one_line(error)}); the file is truncated or "
                        f"corrupt, download it again") from None
