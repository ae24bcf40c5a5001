"""README's load lines, run in a fresh process the way a user runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

# README's load line for a model.keras file, in the user's own process (no pocketflow import).
LOAD_LINE = "import tf_keras; model = tf_keras.models.load_model(PATH, compile=False)"


def _outputs_in_fresh_process(code: str, path: str, images: np.ndarray, tmp: Path) -> subprocess.CompletedProcess:
    np.save(tmp / "images.npy", images)
    script = (f"import numpy as np\nPATH = {str(path)!r}\n{code}\n"
              f"np.save({str(tmp / 'outputs.npy')!r}, model.predict(np.load({str(tmp / 'images.npy')!r}), verbose=0))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"})


def check_load_line(path: str, model: tf.keras.Model, plain_tf_keras: bool = False) -> None:
    """README's load line gives identical outputs in a fresh process; with ``plain_tf_keras``, a plain
    ``tf.keras`` process (Keras 3 on TF >= 2.16) also loads identical outputs or refuses the file
    loudly, never loads other weights (one file format for every learner: checked once)."""
    tmp = Path(tempfile.mkdtemp(prefix="load-check-"))
    images = np.random.default_rng(0).random((4, *model.inputs[0].shape[1:])).astype(np.float32)
    expected = model.predict(images, verbose=0)
    loaded = _outputs_in_fresh_process(LOAD_LINE, path, images, tmp)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp / "outputs.npy"), expected, rtol=1e-5, atol=1e-5)
    (tmp / "outputs.npy").unlink()
    if not plain_tf_keras:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    plain = _outputs_in_fresh_process("import tensorflow as tf; model = tf.keras.models.load_model(PATH, compile=False)",
                                      path, images, tmp)
    if plain.returncode == 0:  # a Keras that can read it must read the same weights
        np.testing.assert_allclose(np.load(tmp / "outputs.npy"), expected, rtol=1e-5, atol=1e-5)
    else:
        assert "Error" in plain.stderr
    shutil.rmtree(tmp, ignore_errors=True)
