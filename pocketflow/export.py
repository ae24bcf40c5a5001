"""TFLite export, and the measurements made on the exported file itself.

A compressed model is judged by what ships: every exported file is run by the runtime people
deploy with, LiteRT (``ai-edge-litert``; TensorFlow's deprecated ``tf.lite.Interpreter`` only
where LiteRT is not installed), on the test split (accuracy, so Keras/TFLite parity is visible)
and timed at batch 1 (median over ``runs`` invocations after warm-up, thread count recorded).
Every measurement names the runtime and its version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

EXPORT_MODES = ("float", "dynamic", "int8")


@dataclass(frozen=True)
class TFLiteMeasurement:
    mode: str
    path: str
    bytes: int
    accuracy: Optional[float]
    latency_ms: float
    latency_p90_ms: float
    latency_runs: int
    threads: int
    input_dtype: str
    runtime: str
    default_delegate: bool
    delegation: Dict[str, object]  # Delegation.as_dict(): what the default delegate took

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _configure_float(converter: tf.lite.TFLiteConverter, representative: Optional[np.ndarray]) -> None:
    return None


def _configure_dynamic(converter: tf.lite.TFLiteConverter, representative: Optional[np.ndarray]) -> None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def _configure_int8(converter: tf.lite.TFLiteConverter, representative: Optional[np.ndarray]) -> None:
    if representative is None or len(representative) == 0:
        raise ValueError("int8 export needs representative images from the training split")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def samples():
        for image in representative:
            yield [image[None].astype(np.float32)]

    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8


_CONFIGURE: Dict[str, Callable[[tf.lite.TFLiteConverter, Optional[np.ndarray]], None]] = {
    "float": _configure_float,
    "dynamic": _configure_dynamic,
    "int8": _configure_int8,
}


def convert(model: tf.keras.Model, mode: str = "float", representative: Optional[np.ndarray] = None,
            configure: Optional[Callable[[tf.lite.TFLiteConverter], None]] = None) -> bytes:
    """Keras model -> TFLite flatbuffer bytes. ``configure`` lets a learner add converter options."""
    if mode not in _CONFIGURE:
        raise ValueError(f"unknown export mode '{mode}'; choose one of {', '.join(EXPORT_MODES)}")
    serving = _serving_module(model)
    with _delegate_friendly(model):
        function = serving.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], serving)
    _CONFIGURE[mode](converter, representative)
    if configure is not None:
        configure(converter)
    with _native_stderr_to_log():
        return converter.convert()


def _is_strided_pick(layer: tf.keras.layers.Layer) -> bool:
    """A 1x1 pooling with a stride: it only subsamples (a ResNet shortcut's ``x[:, ::2, ::2]``).
    Keras's own classes only: a subclass may compute something else."""
    if type(layer) not in (tf.keras.layers.AveragePooling2D, tf.keras.layers.MaxPooling2D):
        return False
    config = layer.get_config()
    return (tuple(config["pool_size"]) == (1, 1) and tuple(config["strides"]) != (1, 1)
            and config.get("data_format", "channels_last") == "channels_last")


@contextlib.contextmanager
def _delegate_friendly(model: tf.keras.Model) -> Iterator[None]:
    """While the export traces ``model``, layers XNNPACK declines compute exact equivalents it takes.

    XNNPACK declines a 1x1 pooling with a stride (and a strided slice), so a ResNet's subsampling
    shortcut split the file into three delegate partitions with the pooling on the reference
    kernels; a 1x1 depthwise convolution with the same stride and a kernel of ones picks the same
    values and is delegated, in float and in int8. Only the traced function changes: the layers'
    ``call`` is swapped for the trace and put back, so the model (its graph, which the channel
    analysis reads, and its weights) is left exactly as it was, nested and subclassed models alike.
    """
    swapped = [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.Layer)
               and _is_strided_pick(layer)]
    for layer in swapped:
        layer.call = _strided_pick_as_depthwise(layer)
    try:
        yield
    finally:
        for layer in swapped:
            del layer.call  # the class's own call again


def _strided_pick_as_depthwise(layer: tf.keras.layers.Layer) -> Callable[[tf.Tensor], tf.Tensor]:
    config = layer.get_config()
    strides = tuple(config["strides"])

    def call(inputs: tf.Tensor, *args, **kwargs) -> tf.Tensor:
        ones = tf.ones([1, 1, inputs.shape[-1], 1], inputs.dtype)
        return tf.nn.depthwise_conv2d(inputs, ones, strides=(1, *strides, 1), padding=config["padding"].upper())

    return call


def _serving_module(model: tf.keras.Model) -> tf.Module:
    """The model's inference function at batch 1 (static shapes; the evaluator resizes the batch),
    with its variables and nothing else.

    ``from_keras_model`` saves the whole Keras object graph first, tracing every layer's call
    functions, which took most of a conversion's time, for a file with the same outputs.
    The signature keeps the model's input names and names its output after the model.
    """
    static = all(None not in tuple(i.shape[1:]) for i in model.inputs)
    specs = [tf.TensorSpec([1 if static else None, *i.shape[1:]], i.dtype, name=_tensor_name(name))
             for i, name in zip(model.inputs, model.input_names)]
    output_name = _tensor_name(model.name)

    def serve(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return {output_name: outputs} if tf.is_tensor(outputs) else outputs

    module = tf.Module()
    module.weights = list(model.variables)
    module.serve = tf.function(serve, input_signature=specs, autograph=False)
    return module


def _tensor_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "tensor"


@contextlib.contextmanager
def _native_stderr_to_log():
    """Native code's prints on file descriptor 2 (the converter's pages of MLIR statistics, the
    runtime's delegate notice) go to the debug log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace").strip()
            if text:
                log.debug("TFLite native output:\n%s", text)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; results are as readable as any file
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _interpreter_module():
    """LiteRT's interpreter module where it is installed, else TensorFlow's."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        return tf.lite
    return interpreter


def runtime_name() -> str:
    """The runtime that runs every TFLite file measured in this process, with its version."""
    if _interpreter_module() is tf.lite:
        return f"tf.lite.Interpreter (TensorFlow {tf.__version__})"
    import ai_edge_litert
    return f"LiteRT (ai-edge-litert {getattr(ai_edge_litert, '__version__', 'unknown')})"


def load_interpreter(path: str | Path, threads: int = 1):
    """(interpreter with tensors allocated, whether the default XNNPACK delegate runs it).

    XNNPACK in TF >= 2.16 and LiteRT fails to *prepare* some sparse dynamic-range int8
    convolutions instead of declining them; such a file still runs on the built-in kernels,
    so it is loaded again without the default delegate, and the measurement says so.
    """
    module = _interpreter_module()
    try:
        with _native_stderr_to_log():  # the runtime's "Created TensorFlow Lite XNNPACK delegate" line
            interpreter = module.Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        return interpreter, True
    except (RuntimeError, ValueError) as error:
        if "delegate" not in str(error).lower() and "prepare" not in str(error).lower():
            raise
        log.debug("%s: the default delegate cannot prepare it (%s); running on the built-in kernels", path,
                  str(error).splitlines()[0] if str(error) else type(error).__name__)
    interpreter = module.Interpreter(model_path=str(path), num_threads=threads,
                                     experimental_op_resolver_type=module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter, False


@dataclass(frozen=True)
class Delegation:
    """How much of a loaded file the runtime's default delegate (XNNPACK on CPU) runs.

    Every op the delegate declines runs on the reference kernels, and every boundary between the
    two costs a hand-over, so a fast kernel only counts where ``fallback_ops`` is empty and there is
    one partition.
    """

    partitions: int  # delegate nodes; 0 when the file runs without the default delegate
    ops: int  # the file's ops
    delegated_ops: int
    fallback_ops: Dict[str, int]  # op name -> count of ops left to the reference kernels

    @property
    def full(self) -> bool:
        return self.partitions == 1 and not self.fallback_ops

    def as_dict(self) -> Dict[str, object]:
        return {**asdict(self), "full": self.full, "summary": self.summary()}

    def summary(self) -> str:
        if self.partitions == 0:
            return f"no delegate: all {self.ops} ops on the reference kernels"
        text = (f"{self.delegated_ops} of {self.ops} ops in {self.partitions} "
                f"delegate partition{'s' if self.partitions != 1 else ''}")
        if self.fallback_ops:
            text += "; on the reference kernels: " + ", ".join(
                f"{name} x{count}" if count > 1 else name for name, count in sorted(self.fallback_ops.items()))
        return text


def delegation_of(interpreter) -> Delegation:
    """The delegate partitions of an interpreter with tensors allocated, read from its node list.

    The interpreter keeps the ops a delegate replaced and appends one DELEGATE node per partition;
    a partition's ops are those reached backwards from the delegate node's outputs without
    crossing its inputs. (The runtime logs the same count only at verbose level.)
    """
    nodes = interpreter._get_ops_details()  # the only per-node view the Python API offers
    delegates = [node for node in nodes if node["op_name"] == "DELEGATE"]
    ops = [node for node in nodes if node["op_name"] != "DELEGATE"]
    producer = {int(tensor): node for node in ops for tensor in node["outputs"]}
    delegated = set()
    for delegate in delegates:
        boundary = {int(tensor) for tensor in delegate["inputs"]}
        pending = [int(tensor) for tensor in delegate["outputs"]]
        seen = set()
        while pending:
            tensor = pending.pop()
            if tensor in seen or tensor in boundary or tensor not in producer:
                continue
            seen.add(tensor)
            node = producer[tensor]
            delegated.add(node["index"])
            pending.extend(int(source) for source in node["inputs"] if source >= 0)
    fallback: Dict[str, int] = {}
    for node in ops:
        if node["index"] not in delegated:
            fallback[node["op_name"]] = fallback.get(node["op_name"], 0) + 1
    return Delegation(partitions=len(delegates), ops=len(ops), delegated_ops=len(delegated), fallback_ops=fallback)


def delegation_of_file(path: str | Path) -> Delegation:
    return delegation_of(load_interpreter(path)[0])


class TFLiteModel:
    """A TFLite file loaded in the interpreter, with (de)quantization of int8 inputs and outputs."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        self.path = str(path)
        self.threads = threads
        self._batch_fixed = False
        self._load()

    @property
    def input_dtype(self) -> str:
        return np.dtype(self._input["dtype"]).name

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if dtype in (np.int8, np.uint8):
            scale, zero_point = self._input["quantization"]
            info = np.iinfo(dtype)
            return np.clip(np.round(images / scale + zero_point), info.min, info.max).astype(dtype)
        return images.astype(dtype)

    def _dequantize(self, outputs: np.ndarray) -> np.ndarray:
        if self._output["dtype"] in (np.int8, np.uint8):
            scale, zero_point = self._output["quantization"]
            return (outputs.astype(np.float32) - zero_point) * scale
        return outputs

    def _load(self) -> None:
        self.interpreter, self.default_delegate = load_interpreter(self.path, self.threads)
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.batch = int(self._input["shape"][0])

    def resize(self, batch: int) -> int:
        """Resize the batch dimension; returns the batch in effect (graphs with batch-1 reshapes stay at 1)."""
        if batch == self.batch or self._batch_fixed:
            return self.batch
        shape = list(self._input["shape"])
        shape[0] = batch
        try:
            self.interpreter.resize_tensor_input(self._input["index"], shape)
            self.interpreter.allocate_tensors()
        except RuntimeError as error:  # e.g. a RESHAPE whose target shape includes the batch
            log.debug("%s cannot run batches of %d (%s); evaluating one image at a time", self.path, batch,
                      str(error).splitlines()[0])
            self._batch_fixed = True
            self._load()
            return self.batch
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.batch = batch
        return batch

    def predict(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        outputs = []
        start = 0
        while start < len(images):
            size = self.resize(min(batch, len(images) - start))
            chunk = images[start:start + size]
            if len(chunk) < size:  # a fixed batch larger than what is left
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            self.interpreter.set_tensor(self._input["index"], self._quantize(chunk))
            self.interpreter.invoke()
            result = self._dequantize(self.interpreter.get_tensor(self._output["index"]))
            outputs.append(result[:len(images) - start].copy())
            start += size
        return np.concatenate(outputs)[:len(images)]

    def latency(self, sample: np.ndarray, runs: int = 50, warmup: int = 10,
                min_seconds: float = 0.3) -> tuple:
        """(median ms, p90 ms, runs) of single-image invocations.

        At least ``runs`` timed runs, and more for fast models until ``min_seconds`` have
        been timed (up to 20,000), so sub-millisecond medians are stable enough to compare.
        """
        self.resize(1)
        self.interpreter.set_tensor(self._input["index"], self._quantize(sample[:1]))
        for _ in range(warmup):
            self.interpreter.invoke()
        timings = []
        started = time.perf_counter()
        while len(timings) < runs or (time.perf_counter() - started < min_seconds and len(timings) < 20000):
            begin = time.perf_counter()
            self.interpreter.invoke()
            timings.append((time.perf_counter() - begin) * 1000.0)
        return float(np.median(timings)), float(np.percentile(timings, 90)), len(timings)


def tflite_accuracy(model: TFLiteModel, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.predict(images), axis=-1) == labels))


def export_and_measure(model: tf.keras.Model, path: Path, mode: str, *, test_images: np.ndarray,
                       test_labels: np.ndarray, representative: Optional[np.ndarray] = None,
                       threads: int = 1, runs: int = 50,
                       configure: Optional[Callable[[tf.lite.TFLiteConverter], None]] = None) -> TFLiteMeasurement:
    """Convert, write atomically, then evaluate and time the written file."""
    payload = convert(model, mode, representative, configure)
    write_atomic(path, payload)
    return measure_file(path, mode, test_images=test_images, test_labels=test_labels, threads=threads, runs=runs)


def measure_file(path: Path, mode: str, *, test_images: np.ndarray, test_labels: np.ndarray,
                 threads: int = 1, runs: int = 50) -> TFLiteMeasurement:
    """Accuracy on the test split and batch-1 latency of an existing TFLite file.

    Accuracy runs on every core the process may use (the same outputs, bit for bit, as one thread
    on the ResNet-20 float, int8 and dynamic-range files checked, and sooner); latency on
    ``threads``, as configured.
    """
    accuracy = tflite_accuracy(TFLiteModel(path, threads=_usable_cores()), test_images, test_labels)
    loaded = TFLiteModel(path, threads=threads)
    median, p90, timed_runs = loaded.latency(test_images, runs=runs)
    log.info("tflite %-7s %8.1f KB  accuracy %.4f  latency %.3f ms (batch 1, %d thread%s)", mode,
             path.stat().st_size / 1024, accuracy, median, threads, "" if threads == 1 else "s",
             extra={"console": False})  # the run's summary names what ships with these figures
    return TFLiteMeasurement(mode=mode, path=str(path), bytes=path.stat().st_size, accuracy=accuracy,
                             latency_ms=median, latency_p90_ms=p90, latency_runs=timed_runs, threads=threads,
                             input_dtype=loaded.input_dtype, runtime=runtime_name(),
                             default_delegate=loaded.default_delegate,
                             delegation=delegation_of(loaded.interpreter).as_dict())


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def compare_latency(paths: list, rounds: int = 5, min_seconds: float = 0.5, threads: int = 1) -> Dict[str, float]:
    """Best-of-``rounds`` median batch-1 latency (ms) per file, the files timed in turn each round.

    Interleaving makes the ratio between files robust to load that comes and goes on the machine.
    """
    models = {str(path): TFLiteModel(path, threads=threads) for path in paths}
    shape = models[str(paths[0])]._input["shape"]
    sample = np.random.default_rng(0).random((1, *shape[1:])).astype(np.float32)
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = min(best[name], model.latency(sample, min_seconds=min_seconds)[0])
    return best
