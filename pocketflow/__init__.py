"""PocketFlow-TF2: automated model compression for TensorFlow 2 / Keras."""

__version__ = "0.1.0"
