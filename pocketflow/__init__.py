"""PocketFlow-TF2: automated model compression for TensorFlow 2 / Keras."""

from pocketflow import keras_setup  # noqa: F401  (must run before anything touches tf.keras)

__version__ = "0.1.0"
