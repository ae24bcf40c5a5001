"""product-quant: product quantization of convolution and dense kernels (Stock et al. 2019,
"And the Bit Goes Down: Revisiting the Quantization of Neural Networks").

Every kernel is cut into sub-vectors of ``block`` input-side weights (block 9 on a 3x3
convolution: one spatial kernel per input/output channel pair) and each layer gets a codebook of
k = 2**b sub-vectors, so a sub-vector costs b bits plus its share of the float16 codebook.
Layers are quantized one after the other from the input: for each, H = x~^T x~ and G = x~^T y are
sampled (x~ the layer's inputs in the partly quantized model, y the *baseline's* outputs), the
kernel is re-fitted to y (least squares), and the codebook is fitted by EM in the metric of H,
i.e. to reconstruct the layer's output activations rather than its weights (``objective:
weights`` gives plain k-means on the weights, for comparison). The optimizer chooses the block
size and each layer's b under the file-size budget of ``--target-compression`` (or the
bits-per-weight of ``--target-bits``, codebooks included). The winner's codebooks are then
fine-tuned with the assignment fixed, distilled from the uncompressed model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from learners.base import Candidate, register_learner
from learners.nonuniform_quantization.activations import layer_statistics, supports_activations
from learners.nonuniform_quantization.artifact import QuantizedKernel
from learners.nonuniform_quantization.clustering import fit_bits_to_bytes
from learners.nonuniform_quantization.codebooks import (Layout, block_metrics, fitting_block, input_major_perm,
                                                        kmeans_plus_plus, weighted_kmeans)
from learners.nonuniform_quantization.common import SIZE_MARGIN, CodebookLearner, CodebookState
from learners.weight_sparsification.masks import PrunableWeight, variables_by_key
from pocketflow.config import AT_LEAST_0, AT_LEAST_1, RATE_FRACTION, check_fields
from pocketflow.errors import ConfigError

log = logging.getLogger(__name__)

SEARCH = "search"
DEFAULT_BLOCK = 9


@dataclass(frozen=True)
class ProductQuantConfig:
    """Hyperparameters of product quantization. 'search' lets the optimizer choose."""

    block_size: Union[int, Literal["search"]] = SEARCH  # sub-vector length (a layer uses its largest divisor <= it)
    block_choices: Tuple[int, ...] = (4, 8, 9, 16, 18)  # what the optimizer chooses from
    mode: Literal["searched", "uniform"] = "searched"  # uniform: the same proposal for every layer
    min_bits: int = 1  # per-layer index bits (2**bits centroids) the optimizer may choose from ...
    max_bits: int = 8  # ... up to this (and never more centroids than sub-vectors)
    objective: Literal["activations", "weights"] = "activations"  # what the codebook reconstructs
    samples: int = 256  # training images whose activations fit the codebooks
    rows: int = 8192  # sampled output positions per layer
    refit: bool = True  # re-fit each kernel to the baseline's outputs before quantizing it
    ridge: float = 1e-3  # of the re-fit, relative to the mean input energy
    iterations: int = 20  # EM iterations per layer
    recovery_epochs: float = 0.0  # distilled codebook training of every candidate before it is scored
    # BatchNorm statistics after quantizing and after training: keep them, re-estimate them on training
    # batches ("recalibrate"), or score both on validation images and keep the better ("auto").
    batchnorm: Literal["auto", "keep", "recalibrate"] = "auto"
    calibration_batches: int = 20  # training batches that re-estimate BatchNorm statistics
    selection_samples: int = 1000  # validation images that decide "auto"
    distill: bool = True  # fine-tune from the uncompressed model's outputs (when the run passes no teacher)
    finetune_learning_rate: float = 0.1  # fine-tuning rate as a fraction of the net's from-scratch rate
    half_precision_rest: bool = True  # biases and BatchNorm stored as float16 in the shipped file

    def __post_init__(self) -> None:
        if self.block_size != SEARCH and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ConfigError(f"product-quant.block_size = {self.block_size!r} is out of range: it must be a "
                              f"whole number >= 1 or 'search'")
        if not self.block_choices or any(b < 1 for b in self.block_choices):
            raise ConfigError(f"product-quant.block_choices = {list(self.block_choices)} must be a non-empty list "
                              f"of whole numbers >= 1")
        if not 1 <= self.min_bits <= self.max_bits <= 12:
            raise ConfigError(f"product-quant.min_bits = {self.min_bits}, max_bits = {self.max_bits} are out of "
                              f"range: they must satisfy 1 <= min_bits <= max_bits <= 12")
        check_fields("product-quant", self, {
            "samples": AT_LEAST_1, "rows": AT_LEAST_1, "selection_samples": AT_LEAST_1, "iterations": AT_LEAST_0,
            "ridge": AT_LEAST_0, "recovery_epochs": AT_LEAST_0, "calibration_batches": AT_LEAST_0,
            "finetune_learning_rate": RATE_FRACTION})


@dataclass(frozen=True)
class ProductHyperparameters:
    block: int
    proposed: Mapping[str, float]
    bits: Mapping[str, int]


def product_layout(weight: PrunableWeight, block: int) -> Layout:
    """Rows = input channel then kernel position, columns = output channels; the layer's block is
    the largest divisor of its rows that is at most ``block``."""
    depthwise = weight.attribute == "depthwise_kernel"
    perm = input_major_perm(weight.shape, depthwise=depthwise)
    columns = weight.shape[perm[-1]] if len(weight.shape) > 1 else 1
    rows = weight.size // columns
    return Layout(tuple(weight.shape), perm, fitting_block(rows, block))


@register_learner
class ProductQuantLearner(CodebookLearner):
    name = "product-quant"
    Config = ProductQuantConfig
    artifact_stem = "model_pq"
    shipped_format = "product-quantized file (bit-packed sub-vector indices + float16 codebooks; other tensors float16)"
    half_table = True
    example_compression = 15

    # ------------------------------------------------------------------ geometry
    def _blocks(self) -> Tuple[int, ...]:
        return tuple(self.options.block_choices) if self.options.block_size == SEARCH else (self.options.block_size,)

    def _layouts(self, block: int) -> Dict[str, Layout]:
        return {w.key: product_layout(w, block) for w in self._weights}

    def layout(self, weight: PrunableWeight, hparams: Any) -> Layout:
        return product_layout(weight, hparams.block)

    def bits_of(self, bits: Mapping[str, int], layouts: Mapping[str, Layout]) -> float:
        """Bits per weight of the quantized kernels, codebooks included (what PQ really costs)."""
        total = sum(layouts[k].size for k in bits)
        return 8.0 * sum(self.layer_cost(layouts[k], b) for k, b in bits.items()) / total

    def _ranges(self, layouts: Mapping[str, Layout]) -> Dict[str, tuple]:
        return {w.key: self.bit_range(w, layouts[w.key]) for w in self._weights}

    # ------------------------------------------------------------------ targets
    def _budget(self, layouts: Mapping[str, Layout], block: int) -> Optional[float]:
        """Bytes the codes and codebooks may take, from every requested target."""
        budgets = []
        if self.context.target.bits is not None:
            budgets.append(self.context.target.bits * self.total / 8.0)
        limit = self._target_bytes()
        if limit is not None:
            budgets.append(limit * (1.0 - SIZE_MARGIN) - self.overhead(layouts, block))
        return min(budgets) if budgets else None

    def allocate(self, proposed: Mapping[str, float], block: int) -> Dict[str, int]:
        layouts = self._layouts(block)
        ranges = self._ranges(layouts)
        low = {k: r[0] for k, r in ranges.items()}
        high = {k: r[1] for k, r in ranges.items()}
        budget = self._budget(layouts, block)
        if budget is None:
            return {k: int(min(high[k], max(low[k], round(p)))) for k, p in proposed.items()}
        fitted = fit_bits_to_bytes(proposed, self.costs(layouts), budget, low, high)
        return fitted if fitted is not None else dict(low)  # infeasible: the candidate misses the target

    def reachable(self) -> Dict[str, float]:
        self._prepare_targets()
        best: Dict[str, float] = {}
        for block in self._blocks():
            layouts = self._layouts(block)
            lowest = {k: r[0] for k, r in self._ranges(layouts).items()}
            bits = self.bits_of(lowest, layouts)
            best["bits"] = min(best.get("bits", bits), bits)
            if self.context.target.compression is not None:
                ratio = self._baseline_float_bytes() / self.predicted_bytes(lowest, layouts, block)
                best["compression"] = max(best.get("compression", ratio), ratio)
        return best

    # ------------------------------------------------------------------ search space
    def search_space(self, trial: Any) -> ProductHyperparameters:
        self._require_prepared()
        block = self.options.block_size
        if block == SEARCH:
            block = int(trial.suggest_categorical("block_size", list(self.options.block_choices)))
        if self.options.mode == "uniform":
            proposed = {w.key: float(self.options.max_bits) for w in self._weights}
        else:
            proposed = {w.key: trial.suggest_float(f"bits_{w.key}", float(self.options.min_bits),
                                                   float(self.options.max_bits)) for w in self._weights}
        return ProductHyperparameters(block=block, proposed=proposed, bits=self.allocate(proposed, block))

    def reference_params(self) -> Dict[str, Any]:
        """Block 9 (one 3x3 spatial kernel, the paper's choice) and the same proposal for every layer."""
        params: Dict[str, Any] = {}
        if self.options.block_size == SEARCH:
            choices = list(self.options.block_choices)
            params["block_size"] = DEFAULT_BLOCK if DEFAULT_BLOCK in choices else choices[0]
        if self.options.mode != "uniform":
            params.update({f"bits_{w.key}": float(self.options.max_bits) for w in self._weights})
        return params

    def max_trials(self) -> Optional[int]:
        if self.options.mode == "uniform":
            return len(self._blocks())
        return None

    # ------------------------------------------------------------------ candidates
    def compress(self, hparams: ProductHyperparameters) -> Candidate:
        model = self.baseline
        work = self._working_copy()
        variables = variables_by_key(work, self._weights)
        baseline_variables = variables_by_key(model, self._weights)
        images = None
        if self.options.objective == "activations":
            images = self.context.dataset.sample_train(self.options.samples, seed=self.context.seed)
        kernels, errors, weight_space = {}, {}, []
        for index, weight in enumerate(self._weights):
            layout = self.layout(weight, hparams)
            bits = int(hparams.bits[weight.key])
            kernel, codes, error = self.quantize_layer(model, work, weight, layout, bits,
                                                       baseline_variables[weight.key].numpy(), images,
                                                       seed=self.context.seed + index)
            variables[weight.key].assign(kernel)
            kernels[weight.key] = (QuantizedKernel(weight.key, layout, bits, codes, half_table=True),
                                   variables[weight.key])
            if error is None:
                weight_space.append(weight.key)
            else:
                errors[weight.key] = round(error, 5)
        notes = {"block_size": hparams.block, "objective": self.options.objective,
                 "layer_output_error": errors, "weight_space_layers": weight_space}
        candidate = Candidate(work, hparams, state=CodebookState(kernels, hparams, notes))
        self._settle_batchnorm(candidate, "quantized")
        self._recover(candidate, self.options.recovery_epochs, "recovery",
                      teacher=self.default_teacher(None))
        return candidate

    def quantize_layer(self, baseline: tf.keras.Model, work: tf.keras.Model, weight: PrunableWeight, layout: Layout,
                       bits: int, kernel: np.ndarray, images: Optional[np.ndarray],
                       seed: int = 0) -> Tuple[np.ndarray, np.ndarray, Optional[float]]:
        """(quantized kernel, codes, relative output error or None when fitted in weight space)."""
        statistics = None
        if images is not None and "/" not in weight.layer_path:
            layer = work.get_layer(weight.layer_path)
            if supports_activations(layer) and weight.attribute == "kernel":
                statistics = layer_statistics(baseline, work, weight.layer_path, layout, kernel, images,
                                              self.options.rows, seed=seed)
        target = kernel
        if statistics is not None and self.options.refit:
            target = layout.from_matrix(statistics.refit(self.options.ridge))
        subvectors = layout.subvectors(target).astype(np.float64)
        metrics = block_metrics(statistics.gram if statistics is not None else None, layout)
        k = 1 << bits
        codebook, codes = weighted_kmeans(subvectors, metrics, k, columns=layout.columns,
                                          iterations=self.options.iterations, seed=seed,
                                          init=kmeans_plus_plus(subvectors, k, seed))
        quantized = layout.assemble(codebook[codes]).astype(np.float32)
        error = statistics.error(layout.matrix(quantized).astype(np.float64)) if statistics is not None else None
        return quantized, codes, error
