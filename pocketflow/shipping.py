"""``ship/``: the one place in a run directory that holds what to deploy, and how to load it.

Whatever the learner, ``ship/`` holds the shipped file, the TFLite file a runtime loads (the same
file, or the one rebuilt from a compact format), ``predict.py`` (raw images in, class scores out,
with the run's preprocessing; numpy and LiteRT only) and ``README.md`` (what the files are, the
figures measured on them, the load lines). The tests run ``predict.py`` in a fresh process on the
test split and get the accuracy the report states.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from pocketflow.export import write_atomic
from pocketflow.runs import shipped_file

SHIP_DIRECTORY = "ship"

# How each compact format is turned back into a Keras model (needs this project on the path).
_KERAS_LOADERS = {
    "sparse container": "from learners.weight_sparsification.artifact import load_container as load",
    "packed low-bit": "from learners.packing import load_packed as load",
    "codebook file": "from learners.nonuniform_quantization.artifact import load_artifact as load",
    "product-quantized file": "from learners.nonuniform_quantization.artifact import load_artifact as load",
}

_PREDICT = '''"""Class scores of the shipped model for raw images (written by PocketFlow-TF2 with the run).

    python predict.py IMAGES.npy          # raw pixels, NHWC, at the model's input size and pixel scale
    from predict import predict; scores = predict(images)

Needs numpy and ai-edge-litert (pip install ai-edge-litert), or TensorFlow's tf.lite.
"""

import sys
from pathlib import Path

import numpy as np

MODEL = Path(__file__).with_name({tflite!r})
SCALE, MEAN, STD = {scale!r}, {mean!r}, {std!r}  # the run's preprocessing: (x * SCALE - MEAN) / STD


def _interpreter():
    try:
        from ai_edge_litert import interpreter as runtime
        resolvers = runtime.OpResolverType
    except ImportError:
        import tensorflow as tf
        runtime, resolvers = tf.lite, tf.lite.experimental.OpResolverType
    try:
        interpreter = runtime.Interpreter(model_path=str(MODEL), num_threads=1)
        interpreter.allocate_tensors()
    except RuntimeError:  # XNNPACK cannot prepare some sparse int8 convolutions: the built-in kernels run them
        interpreter = runtime.Interpreter(model_path=str(MODEL), num_threads=1,
                                          experimental_op_resolver_type=resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
    return interpreter


def preprocess(images):
    x = np.asarray(images, np.float32) * np.float32(SCALE)
    if MEAN is not None:
        x = x - np.asarray(MEAN, np.float32)
    if STD is not None:
        x = x / np.asarray(STD, np.float32)
    return x


def predict(images):
    """Scores, one row per image (the model's outputs: logits or probabilities)."""
    interpreter = _interpreter()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for image in preprocess(images):
        x = image[None]
        if source["dtype"] != np.float32:  # full-integer file: quantize the input as the file says
            scale, zero_point = source["quantization"]
            info = np.iinfo(source["dtype"])
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(target["index"]).astype(np.float32)
        if target["dtype"] != np.float32:
            scale, zero_point = target["quantization"]
            y = (y - zero_point) * scale
        rows.append(y[0])
    return np.stack(rows)


if __name__ == "__main__":
    print(np.argmax(predict(np.load(sys.argv[1])), axis=-1))
'''


def _copy(source: Path, directory: Path) -> str:
    write_atomic(directory / source.name, source.read_bytes())
    return source.name


def write_ship_directory(run_dir: Path, best: Dict[str, Any], preprocess: Dict[str, Any],
                         missed: Optional[str] = None) -> Dict[str, Any]:
    """Fill ``run_dir/ship``; returns the report's ``ship`` section (paths relative to the run directory)."""
    directory = run_dir / SHIP_DIRECTORY
    if directory.exists():
        shutil.rmtree(directory)  # a resumed run ships again: no file of an earlier result stays
    directory.mkdir()

    def resolve(path: Optional[str]) -> Optional[Path]:
        if not path:
            return None
        candidate = Path(path)  # absolute, relative to the working directory, or to the run directory
        return candidate if candidate.is_absolute() or candidate.exists() else run_dir / candidate

    shipped_format = best.get("shipped_format", "float TFLite")
    artifact = resolve(best.get("artifact_path"))
    tflite = resolve(runtime_path(best))
    keras_model = resolve(best.get("model_path"))
    files: List[str] = []
    shipped = None
    if artifact is not None and artifact.exists():
        shipped = _copy(artifact, directory)
        files.append(shipped)
    runtime_file = None
    if tflite is not None and tflite.exists():
        runtime_file = tflite.name if shipped == tflite.name else _copy(tflite, directory)
        if runtime_file not in files:
            files.append(runtime_file)
        shipped = shipped or runtime_file
    if shipped is None and keras_model is not None:  # --export none: the Keras model is what there is
        shipped = _copy(keras_model, directory)
        files.append(shipped)
    if shipped is None:  # nothing was written for this result (no model file, no export)
        write_atomic(directory / "README.md", b"# What to deploy\n\nNo file was written for this result.\n")
        return {"directory": SHIP_DIRECTORY, "file": None, "format": None, "runtime_file": None,
                "files": [f"{SHIP_DIRECTORY}/README.md"]}
    lines = _readme(best, shipped_format, shipped, runtime_file)
    if missed:
        lines[1:1] = ["", f"**This result misses the target**: {missed}."]
    write_atomic(directory / "README.md", ("\n".join(lines) + "\n").encode())
    files.append("README.md")
    if runtime_file is not None:
        code = _PREDICT.format(tflite=runtime_file, scale=float(preprocess.get("scale", 1.0)),
                               mean=_tuple(preprocess.get("mean")), std=_tuple(preprocess.get("std")))
        write_atomic(directory / "predict.py", code.encode())
        files.append("predict.py")
    return {"directory": SHIP_DIRECTORY, "file": f"{SHIP_DIRECTORY}/{shipped}", "format": shipped_format,
            "runtime_file": f"{SHIP_DIRECTORY}/{runtime_file}" if runtime_file else None,
            "files": [f"{SHIP_DIRECTORY}/{name}" for name in files]}


def runtime_path(best: Dict[str, Any]) -> Optional[str]:
    """The TFLite file a runtime loads for this result: the shipped file when it is TFLite, the sparse
    TFLite beside a sparse container, else the learner's (or the run's) TFLite export."""
    artifact = best.get("artifact_path") or ""
    if artifact.endswith(".tflite"):
        return artifact
    sparse = (best.get("sparse_files") or {}).get("tflite")
    if sparse:
        return sparse["path"]
    return best.get("tflite_path")


def _tuple(values: Any) -> Optional[tuple]:
    return None if values is None else tuple(float(value) for value in values)


def _load_lines(best: Dict[str, Any], runtime_file: str) -> List[str]:
    """LiteRT load lines for ``runtime_file``: without the default delegate where the run measured it so
    (XNNPACK fails to prepare some sparse int8 convolutions, and then the file does not load with it)."""
    delegation = next((measured for name, measured in (best.get("delegation") or {}).items()
                       if Path(name).name == runtime_file), {})
    if delegation.get("partitions") == 0 and delegation.get("ops"):
        return ["from ai_edge_litert.interpreter import Interpreter, OpResolverType",
                f"interpreter = Interpreter(model_path=\"{runtime_file}\",  # XNNPACK cannot prepare it",
                "                          experimental_op_resolver_type="
                "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)", "interpreter.allocate_tensors()"]
    return ["from ai_edge_litert.interpreter import Interpreter",
            f"interpreter = Interpreter(model_path=\"{runtime_file}\")", "interpreter.allocate_tensors()"]


def _readme(best: Dict[str, Any], shipped_format: str, shipped: str, runtime_file: Optional[str]) -> List[str]:
    lines = ["# What to deploy", "", f"`{shipped}`: {shipped_format}."]
    if runtime_file and runtime_file != shipped:
        lines += ["", f"`{runtime_file}`: the same weights as a TFLite file, what a runtime loads."]
    accuracy = shipped_file(best)["accuracy"]
    measured = [f"test accuracy {'n/a' if accuracy is None else f'{100 * accuracy:.2f}%'}"]
    if best.get("speedup") and f"{best['speedup']:.2f}" != "1.00":
        measured.append(f"{best['speedup']:.2f}x fewer MACs than the baseline")
    if best.get("compression") and f"{best['compression']:.2f}" != "1.00":
        measured.append(f"{best['compression']:.2f}x smaller than the baseline's float TFLite file")
    if best.get("tflite_latency_ms"):
        measured.append(f"{best['tflite_latency_ms']:.3f} ms per image (batch 1, one thread)")
    lines += ["", "Measured in the run (report.json, `best`): " + "; ".join(measured) + "."]
    if runtime_file:
        lines += ["", "## Load it", "", "```python", "from predict import predict   # this directory's predict.py",
                  "scores = predict(raw_images)   # NHWC, the pixel scale of the training data", "```", "",
                  "or with LiteRT directly (`pip install ai-edge-litert`):", "", "```python",
                  *_load_lines(best, runtime_file), "```", "", "Inputs are preprocessed images (`preprocess()` in predict.py applies the run's "
                  "scale, mean and std); a full-integer file quantizes them as its input tensor says."]
    loader = next((line for prefix, line in _KERAS_LOADERS.items() if shipped_format.startswith(prefix)), None)
    if loader:
        lines += ["", f"`{shipped}` as a Keras model (from this project's checkout):", "", "```python",
                  loader, f"model = load(\"{shipped}\")", "```"]
    if shipped.endswith(".keras"):
        lines += ["", "## Load it", "", "```python", "import tf_keras",
                  f"model = tf_keras.models.load_model(\"{shipped}\", compile=False)", "```"]
    return lines
