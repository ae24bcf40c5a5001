"""Packed low-bit model files: integer codes bit-packed on disk, with the tables that decode them.

Shared by the quantization learners (uniform low-bit, non-uniform codebooks, product
quantization), so every one of them ships the same kind of file and is measured the same way:
the compression is the size of this file on disk, not an estimate.

Layout (an ``.npz`` whose members are stored, not deflated, so the bytes are what they look like):
``meta`` (zlib JSON: format, version, one entry per weight of ``model.weights``), ``architecture``
(zlib Keras JSON), ``dense`` (float32 values of tensors kept in float: biases, BatchNorm, small
tensors), ``codes`` (every packed tensor's codes, ``bits`` per code, each tensor byte-aligned) and
``tables`` (float32 decoding tables: scales and zero points, codebooks, ...), and, only when a
tensor asks for half-precision tables (``table_dtype="float16"``, e.g. product-quantization
codebooks), ``tables16`` (those tables as float16).

A *decoder* turns (codes, table, entry) into the float weight; decoders are registered by name,
so a learner with a new scheme adds one without touching the file format.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from pocketflow.export import write_atomic
from pocketflow.registry import Registry

PACKED_FORMAT = "pocketflow-packed"
PACKED_VERSION = 1
MAX_BITS = 16

Decoder = Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], np.ndarray]
DECODERS: Registry[Decoder] = Registry("decoder")


register_decoder = DECODERS.register


# ---------------------------------------------------------------------------- bit packing
def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``codes`` (non-negative integers below 2**bits) as a little-endian bit stream, ``bits`` per code."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits = {bits} is out of range: it must be in [1, {MAX_BITS}]")
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits; got "
                         f"[{flat.min()}, {flat.max()}]")
    planes = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of ``pack_codes``: ``count`` codes as int64."""
    needed = packed_size(count, bits)
    if len(data) < needed:
        raise ValueError(f"packed codes are truncated: {len(data)} bytes, {needed} needed")
    stream = np.unpackbits(np.frombuffer(data, np.uint8, needed), bitorder="little")[:count * bits]
    planes = stream.reshape(count, bits).astype(np.int64)
    return planes @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def packed_size(count: int, bits: int) -> int:
    """Bytes ``count`` codes of ``bits`` bits take once packed."""
    return (count * bits + 7) // 8


# ---------------------------------------------------------------------------- decoders
@register_decoder("affine")
def decode_affine(codes: np.ndarray, table: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """Per-output-channel uniform quantization: value = scale[c] * (code - zero_point[c]).

    ``table`` is scales then zero points, one each per entry of the last axis (output channels
    of Conv2D/Dense kernels; DepthwiseConv2D kernels use their third axis, see ``channel_axis``).
    """
    shape = tuple(entry["shape"])
    axis = int(entry.get("channel_axis", len(shape) - 1)) % len(shape)
    channels = shape[axis]
    scales, zero_points = table[:channels], table[channels:2 * channels]
    values = codes.reshape(shape).astype(np.float32)
    broadcast = [1] * len(shape)
    broadcast[axis] = channels
    return (values - zero_points.reshape(broadcast)) * scales.reshape(broadcast)


@register_decoder("codebook")
def decode_codebook(codes: np.ndarray, table: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """One codebook per tensor: value = table[code]."""
    return table[codes].astype(np.float32).reshape(tuple(entry["shape"]))


# ---------------------------------------------------------------------------- the file
@dataclass
class PackedTensor:
    """One weight stored as codes + a decoding table."""

    codes: np.ndarray  # integers in [0, 2**bits)
    bits: int
    table: np.ndarray  # float32, the decoder's parameters
    decoder: str
    extra: Dict[str, Any] = field(default_factory=dict)  # decoder options (JSON-serializable)
    table_dtype: str = "float32"  # "float16": the table is stored in half precision (member tables16)


def _zipped(text: str) -> np.ndarray:
    return np.frombuffer(zlib.compress(text.encode(), 9), np.uint8)


def _unzipped(array: np.ndarray) -> str:
    return zlib.decompress(array.tobytes()).decode()


def packed_bytes(model: tf.keras.Model, packed: Mapping[str, PackedTensor]) -> bytes:
    """The file's content: ``packed`` maps weight names (``variable.name``) to their codes; every
    other weight of ``model`` is stored as float32."""
    unknown = set(packed) - {w.name for w in model.weights}
    if unknown:
        raise ValueError(f"packed tensors {sorted(unknown)} are not weights of model '{model.name}'")
    entries: List[Dict[str, Any]] = []
    dense: List[np.ndarray] = []
    codes: List[bytes] = []
    tables: List[np.ndarray] = []
    tables16: List[np.ndarray] = []
    for weight in model.weights:
        value = weight.numpy()
        entry: Dict[str, Any] = {"name": weight.name, "shape": list(value.shape), "dtype": value.dtype.name}
        tensor = packed.get(weight.name)
        if tensor is None:
            entry["encoding"] = "dense"
            dense.append(value.astype(np.float32).reshape(-1))
        else:
            DECODERS.get(tensor.decoder)
            blob = pack_codes(tensor.codes, tensor.bits)
            if tensor.table_dtype not in ("float32", "float16"):
                raise ValueError(f"table_dtype = {tensor.table_dtype!r} is not supported; use float32 or float16")
            table = np.asarray(tensor.table, tensor.table_dtype).reshape(-1)
            entry.update(encoding="packed", bits=int(tensor.bits), count=int(np.asarray(tensor.codes).size),
                         decoder=tensor.decoder, table_size=int(table.size), **tensor.extra)
            codes.append(blob)
            if tensor.table_dtype == "float16":
                entry["table_dtype"] = "float16"
                tables16.append(table)
            else:
                tables.append(table)
        entries.append(entry)
    meta = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "weights": entries}
    arrays = {
        "meta": _zipped(json.dumps(meta)),
        "architecture": _zipped(model.to_json()),
        "dense": np.concatenate(dense) if dense else np.zeros(0, np.float32),
        "codes": np.frombuffer(b"".join(codes), np.uint8),
        "tables": np.concatenate(tables) if tables else np.zeros(0, np.float32),
    }
    if tables16:  # only files that use half-precision tables carry the member
        arrays["tables16"] = np.concatenate(tables16)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(f"{name}.npy", member.getvalue())
    return buffer.getvalue()


def write_packed(model: tf.keras.Model, packed: Mapping[str, PackedTensor], path: Path) -> int:
    """Write the packed file atomically; returns its size in bytes."""
    payload = packed_bytes(model, packed)
    write_atomic(Path(path), payload)
    return len(payload)


def read_packed(path: Path) -> Tuple[str, List[np.ndarray], List[Dict[str, Any]]]:
    """(Keras JSON, decoded float weights in ``model.weights`` order, the per-weight entries)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(_unzipped(arrays["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"'{path}' is not a readable {PACKED_FORMAT} file ({error})") from None
    if meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
        raise ValueError(f"'{path}' is {meta.get('format')} version {meta.get('version')}; this code reads "
                         f"{PACKED_FORMAT} version {PACKED_VERSION}")
    dense, codes, tables = arrays["dense"], arrays["codes"].tobytes(), arrays["tables"]
    tables16 = arrays.get("tables16", np.zeros(0, np.float16))
    dense_at = codes_at = tables_at = tables16_at = 0
    weights: List[np.ndarray] = []
    for entry in meta["weights"]:
        shape = tuple(entry["shape"])
        size = int(np.prod(shape))
        if entry["encoding"] == "dense":
            weights.append(dense[dense_at:dense_at + size].astype(entry["dtype"]).reshape(shape))
            dense_at += size
            continue
        length = packed_size(entry["count"], entry["bits"])
        values = unpack_codes(codes[codes_at:codes_at + length], entry["bits"], entry["count"])
        codes_at += length
        if entry.get("table_dtype") == "float16":
            table = tables16[tables16_at:tables16_at + entry["table_size"]].astype(np.float32)
            tables16_at += entry["table_size"]
        else:
            table = tables[tables_at:tables_at + entry["table_size"]]
            tables_at += entry["table_size"]
        weights.append(DECODERS.get(entry["decoder"])(values, table, entry).astype(entry["dtype"]).reshape(shape))
    return _unzipped(arrays["architecture"]), weights, meta["weights"]


def load_packed(path: Path, custom_objects: Optional[Dict[str, Any]] = None) -> tf.keras.Model:
    """The Keras model a packed file holds, with its weights decoded to float."""
    architecture, weights, _ = read_packed(path)
    model = tf.keras.models.model_from_json(architecture, custom_objects=custom_objects)
    model.set_weights(weights)
    return model


def packed_to_tflite(path: Path, output: Path, mode: str = "float",
                     representative: Optional[np.ndarray] = None) -> int:
    """A TFLite file of the decoded model (float, or dynamic/int8 on top); returns its size in bytes."""
    from pocketflow.export import convert

    payload = convert(load_packed(path), mode, representative)
    write_atomic(Path(output), payload)
    return len(payload)


def distinct_values(weights: Sequence[np.ndarray]) -> List[int]:
    """How many distinct values each array holds (a check that codes really limit the values)."""
    return [int(np.unique(w).size) for w in weights]
