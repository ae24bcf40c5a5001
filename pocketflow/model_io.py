"""Loading a user's Keras model and saving ours, with clear errors and atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import tensorflow as tf

from pocketflow.errors import DataError


def _safe_mode(enabled: bool):
    """Keras' safe mode for every format: ``load_model(safe_mode=...)`` covers ``.keras`` files only,
    and an ``.h5`` file's Lambda layers would run their stored Python code unasked."""
    try:
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:  # a tf_keras without it: .keras files still get load_model's own safe mode
        return contextlib.nullcontext()
    return SafeModeScope(enabled)


def _needs_unsafe_loading(error: BaseException) -> bool:
    return "safe_mode" in str(error) or "arbitrary code execution" in str(error)


def load_user_model(path: str, trust: bool = False, flag: str = "--model") -> tf.keras.Model:
    """Load ``.h5``, ``.keras`` or a SavedModel directory as a plain Keras model.

    A model file is code: Lambda layers store Python that loading runs. That is refused unless
    ``trust`` (``--trust-model``) says the file comes from a trusted source. ``flag`` is the option
    that named the file, for the error messages.
    """
    location = Path(path)
    if not location.exists():
        raise DataError(f"model '{path}' does not exist; pass a .h5 or .keras file or a SavedModel "
                        f"directory to {flag}")
    if location.is_dir() and not (location / "saved_model.pb").exists():
        raise DataError(f"model '{path}' is a directory without saved_model.pb; pass a SavedModel "
                        f"directory, a .h5 file or a .keras file")
    try:
        with _keras_warnings_silenced(), _safe_mode(not trust):  # e.g. "SavedModel saved prior to TF 2.5"
            model = tf.keras.models.load_model(str(location), compile=False, safe_mode=not trust)
    except Exception as error:  # noqa: BLE001 - any failure here is a bad file from the user
        if _needs_unsafe_loading(error):
            raise DataError(f"model '{path}' holds a Lambda layer with Python code, which loading would run; if "
                            f"the file comes from a source you trust, pass --trust-model") from None
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


SUPPORTED = ("a model with one image input (batch, height, width, channels) and one output of class scores "
             "(batch, classes)")


def check_input_shape(model: tf.keras.Model, input_shape: tuple, num_classes: int, source: str,
                      labels_from: Optional[Callable[[int], Optional[int]]] = None) -> None:
    """The model must take one batch of the dataset's images and predict one vector of its classes."""
    if len(model.inputs) != 1:
        raise DataError(f"model '{source}' has {len(model.inputs)} inputs "
                        f"({', '.join(str(tuple(i.shape)) for i in model.inputs)}); PocketFlow-TF2 compresses "
                        f"{SUPPORTED}")
    if len(model.outputs) != 1:
        raise DataError(f"model '{source}' has {len(model.outputs)} outputs "
                        f"({', '.join(str(tuple(o.shape)) for o in model.outputs)}); PocketFlow-TF2 compresses "
                        f"{SUPPORTED}: export the classification head alone")
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2:
        raise DataError(f"model '{source}' outputs shape {output_shape}, not class scores (batch, classes); "
                        f"PocketFlow-TF2 compresses {SUPPORTED}")
    if not model.inputs[0].dtype.is_floating:
        raise DataError(f"model '{source}' takes {model.inputs[0].dtype.name} inputs; PocketFlow-TF2 feeds float32 "
                        f"images (scaled by data.scale, data.mean, data.std): save the model with a float32 input")
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) != len(input_shape) or any(e is not None and e != a for e, a in zip(expected, input_shape)):
        raise DataError(f"model '{source}' takes inputs of shape {expected} but the dataset's images are "
                        f"{tuple(input_shape)}; pick the matching --dataset (or data.image_size)")
    classes = model.outputs[0].shape[-1]
    if classes is not None and classes != num_classes:
        beyond = labels_from(classes) if labels_from is not None and classes < num_classes else None
        detail = f" ({beyond:,} of its labels are {classes} or more)" if beyond else ""
        raise DataError(f"model '{source}' predicts {classes} classes but the dataset has {num_classes}{detail}; "
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
