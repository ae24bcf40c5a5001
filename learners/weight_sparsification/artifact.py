"""The shipped sparse file: the TFLite converter's sparsity encoding, or our own container.

1. Sparse TFLite: ``converter.optimizations += [EXPERIMENTAL_SPARSITY]`` stores every constant
   weight tensor with at least 30% zeros in CSR form (values + uint8/uint16 column indices +
   row segments); the interpreter runs it as is (a DENSIFY op expands it at load time). With
   ``bits=8`` the values are int8 (dynamic-range, or full-integer with calibration).
2. Container (``.npz``, members stored uncompressed): the model's architecture (Keras JSON)
   and the tensor table, both zlib-compressed (metadata, never the weights), then per weight
   tensor the smallest of: dense values;
   a bitmap (1 bit per weight) + nonzero values; or 8-bit gaps between nonzeros (a zero
   filler value every 256 zeros in a row) + nonzero values. Values are float32, or int8 with
   one float32 scale per output channel when ``bits=8``. ``load_container`` gives back the
   Keras model (float weights: bit-exact), ``container_to_tflite`` a TFLite file.

``SizeModel`` predicts both file sizes from the zeros per tensor, so the learner can solve a
``--target-compression`` for a sparsity without converting at every step; its constant part
is calibrated on real files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from learners.weight_sparsification.masks import PrunableWeight
from pocketflow.data.base import Dataset
from pocketflow.export import convert, write_atomic
from pocketflow.training import accuracy

log = logging.getLogger(__name__)

CONTAINER_FORMAT = "pocketflow-sparse"
CONTAINER_VERSION = 1
CONVERTER_MIN_SPARSITY = 0.3  # the converter encodes a tensor sparsely from 30% zeros on
# format: fast ships the smaller file among those this close to the lowest latency (timing noise)
FAST_TOLERANCE = 0.05
DYNAMIC_MIN_ELEMENTS = 1024  # dynamic-range quantization leaves smaller tensors in float
GAP_LIMIT = 255
ARRAY_DTYPES = {"values": np.float32, "int8_values": np.int8, "scales": np.float32, "dense": np.float32,
                "index": np.uint8}


# ---------------------------------------------------------------------------- sparse TFLite
def _add_sparsity(converter: tf.lite.TFLiteConverter) -> None:
    converter.optimizations = list(converter.optimizations) + [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]


def tflite_mode(bits: Optional[int], int8_mode: str) -> str:
    """The export mode of ``pocketflow.export`` the sparse file is converted with."""
    if bits is None:
        return "float"
    return "dynamic" if int8_mode == "dynamic" else "int8"


def sparse_tflite(model: tf.keras.Model, bits: Optional[int] = None, int8_mode: str = "dynamic",
                  representative: Optional[np.ndarray] = None) -> bytes:
    """The model as a TFLite flatbuffer with the converter's sparsity encoding."""
    return convert(model, tflite_mode(bits, int8_mode), representative, configure=_add_sparsity)


# ---------------------------------------------------------------------------- container
def _gaps(flat_nonzero: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 gaps, index into the value list or -1 for a filler) for the nonzero positions."""
    positions = np.flatnonzero(flat_nonzero)
    skipped = np.diff(np.concatenate([[-1], positions])) - 1  # zeros before each nonzero
    fillers = skipped // (GAP_LIMIT + 1)
    rest = skipped % (GAP_LIMIT + 1)
    counts = fillers + 1
    gaps = np.full(int(counts.sum()), GAP_LIMIT, np.uint8)
    ends = np.cumsum(counts) - 1
    gaps[ends] = rest.astype(np.uint8)
    source = np.full(len(gaps), -1, np.int64)
    source[ends] = np.arange(len(positions))
    return gaps, source


def _decode_positions(encoding: str, index: np.ndarray, size: int) -> np.ndarray:
    if encoding == "bitmap":
        return np.flatnonzero(np.unpackbits(index, count=size))
    return np.cumsum(index.astype(np.int64) + 1) - 1


def _quantize(values: np.ndarray, channel: np.ndarray, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: q = round(w / scale), scale = max|w| / 127."""
    peak = np.zeros(channels, np.float32)
    np.maximum.at(peak, channel, np.abs(values))
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.round(values / scales[channel]), -127, 127).astype(np.int8)
    return quantized, scales


def container_bytes(model: tf.keras.Model, quantize: Iterable[str] = (), bits: Optional[int] = None) -> bytes:
    """Serialize ``model`` into the sparse container; ``quantize`` names the weights stored as int8
    (only when ``bits == 8``)."""
    quantize = set(quantize) if bits == 8 else set()
    entries: List[Dict[str, Any]] = []
    values, int_values, scales, dense, index = [], [], [], [], []
    for weight in model.weights:
        array = weight.numpy()
        flat = array.ravel()
        entry: Dict[str, Any] = {"name": weight.name, "shape": list(array.shape), "dtype": array.dtype.name}
        nonzero = flat != 0
        nnz = int(nonzero.sum())
        if array.dtype != np.float32 or not flat.size:
            entry["encoding"] = "dense"
            dense.append(flat.astype(np.float32))
            entries.append(entry)
            continue
        gaps, source = _gaps(nonzero)
        as_int8 = weight.name in quantize
        value_bytes = 1 if as_int8 else 4
        choices = {"dense": flat.size * value_bytes, "bitmap": (flat.size + 7) // 8 + nnz * value_bytes,
                   "gaps": len(gaps) * (1 + value_bytes)}
        encoding = min(choices, key=choices.get) if not as_int8 else min(("bitmap", "gaps"), key=choices.get)
        entry["encoding"] = encoding
        if encoding == "dense":
            dense.append(flat)
            entries.append(entry)
            continue
        if encoding == "bitmap":
            index.append(np.packbits(nonzero))
            stored = flat[nonzero]
            positions = np.flatnonzero(nonzero)
        else:
            index.append(gaps)
            stored = np.where(source >= 0, flat[np.flatnonzero(nonzero)][np.maximum(source, 0)], 0.0)
            stored = stored.astype(np.float32)
            positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
        entry["count"] = int(len(stored))
        entry["index_bytes"] = int(len(index[-1]))
        if as_int8:
            channels = array.shape[-1]
            quantized, channel_scales = _quantize(stored, positions % channels, channels)
            int_values.append(quantized)
            scales.append(channel_scales)
            entry["values"] = "int8"
        else:
            values.append(stored)
            entry["values"] = "float32"
        entries.append(entry)
    meta = {"format": CONTAINER_FORMAT, "version": CONTAINER_VERSION, "weights": entries}
    arrays = {
        "architecture": _zipped(model.to_json()),
        "meta": _zipped(json.dumps(meta, separators=(",", ":"))),
        "values": _concat(values, np.float32),
        "int8_values": _concat(int_values, np.int8),
        "scales": _concat(scales, np.float32),
        "dense": _concat(dense, np.float32),
        "index": _concat(index, np.uint8),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **{name: array for name, array in arrays.items() if array.size})
    return buffer.getvalue()


def _zipped(text: str) -> np.ndarray:
    """Metadata (architecture JSON, tensor table) is zlib-compressed; weights never are."""
    return np.frombuffer(zlib.compress(text.encode(), 9), np.uint8)


def _unzipped(array: np.ndarray) -> str:
    return zlib.decompress(array.tobytes()).decode()


def _concat(parts: Sequence[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def write_container(model: tf.keras.Model, path: Path, quantize: Iterable[str] = (),
                    bits: Optional[int] = None) -> int:
    payload = container_bytes(model, quantize, bits)
    write_atomic(Path(path), payload)
    return len(payload)


def read_container(path: Path) -> Tuple[str, List[np.ndarray]]:
    """(Keras JSON architecture, weights in ``model.weights`` order) from a container file."""
    with np.load(Path(path), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(_unzipped(arrays["meta"]))
    if meta.get("format") != CONTAINER_FORMAT:
        raise ValueError(f"'{path}' is not a {CONTAINER_FORMAT} container")
    if meta.get("version") != CONTAINER_VERSION:
        raise ValueError(f"'{path}' is container version {meta.get('version')}; this code reads "
                         f"version {CONTAINER_VERSION}")
    cursors = {name: 0 for name in ARRAY_DTYPES}

    def take(name: str, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, ARRAY_DTYPES[name])
        start = cursors[name]
        cursors[name] = start + count
        if name not in arrays:
            raise ValueError(f"'{path}' is truncated: the '{name}' array is missing")
        return arrays[name][start:start + count]

    weights = []
    for entry in meta["weights"]:
        shape = tuple(entry["shape"])
        size = int(np.prod(shape))
        if entry["encoding"] == "dense":
            weights.append(take("dense", size).astype(entry["dtype"]).reshape(shape))
            continue
        index = take("index", entry["index_bytes"])
        positions = _decode_positions(entry["encoding"], index, size)
        if entry["values"] == "int8":
            channels = shape[-1]
            stored = take("int8_values", entry["count"]).astype(np.float32) * \
                take("scales", channels)[positions % channels]
        else:
            stored = take("values", entry["count"])
        flat = np.zeros(size, np.float32)
        flat[positions] = stored
        weights.append(flat.reshape(shape))
    return _unzipped(arrays["architecture"]), weights


def load_container(path: Path, custom_objects: Optional[Dict[str, Any]] = None) -> tf.keras.Model:
    """The Keras model stored in a sparse container (int8 values dequantized)."""
    architecture, weights = read_container(path)
    model = tf.keras.models.model_from_json(architecture, custom_objects=custom_objects)
    model.set_weights(weights)
    return model


def container_to_tflite(path: Path, output: Path, mode: str = "float", sparse: bool = True,
                        representative: Optional[np.ndarray] = None) -> int:
    """Convert a container to a TFLite file (with the converter's sparsity encoding by default)."""
    model = load_container(path)
    payload = convert(model, mode, representative, configure=_add_sparsity if sparse else None)
    write_atomic(Path(output), payload)
    return len(payload)


def container_members(path: Path) -> Dict[str, int]:
    """Bytes per stored array (for reports and tests)."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: info.file_size for info in archive.infolist()}


# ---------------------------------------------------------------------------- shipping
def write_sparse_files(model: tf.keras.Model, directory: Path, dataset: Dataset, *, bits: Optional[int],
                       int8_mode: str, quantize: Iterable[str], representative: Optional[np.ndarray],
                       measure: Callable[..., Any], kinds: Sequence[str] = ("tflite", "container"),
                       fastest: bool = False) -> Dict[str, Any]:
    """Write the sparse TFLite file and the container (and, where ``kinds`` names it, the dense TFLite
    file of the same weights), measure each on the test split (TFLite files in the interpreter, the
    container loaded back into Keras), and name the shipped file among ``kinds``: the smaller, or with
    ``fastest`` the one with the lowest measured latency (the smaller of those within FAST_TOLERANCE).
    Returns report fields for ``best``."""
    test_images, test_labels = dataset.test_arrays()
    suffix = "" if bits is None else f"_int8_{int8_mode}"
    values = "float32" if bits is None else f"int8 {int8_mode}"
    files: Dict[str, Dict[str, Any]] = {}

    def tflite_file(kind: str, mode: str, payload: bytes, description: str) -> None:
        path = directory / f"model_{mode}.tflite"
        write_atomic(path, payload)
        measured = measure(path, mode, test_images, test_labels)
        files[kind] = {"format": description, "path": str(path), "bytes": measured.bytes,
                       "accuracy": measured.accuracy, "latency_ms": measured.latency_ms}

    # measure: LearnerContext.measure_file, the run's one measurement path
    tflite_file("tflite", f"sparse{suffix}", sparse_tflite(model, bits, int8_mode, representative),
                f"sparse TFLite ({values})")
    if "dense" in kinds:  # the runtime's fast kernels may take a dense file where they refuse the sparse one
        tflite_file("dense", f"dense{suffix}", convert(model, tflite_mode(bits, int8_mode), representative),
                    f"dense TFLite ({values})")

    container_path = directory / f"model_sparse{suffix}.npz"
    size = write_container(model, container_path, quantize, bits)
    files["container"] = {"format": f"sparse container ({'float32' if bits is None else 'int8'})",
                          "path": str(container_path), "bytes": size,
                          "accuracy": accuracy(load_container(container_path), dataset.test(256))}

    if fastest:
        quickest = min(files[kind]["latency_ms"] for kind in kinds)
        kinds = [kind for kind in kinds if files[kind]["latency_ms"] <= quickest * (1.0 + FAST_TOLERANCE)]
    shipped_kind = min(kinds, key=lambda kind: files[kind]["bytes"])
    shipped = files[shipped_kind]
    def said(file: Dict[str, Any]) -> str:
        timed = f", {file['latency_ms']:.3f} ms" if file.get("latency_ms") else ""
        return f"{file['format']}, {file['bytes']:,} bytes{timed}"

    log.info("shipped: %s, test accuracy %.4f (other: %s)", said(shipped), shipped["accuracy"],
             "; ".join(said(file) for kind, file in files.items() if kind != shipped_kind))
    fields = {"shipped_format": shipped["format"], "artifact_bytes": shipped["bytes"], "artifact_path": shipped["path"],
              "artifact_accuracy": shipped["accuracy"], "sparse_files": files}
    if shipped.get("latency_ms"):  # a TFLite file ships: it is the run's TFLite result (timed against the baseline)
        fields.update(tflite_path=shipped["path"], tflite_accuracy=shipped["accuracy"],
                      tflite_latency_ms=shipped["latency_ms"])
    return fields


# ---------------------------------------------------------------------------- size model
def _width(largest: int) -> int:
    return 1 if largest <= 0xFF else 2 if largest <= 0xFFFF else 4


class SizeModel:
    """File sizes as a function of the zeros per prunable tensor: a calibrated constant (graph,
    BatchNorm, biases, headers) plus exact per-tensor encodings."""

    def __init__(self, weights: Sequence[PrunableWeight], bits: Optional[int], int8_mode: str) -> None:
        self.weights = list(weights)
        self.bits = bits
        self.int8_mode = int8_mode
        self.constant: Dict[str, float] = {}

    def _tflite_value_bytes(self, weight: PrunableWeight) -> int:
        if self.bits is None:
            return 4
        if self.int8_mode == "dynamic" and weight.size < DYNAMIC_MIN_ELEMENTS:
            return 4
        return 1

    def tensor_bytes(self, kind: str, weight: PrunableWeight, zeros: int) -> float:
        nnz = weight.size - zeros
        if kind == "tflite":
            value = self._tflite_value_bytes(weight)
            if zeros < CONVERTER_MIN_SPARSITY * weight.size:
                return weight.size * value
            return nnz * (value + _width(weight.tflite_inner - 1)) + (weight.rows + 1) * _width(nnz)
        value = 1 if self.bits == 8 else 4
        index = min((weight.size + 7) // 8, nnz)
        if self.bits is None:
            return min(weight.size * 4, index + nnz * value)
        return index + nnz * value + weight.shape[-1] * 4

    def variable_bytes(self, kind: str, zeros: Mapping[str, int]) -> float:
        return sum(self.tensor_bytes(kind, w, zeros.get(w.key, 0)) for w in self.weights)

    def observe(self, kind: str, zeros: Mapping[str, int], real_bytes: int) -> None:
        """Calibrate on a real file: the constant is the largest residual seen (conservative)."""
        residual = real_bytes - self.variable_bytes(kind, zeros)
        self.constant[kind] = max(self.constant.get(kind, residual), residual)

    def calibrated(self, kind: str) -> bool:
        return kind in self.constant

    def predict(self, kind: str, zeros: Mapping[str, int]) -> float:
        return self.constant.get(kind, 0.0) + self.variable_bytes(kind, zeros)


def solve_zeros(predict: Callable[[int], float], limit_bytes: float, low: int, high: int) -> Optional[int]:
    """Fewest total zeros in [low, high] whose predicted bytes fit ``limit_bytes`` (bisection;
    predicted bytes fall as zeros grow). None when even ``high`` does not fit."""
    if predict(high) > limit_bytes:
        return None
    if predict(low) <= limit_bytes:
        return low
    while high - low > 1:
        middle = (low + high) // 2
        if predict(middle) <= limit_bytes:
            high = middle
        else:
            low = middle
    return high


def ceil_zeros(sparsity: float, total: int) -> int:
    """Zeros needed for at least ``sparsity`` of ``total`` (robust to float noise)."""
    return int(math.ceil(sparsity * total - 1e-9))
