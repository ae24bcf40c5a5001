"""What ships: codebooks + bit-packed indices in the shared packed file (``learners.packing``).

Each quantized kernel is stored as its codes (``bits`` per code, one code per weight for scalar
codebooks, one per sub-vector for product quantization) and its codebook; every other float
tensor (biases, BatchNorm) is stored in half precision when ``half_rest`` is on (and when its
values fit float16), the rest as float32. Two decoders are registered here: ``product``
(sub-vector codebooks, layout in the entry) and ``float16`` (16-bit codes holding float16 bit
patterns). The scalar codebooks use the shared ``codebook`` decoder.

``load_artifact`` gives the Keras model back; ``artifact_to_tflite`` converts it to TFLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from learners.nonuniform_quantization.codebooks import Layout
from learners.packing import (PackedTensor, load_packed, packed_bytes, packed_size, packed_to_tflite, register_decoder,
                              write_packed)

HALF_MAX = float(np.finfo(np.float16).max)


@register_decoder("product")
def decode_product(codes: np.ndarray, table: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """Product quantization: sub-vector ``code`` is row ``code`` of the (k, block) codebook ``table``;
    sub-vectors are put back in place by the entry's layout (``perm``, ``block``)."""
    layout = Layout(tuple(entry["shape"]), tuple(entry["perm"]), int(entry["block"]))
    codebook = np.asarray(table, np.float32).reshape(-1, layout.block)
    return layout.assemble(codebook[np.asarray(codes, np.int64)]).astype(np.float32)


@register_decoder("float16")
def decode_float16(codes: np.ndarray, table: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """A float tensor kept in half precision: each 16-bit code is a float16 bit pattern."""
    return np.asarray(codes).astype(np.uint16).view(np.float16).astype(np.float32).reshape(tuple(entry["shape"]))


@dataclass
class QuantizedKernel:
    """One kernel replaced by a codebook: which sub-vector (or weight) uses which centroid."""

    key: str  # "<layer path>/<attribute>"
    layout: Layout  # block 1: scalar codebook
    bits: int  # the codebook has 2**bits entries
    codes: np.ndarray  # int64, one per sub-vector, numbered as ``Layout.subvectors``
    half_table: bool = False  # codebook stored as float16 (product quantization)

    @property
    def centroids(self) -> int:
        return 1 << self.bits

    def codebook_of(self, kernel: np.ndarray) -> np.ndarray:
        """(k, block) codebook read off ``kernel``: the mean of each cluster's sub-vectors (exact once
        the kernel holds one value per cluster); unused entries are 0."""
        rows = self.layout.subvectors(kernel).astype(np.float64)
        counts = np.bincount(self.codes, minlength=self.centroids)
        sums = np.stack([np.bincount(self.codes, weights=rows[:, i], minlength=self.centroids)
                         for i in range(self.layout.block)], axis=1)
        return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)

    def decode(self, codebook: np.ndarray) -> np.ndarray:
        return self.layout.assemble(np.asarray(codebook)[self.codes]).astype(np.float32)

    def packed(self, kernel: np.ndarray) -> PackedTensor:
        codebook = self.codebook_of(kernel)
        if self.layout.block == 1 and not self.half_table and self.layout.perm == tuple(range(len(self.layout.shape))):
            return PackedTensor(self.codes, self.bits, codebook.reshape(-1), "codebook")
        return PackedTensor(self.codes, self.bits, codebook.reshape(-1), "product", extra=self.layout.to_json(),
                            table_dtype="float16" if self.half_table else "float32")

    def nbytes(self) -> int:
        """Bytes of its codes and codebook in the file."""
        return kernel_bytes(self.layout, self.bits, self.half_table)


def kernel_bytes(layout: Layout, bits: int, half_table: bool) -> int:
    return packed_size(layout.count, bits) + (1 << bits) * layout.block * (2 if half_table else 4)


def fits_half(values: np.ndarray) -> bool:
    finite = np.isfinite(values)
    return bool(finite.all() and (np.abs(values) <= HALF_MAX).all())


def rest_variables(model: tf.keras.Model, quantized: Sequence[tf.Variable]) -> List[tf.Variable]:
    """Float32 weights of ``model`` that are not quantized kernels (biases, BatchNorm, ...)."""
    skip = {id(v) for v in quantized}
    return [v for v in model.weights if id(v) not in skip and v.dtype == tf.float32]


def half_tensor(values: np.ndarray) -> PackedTensor:
    codes = np.asarray(values, np.float32).astype(np.float16).view(np.uint16).astype(np.int64)
    return PackedTensor(codes, 16, np.zeros(0, np.float32), "float16")


def round_half(variables: Sequence[tf.Variable]) -> None:
    """Round float tensors to float16 precision in place (those whose values fit), so the model is
    exactly what the file decodes to."""
    for variable in variables:
        values = variable.numpy()
        if fits_half(values):
            variable.assign(values.astype(np.float16).astype(np.float32))


def packed_tensors(model: tf.keras.Model, kernels: Mapping[str, Tuple[QuantizedKernel, tf.Variable]],
                   half_rest: bool) -> Dict[str, PackedTensor]:
    """The packed file's tensors: every quantized kernel, plus the other float tensors in float16."""
    packed = {variable.name: kernel.packed(variable.numpy()) for kernel, variable in kernels.values()}
    if half_rest:
        for variable in rest_variables(model, [v for _, v in kernels.values()]):
            values = variable.numpy()
            if fits_half(values) and variable.name not in packed:
                packed[variable.name] = half_tensor(values)
    return packed


def artifact_bytes(model: tf.keras.Model, kernels: Mapping[str, Tuple[QuantizedKernel, tf.Variable]],
                   half_rest: bool) -> int:
    """Exact size of the file ``write_artifact`` would write (built in memory)."""
    return len(packed_bytes(model, packed_tensors(model, kernels, half_rest)))


def write_artifact(model: tf.keras.Model, kernels: Mapping[str, Tuple[QuantizedKernel, tf.Variable]],
                   path: Path, half_rest: bool) -> int:
    """Write the codebook file; returns its size in bytes."""
    return write_packed(model, packed_tensors(model, kernels, half_rest), Path(path))


def load_artifact(path: Path, custom_objects: Optional[Dict[str, Any]] = None) -> tf.keras.Model:
    """The Keras model a codebook file holds, with its weights decoded to float."""
    return load_packed(Path(path), custom_objects)


def artifact_to_tflite(path: Path, output: Path, mode: str = "float",
                       representative: Optional[np.ndarray] = None) -> int:
    """A TFLite file of the decoded model; returns its size in bytes."""
    return packed_to_tflite(Path(path), Path(output), mode, representative)
