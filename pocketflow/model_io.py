"""Loading a user's Keras model and saving ours, with clear errors and atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import tensorflow as tf

from pocketflow.errors import DataError


def load_user_model(path: str) -> tf.keras.Model:
    """Load ``.h5``, ``.keras`` or a SavedModel directory as a plain Keras model."""
    location = Path(path)
    if not location.exists():
        raise DataError(f"model '{path}' does not exist; pass a .h5 or .keras file or a SavedModel "
                        f"directory to --model")
    if location.is_dir() and not (location / "saved_model.pb").exists():
        raise DataError(f"model '{path}' is a directory without saved_model.pb; pass a SavedModel "
                        f"directory, a .h5 file or a .keras file")
    try:
        with _keras_warnings_silenced():  # e.g. "SavedModel saved prior to TF 2.5": our own error says more
            model = tf.keras.models.load_model(str(location), compile=False)
    except Exception as error:  # noqa: BLE001 - any failure here is a bad file from the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"model '{path}' could not be loaded ({reason[:200]}); check that it is a "
                        f"complete Keras model saved with model.save()") from None
    if not isinstance(model, tf.keras.Model) or not getattr(model, "inputs", None):
        raise DataError(f"model '{path}' loaded, but it is not a Keras model with known inputs "
                        f"(a bare SavedModel from tf.saved_model.save?); save it with model.save()")
    return model


@contextlib.contextmanager
def _keras_warnings_silenced() -> Iterator[None]:
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_input_shape(model: tf.keras.Model, input_shape: tuple, num_classes: int, source: str) -> None:
    """The model must take the dataset's images and predict its classes."""
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) != len(input_shape) or any(e is not None and e != a for e, a in zip(expected, input_shape)):
        raise DataError(f"model '{source}' takes inputs of shape {expected} but the dataset's images are "
                        f"{tuple(input_shape)}; pick the matching --dataset (or data.image_size)")
    classes = model.outputs[0].shape[-1]
    if classes is not None and classes != num_classes:
        raise DataError(f"model '{source}' predicts {classes} classes but the dataset has {num_classes}; "
                        f"pick the matching --dataset")


def save_model(model: tf.keras.Model, path: Path) -> Path:
    """Save as a Keras file loadable with ``tf.keras.models.load_model(path, compile=False)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(dir=path.parent, prefix=".saving-")
    try:
        temporary = Path(directory) / path.name
        model.save(temporary, include_optimizer=False) if path.suffix == ".h5" else model.save(temporary)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return path
