"""Pick one Keras for the whole process, before anything touches ``tf.keras``.

tensorflow-model-optimization sets TF_USE_LEGACY_KERAS=1 when it is imported, and every
``tf.keras`` lazy loader resolves its Keras package (``keras`` or ``tf_keras``) the first time
it is touched. A process that touches ``tf.keras`` before importing TFMOT therefore ends up
with both packages, and loading a saved model can then loop forever inside Keras. Importing
TFMOT here first makes every loader agree on tf_keras (Keras 2.15), which TFMOT's
quantization and pruning need; files saved this way load in a plain ``tf.keras`` process.
Import ``pocketflow`` before touching ``tf.keras`` in your own scripts.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "tensorflow" not in sys.modules:
    # TensorFlow reads the variable once, at import, for its module paths; a child process
    # inherits it set to 1 from a parent that imported TFMOT. Start from TensorFlow's default
    # so every process ends in the same state, whoever launched it.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)


def _import_quietly() -> None:
    """Import TensorFlow with its native start-up noise on file descriptor 2 filtered out.

    A TensorFlow wheel built with CUDA prints "Unable to register cuDNN/cuFFT/cuBLAS factory"
    at import, on machines with or without a GPU; those lines are dropped so that a user error
    stays one line on stderr. Anything else TensorFlow prints there is passed through.
    """
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (embedded interpreters)
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if "Unable to register" not in line and "TF-TRT Warning" not in line]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


if "tensorflow" not in sys.modules:
    _import_quietly()
import tensorflow  # noqa: E402,F401
import tensorflow_model_optimization  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS=1 on import)
