"""PocketFlow-TF2: automated model compression for TensorFlow 2 / Keras."""

from pocketflow import keras_setup  # noqa: F401  (TensorFlow's environment, before it is imported; no TF import)

__version__ = "0.1.0"
