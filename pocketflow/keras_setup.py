"""TensorFlow's environment for the whole process, set before TensorFlow reads it.

One Keras: tf-keras (Keras 2), which TFMOT's quantization and pruning and Horovod 0.28 need.
TensorFlow reads ``TF_USE_LEGACY_KERAS`` when it is imported (for the module paths behind
``from tensorflow.keras import layers``) and ``tf.keras``'s lazy loader reads it the first time it
is touched; setting it here, before either, gives every process the same Keras whoever launched it
(before, TFMOT set it on import, and ``from tensorflow.keras import ...`` still reached Keras 3).
Importing this module does not import TensorFlow, so ``import pocketflow.config`` stays light;
``start_quietly()`` imports it (the CLI calls it before its first TensorFlow import).
Import ``pocketflow`` before touching ``tf.keras`` in your own scripts.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's x86 wheel leaves oneDNN off unless asked. With it on, a ResNet-20 training step
# (batch 128, 2 cores) took 609-610 ms against 1,068-1,138 ms off, interleaved in one sitting
# (`python scripts/time_training_step.py --model RESNET20.h5`). A user who sets the variable keeps it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ["TF_USE_LEGACY_KERAS"] = "1"


# What TensorFlow prints on file descriptor 2 while it starts, on every machine: CUDA probing on
# a CUDA build without a GPU, absl's preamble, the CPU-feature notice. Nothing a user can act on.
_START_UP_NOISE = ("Unable to register", "TF-TRT Warning", "All log messages before absl::InitializeLog",
                   "cudart_stub.cc", "cuda_platform.cc", "failed call to cuInit", "cuda_executor.cc",
                   "cpu_feature_guard.cc", "To enable the following instructions",
                   "oneDNN custom operations are on")


def start_quietly() -> None:
    """Import TensorFlow and let it probe its devices, with the start-up noise on file descriptor 2
    filtered out, so that a user error stays one line on stderr. Anything else printed there
    meanwhile is passed through. Does nothing once TensorFlow is imported."""
    if "tensorflow" in sys.modules:
        return
    import tempfile

    def start() -> None:
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA's probe prints here, not at import

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters)
        start()
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            start()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in line for noise in _START_UP_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
