"""Shared test fixtures: fixed seeds, quiet TensorFlow, tiny models, paths to ../shared/data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT_FOR_IMPORTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT_FOR_IMPORTS))
import pocketflow  # noqa: E402,F401  (picks the process's Keras before any test touches tf.keras)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seeds(tmp_path, monkeypatch):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(1234)
    monkeypatch.setenv("POCKETFLOW_CACHE_DIR", str(tmp_path / "cache"))
    yield
    tf.keras.backend.clear_session()


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with a message when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
