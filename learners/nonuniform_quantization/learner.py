"""non-uniform: weight sharing with a codebook of 2**b centroids per layer (PocketFlow's
NonUniformQuantLearner, Han et al.'s Deep Compression weight sharing).

The optimizer proposes a bit width per kernel (and the codebook initialization, unless it is
fixed); the proposal is projected onto ``--target-bits`` (parameter-weighted average code bits,
``learners.bit_budget.project_bits``; the file may not grow beyond the uniform allocation's, so
256-entry codebooks on tiny layers cannot eat the savings) and/or ``--target-compression`` (the
bytes of the shipped file, planned from exact per-layer costs and measured on the real file).
A candidate is the baseline with every kernel replaced by its nearest centroid (initialization,
then Lloyd iterations), BatchNorm statistics kept or re-estimated (whichever scores better on
validation images), and a short recovery that trains the centroids, distilled from the baseline;
the search scores it on the validation split. The winner gets the same cluster fine-tuning for
``--finetune-epochs``. Training keeps the codes fixed (only the centroids move) or, with
``assignment: adaptive``, trains a full-precision shadow of every kernel straight-through and
re-clusters it after each step, so a weight can change cluster. What ships is the packed file: bit-packed
indices + float32 codebooks (+ the other tensors in float16); ``load_artifact`` gives it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, Optional

import numpy as np
import optuna

from learners.base import Candidate, register_learner
from learners.bit_budget import project_bits
from learners.nonuniform_quantization.artifact import QuantizedKernel
from learners.nonuniform_quantization.clustering import fit_bits_to_bytes, weighted_average
from learners.nonuniform_quantization.codebooks import INITS, Layout, scalar_codebook, scalar_layout
from learners.nonuniform_quantization.common import SIZE_MARGIN, CodebookLearner, CodebookState
from learners.weight_sparsification.masks import PrunableWeight, variables_by_key
from pocketflow.config import AT_LEAST_0, AT_LEAST_1, RATE_FRACTION, check_fields
from pocketflow.errors import ConfigError

log = logging.getLogger(__name__)

SEARCH = "search"


@dataclass(frozen=True)
class NonUniformConfig:
    """Hyperparameters of non-uniform (codebook) quantization. 'search' lets the optimizer choose."""

    init: Literal["linear", "quantile", "kmeans++", "search"] = "search"  # codebook initialization
    mode: Literal["searched", "uniform"] = "searched"  # uniform: every kernel at the target bits
    min_bits: int = 1  # per-layer code bits the optimizer may choose from ...
    max_bits: int = 8  # ... up to this
    kmeans_iterations: int = 20  # Lloyd iterations after the initialization
    recovery_epochs: float = 0.1  # cluster training of every candidate before it is scored
    # BatchNorm statistics after quantizing and after training: keep them, re-estimate them on training
    # batches ("recalibrate"), or score both on validation images and keep the better ("auto").
    batchnorm: Literal["auto", "keep", "recalibrate"] = "auto"
    calibration_batches: int = 20  # training batches that re-estimate BatchNorm statistics
    selection_samples: int = 1000  # validation images that decide "auto"
    finetune_learning_rate: float = 0.1  # fine-tuning rate as a fraction of the net's from-scratch rate
    distill: bool = True  # fine-tune from the uncompressed model's outputs (when the run passes no teacher)
    # codes during training: "fixed" (the clustering's, only the centroids train) or "adaptive" (a full-
    # precision shadow of each kernel trains straight-through and is re-clustered after every step;
    # much better at 2 bits on ResNet-20, worse on the digits net at 4 bits, so not the default)
    assignment: Literal["fixed", "adaptive"] = "fixed"
    half_precision_rest: bool = True  # biases and BatchNorm stored as float16 in the shipped file

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits <= 8:
            raise ConfigError(f"non-uniform.min_bits = {self.min_bits}, max_bits = {self.max_bits} are out of "
                              f"range: they must satisfy 1 <= min_bits <= max_bits <= 8")
        check_fields("non-uniform", self, {
            "kmeans_iterations": AT_LEAST_0, "recovery_epochs": AT_LEAST_0, "selection_samples": AT_LEAST_1,
            "calibration_batches": AT_LEAST_0, "finetune_learning_rate": RATE_FRACTION})


@dataclass(frozen=True)
class NonUniformHyperparameters:
    init: str
    proposed: Mapping[str, float]  # the optimizer's bits per kernel (the allocation's shape)
    bits: Mapping[str, int]  # after projection onto the target


@register_learner
class NonUniformLearner(CodebookLearner):
    name = "non-uniform"
    Config = NonUniformConfig
    artifact_stem = "model_codebook"
    shipped_format = "codebook file (bit-packed indices + float32 codebooks; other tensors float16)"
    example_compression = 8

    # ------------------------------------------------------------------ geometry
    def layout(self, weight: PrunableWeight, hparams: Any = None) -> Layout:
        return scalar_layout(weight.shape)

    def _layouts(self) -> Dict[str, Layout]:
        return {w.key: self.layout(w) for w in self._weights}

    def _sizes(self) -> Dict[str, int]:
        return {w.key: w.size for w in self._weights}

    def bits_of(self, bits: Mapping[str, int], layouts: Mapping[str, Layout]) -> float:
        """Parameter-weighted average code bits (codebooks are not counted, as in PocketFlow)."""
        sizes = {key: layouts[key].size for key in bits}
        return weighted_average(bits, sizes)

    def _ranges(self, layouts: Mapping[str, Layout]) -> Dict[str, tuple]:
        return {w.key: self.bit_range(w, layouts[w.key]) for w in self._weights}

    # ------------------------------------------------------------------ targets
    def allocate(self, proposed: Mapping[str, float]) -> Dict[str, int]:
        """Bits per kernel for the proposal: projected onto --target-bits, then fitted to the bytes of
        --target-compression (never more bits than the bit projection gave)."""
        layouts = self._layouts()
        ranges = self._ranges(layouts)
        low = {k: r[0] for k, r in ranges.items()}
        high = {k: r[1] for k, r in ranges.items()}
        bits: Optional[Dict[str, int]] = None
        budgets = []
        costs = self.costs(layouts)
        target = self.context.target
        if target.bits is not None:
            bits = self._project(proposed, target.bits, high)
            # Codebooks are not counted in the bits, so a few small layers at 8 bits (256-entry tables)
            # could cost more bytes than their bits say: the file may not outgrow the uniform allocation's.
            uniform = self._project({k: float(target.bits) for k in proposed}, target.bits, high)
            budgets.append(sum(costs[k][b] for k, b in uniform.items()))
        limit = self._target_bytes()
        if limit is not None:
            budgets.append(limit * (1.0 - SIZE_MARGIN) - self.overhead(layouts))
        if budgets:
            ceiling = high if bits is None else bits
            fitted = fit_bits_to_bytes(proposed, costs, min(budgets), low, ceiling)
            bits = fitted if fitted is not None else dict(low)  # infeasible: the candidate misses the target
        if bits is None:
            bits = {k: int(min(high[k], max(low[k], round(p)))) for k, p in proposed.items()}
        return bits

    def _project(self, proposed: Mapping[str, float], budget: float, high: Mapping[str, int]) -> Dict[str, int]:
        projected = project_bits(proposed, self._sizes(), budget, low=self.options.min_bits, high=self.options.max_bits)
        return {k: min(b, high[k]) for k, b in projected.items()}

    def reachable(self) -> Dict[str, float]:
        self._prepare_targets()
        layouts = self._layouts()
        lowest = {k: r[0] for k, r in self._ranges(layouts).items()}
        reached = {"bits": self.bits_of(lowest, layouts)}
        if self.context.target.compression is not None:
            reached["compression"] = self._baseline_float_bytes() / self.predicted_bytes(lowest, layouts)
        return reached

    # ------------------------------------------------------------------ search space
    def _uniform_proposal(self) -> float:
        target = self.context.target.bits
        return float(target) if target is not None else float(self.options.max_bits)

    def search_space(self, trial: Any) -> NonUniformHyperparameters:
        self._require_prepared()
        init = self.options.init
        if init == SEARCH:
            init = trial.suggest_categorical("init", list(INITS))
        if self.options.mode == "uniform":
            proposed = {w.key: self._uniform_proposal() for w in self._weights}
        else:
            proposed = {w.key: trial.suggest_float(f"bits_{w.key}", float(self.options.min_bits),
                                                   float(self.options.max_bits)) for w in self._weights}
        return NonUniformHyperparameters(init=init, proposed=proposed, bits=self.allocate(proposed))

    def reference_params(self) -> Dict[str, Any]:
        """Every kernel at the same width (the target's) with k-means++ codebooks: the classic recipe."""
        params: Dict[str, Any] = {}
        if self.options.init == SEARCH:
            params["init"] = "kmeans++"
        if self.options.mode != "uniform":
            value = min(self.options.max_bits, max(self.options.min_bits, self._uniform_proposal()))
            params.update({f"bits_{w.key}": value for w in self._weights})
        return params

    def expected_bytes(self) -> Optional[int]:
        """The codebook file at the reference widths, predicted exactly (codes, codebooks, the rest)."""
        hparams = self.search_space(optuna.trial.FixedTrial(self.reference_params()))
        return self.predicted_bytes(hparams.bits, self._layouts())

    def max_trials(self) -> Optional[int]:
        if self.options.mode == "uniform":
            return len(INITS) if self.options.init == SEARCH else 1
        return None

    # ------------------------------------------------------------------ candidates
    def compress(self, hparams: NonUniformHyperparameters) -> Candidate:
        work = self._working_copy()
        variables = variables_by_key(work, self._weights)
        kernels = {}
        for index, weight in enumerate(self._weights):
            variable = variables[weight.key]
            bits = int(hparams.bits[weight.key])
            centroids, codes = scalar_codebook(variable.numpy(), bits, hparams.init, self.options.kmeans_iterations,
                                               seed=self.context.seed + index)
            variable.assign(centroids[codes].reshape(weight.shape).astype(np.float32))
            kernels[weight.key] = (QuantizedKernel(weight.key, self.layout(weight), bits, codes), variable)
        candidate = Candidate(work, hparams, state=CodebookState(kernels, hparams, {"init": hparams.init}))
        self._settle_batchnorm(candidate, "quantized")
        self._recover(candidate, self.options.recovery_epochs, "recovery", teacher=self.default_teacher(None))
        return candidate
