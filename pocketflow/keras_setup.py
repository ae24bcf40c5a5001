"""Pick one Keras for the whole process, before anything touches ``tf.keras``.

tensorflow-model-optimization sets TF_USE_LEGACY_KERAS=1 when it is imported, and every
``tf.keras`` lazy loader resolves its Keras package (``keras`` or ``tf_keras``) the first time
it is touched. A process that touches ``tf.keras`` before importing TFMOT therefore ends up
with both packages, and loading a saved model can then loop forever inside Keras. Importing
TFMOT here first makes every loader agree on tf_keras (Keras 2), which TFMOT's
quantization and pruning need, and Horovod 0.28 needs (it fails on Keras 3 variables).
Import ``pocketflow`` before touching ``tf.keras`` in your own scripts.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's x86 wheel leaves oneDNN off unless asked. With it on, a ResNet-20 training step
# (batch 128, 2 cores) took 609-610 ms against 1,068-1,138 ms off, interleaved in one sitting
# (`python scripts/time_training_step.py --model RESNET20.h5`). A user who sets the variable keeps it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
if "tensorflow" not in sys.modules:
    # TensorFlow reads the variable once, at import, for its module paths; a child process
    # inherits it set to 1 from a parent that imported TFMOT. Start from TensorFlow's default
    # so every process ends in the same state, whoever launched it.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)


# What TensorFlow prints on file descriptor 2 while it starts, on every machine: CUDA probing on
# a CUDA build without a GPU, absl's preamble, the CPU-feature notice. Nothing a user can act on.
_START_UP_NOISE = ("Unable to register", "TF-TRT Warning", "All log messages before absl::InitializeLog",
                   "cudart_stub.cc", "cuda_platform.cc", "failed call to cuInit", "cuda_executor.cc",
                   "cpu_feature_guard.cc", "To enable the following instructions",
                   "oneDNN custom operations are on")


def _start_quietly() -> None:
    """Import TensorFlow and TFMOT, and let TensorFlow probe its devices, with the start-up noise
    on file descriptor 2 filtered out, so that a user error stays one line on stderr. Anything
    else printed there meanwhile is passed through."""
    import tempfile

    def start() -> None:
        import tensorflow as tf
        import tensorflow_model_optimization  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 on import)

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


if "tensorflow_model_optimization" not in sys.modules:
    _start_quietly()
import tensorflow  # noqa: E402,F401
import tensorflow_model_optimization  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS=1 on import)
