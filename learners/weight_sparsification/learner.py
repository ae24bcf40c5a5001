"""weight-sparse: magnitude pruning of individual weights, sparsity allocated per layer by the
search, shipped in a file that is really smaller.

The optimizer proposes a relative density per prunable kernel (and which end layers to keep
dense); the densities are scaled together (bisection on a common factor, then exact integer
rounding) so the total number of zeros meets ``--target-sparsity`` exactly, or the predicted
shipped file meets ``--target-compression`` (checked on the real file). A candidate is the
baseline with one-shot magnitude masks, a short recovery with the masks fixed and BatchNorm
statistics re-estimated; the search scores it on the validation split. The winner is then trained again from the dense baseline
with gradual pruning (Zhu & Gupta's cubic schedule) and shipped as sparse TFLite or our
sparse container, whichever is smaller (``format``). Masks are our own (no TFMOT wrappers),
so any functional model works, Reshape/Permute glue included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from learners.base import Candidate, Learner, register_learner
from learners.distillation import Distiller, distillation_loss
from learners.weight_sparsification import artifact
from learners.weight_sparsification.artifact import SizeModel, ceil_zeros, solve_zeros
from learners.weight_sparsification.masks import (
    PATTERNS, MaskSet, PrunableWeight, allocate, compute_masks, density_bounds, prunable_weights, save_masks,
    variables_by_key,
)
from learners.weight_sparsification.schedule import FixedMasks, GradualPruning
from pocketflow.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, RATE_FRACTION, TargetConfig, check_fields
from pocketflow.errors import ConfigError
from pocketflow.training import from_trained, recalibrate_batchnorm, train, training_steps

log = logging.getLogger(__name__)

PROTECT_CHOICES = ("none", "first", "last", "both")
# With full-integer int8, fully-connected kernels stay dense while they hold at most this share of the weights
FULLY_CONNECTED_SHARE = 0.1
SIZE_MARGIN = 0.005  # solve compression targets for 0.5% below the byte budget
MIN_PROPOSED_DENSITY = 0.05
VERIFY_ATTEMPTS = 4
YAML_2_4 = 2 * 60 + 4  # YAML 1.1 reads an unquoted 2:4 as a base-60 integer


@dataclass(frozen=True)
class WeightSparseConfig:
    """Hyperparameters of weight sparsification. 'search' lets the optimizer choose."""

    mode: Literal["searched", "uniform"] = "searched"  # uniform: every pruned tensor at one sparsity
    # 2:4: every group of 4 consecutive input-channel weights has >= 2 zeros (exactly 2 at 50%).
    # (An unquoted 2:4 in YAML reads as the base-60 number 124; it is accepted as "2:4".)
    pattern: Union[Literal["unstructured", "2:4"], int] = "unstructured"
    bits: Optional[int] = None  # 8: ship int8 values (sparse TFLite int8 / int8 container); None: float32
    # with bits=8: full-integer (calibrated) or dynamic-range TFLite; full: as accurate, as fast or faster
    int8_mode: Literal["dynamic", "full"] = "full"
    # What ships. auto: the smaller of the sparse TFLite file and the container; fast: of the sparse TFLite
    # file and the dense one (same weights), the one that runs fastest here (measured; the smaller within 5%)
    format: Literal["auto", "tflite", "container", "fast"] = "auto"
    protect: Literal["none", "first", "last", "both", "search"] = "search"  # end layers kept dense
    max_layer_sparsity: float = 0.98  # no tensor loses more than this fraction
    recovery_epochs: float = 0.25  # training (masks fixed) of every candidate before it is scored
    # Batches whose mean statistics replace BatchNorm's moving averages after pruning (candidates
    # and the final model): without it a one-shot candidate is scored with stale statistics.
    calibration_batches: int = 20
    finetune: Literal["gradual", "oneshot"] = "gradual"  # the winner: gradual pruning from the baseline
    # Fine-tuning learning rate as a fraction of the net's from-scratch rate (0.1: as other learners).
    finetune_learning_rate: float = 0.1
    begin: float = 0.0  # gradual pruning starts at this fraction of the fine-tuning steps ...
    end: float = 0.5  # ... reaches the final sparsity here, then trains with fixed masks
    frequency: int = 10  # optimizer steps between mask updates
    power: float = 3.0  # exponent of the polynomial schedule (3: Zhu & Gupta)

    def __post_init__(self) -> None:
        if self.pattern == YAML_2_4:
            object.__setattr__(self, "pattern", "2:4")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"weight-sparse.pattern = {self.pattern!r} is not allowed; choose one of: "
                              f"{', '.join(PATTERNS)} (quote it in YAML: '2:4')")
        if self.bits is not None and self.bits != 8:
            raise ConfigError(f"weight-sparse.bits = {self.bits} is out of range: it must be 8 or null "
                              f"(lower bit widths are the quantization learners' job)")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ConfigError(f"weight-sparse.max_layer_sparsity = {self.max_layer_sparsity} is out of range: "
                              f"it must be in (0, 1)")
        check_fields("weight-sparse", self, {
            "recovery_epochs": AT_LEAST_0, "calibration_batches": AT_LEAST_0,
            "finetune_learning_rate": RATE_FRACTION, "frequency": AT_LEAST_1, "power": POSITIVE})
        if not 0.0 <= self.begin <= self.end <= 1.0:
            raise ConfigError(f"weight-sparse.begin = {self.begin}, end = {self.end} are out of range: they "
                              f"must satisfy 0 <= begin <= end <= 1 (fractions of the fine-tuning steps)")


@dataclass(frozen=True)
class SparseHyperparameters:
    protect: str  # none | first | last | both
    densities: Mapping[str, float]  # proposed relative densities (the allocation's shape)
    zeros: Mapping[str, int]  # zeros per tensor after projection onto the target


@dataclass
class _Candidate:
    zeros: Dict[str, int]
    shipped_bytes: Optional[int] = None


@register_learner
class WeightSparseLearner(Learner):
    name = "weight-sparse"
    Config = WeightSparseConfig
    targets = ("sparsity", "compression")
    pareto_cost = None  # its candidates all sit at the target; a size front would need the sparsity searched

    def __init__(self, options: WeightSparseConfig, context) -> None:
        super().__init__(options, context)
        self._weights: List[PrunableWeight] = []
        self._sizes: Optional[SizeModel] = None
        self._work: Optional[tf.keras.Model] = None  # the one working copy every candidate lives in
        self._masks: Optional[MaskSet] = None
        self._current: Optional[_Candidate] = None
        self._solved: Dict[Tuple, Dict[str, int]] = {}
        self._baseline_bytes: Optional[int] = None

    @classmethod
    def check_target(cls, target: TargetConfig) -> None:
        super().check_target(target)
        if not target.requested():
            raise ConfigError("learner 'weight-sparse' needs a target: pass --target-sparsity S (e.g. 0.8) or "
                              "--target-compression R (e.g. 4)")

    # ------------------------------------------------------------------ analysis
    def prepare(self, baseline: tf.keras.Model) -> List[PrunableWeight]:
        if self._baseline is not baseline:
            super().prepare(baseline)
            self._weights = prunable_weights(baseline)
            if not self._weights:
                raise ConfigError("the model has no prunable weights (Conv/Dense kernels); weight-sparse has "
                                  "nothing to do")
            self._sizes = SizeModel(self._weights, self.options.bits, self.options.int8_mode)
            kept = self._fully_connected_kept_dense()
            if kept:
                log.info("weight-sparse: %s stay%s dense (XNNPACK refuses an int8 file with sparse fully-connected "
                         "weights)", ", ".join(kept), "s" if len(kept) == 1 else "")
            elif self.options.bits == 8 and self.options.int8_mode == "full" and any(
                    len(w.shape) == 2 for w in self._weights):
                log.warning("weight-sparse: the fully-connected layers hold most of the weights, so they are pruned; "
                            "XNNPACK refuses an int8 file with sparse fully-connected weights, so the sparse TFLite "
                            "file will run on the reference kernels (weight-sparse.format=fast ships the faster file)")
            # One clone per run: candidates reuse it (baseline weights, new masks), so Keras does
            # not rebuild the graph and retrace its predict function for every trial.
            self._work = tf.keras.models.clone_model(baseline)
            self._work.set_weights(baseline.get_weights())
            self._masks = MaskSet(variables_by_key(self._work, self._weights),
                                  {w.key: np.ones(w.shape, bool) for w in self._weights})
            self._current = None
            self._solved.clear()
            log.info("weight-sparse: %d prunable kernels, %s weights", len(self._weights),
                     f"{self.total:,}")
        return self._weights

    @property
    def total(self) -> int:
        return sum(w.size for w in self._weights)

    def _protected(self, protect: str) -> Tuple[str, ...]:
        keys = [w.key for w in self._weights]
        chosen = {"none": [], "first": keys[:1], "last": keys[-1:], "both": keys[:1] + keys[-1:]}[protect]
        return tuple(dict.fromkeys(chosen + self._fully_connected_kept_dense()))

    def _fully_connected_kept_dense(self) -> List[str]:
        """The fully-connected kernels kept dense: XNNPACK (LiteRT 2.3) refuses a whole int8 file that has any
        sparse fully-connected weights, which leaves every op on the reference kernels (ResNet-20: 0.897 ms
        against 0.315 ms; docs/learners.md, "Which sparse files run fast"). So with full-integer int8 they stay
        dense where they are a small part of the weights (a CNN's classifier); where they are most of them
        (an MLP) keeping them would leave little to prune, and the file runs on the reference kernels."""
        if self.options.bits != 8 or self.options.int8_mode != "full":
            return []
        connected = [w for w in self._weights if len(w.shape) == 2]
        if sum(w.size for w in connected) > FULLY_CONNECTED_SHARE * self.total:
            return []
        return [w.key for w in connected]

    def _bounds(self, protect: str) -> Tuple[int, int]:
        """(fewest, most) total zeros reachable with this protection."""
        protected = self._protected(protect)
        pairs = [density_bounds(w, self.options.pattern, self.options.max_layer_sparsity, w.key in protected)
                 for w in self._weights]
        return (sum(w.size - most for w, (_, most) in zip(self._weights, pairs)),
                sum(w.size - fewest for w, (fewest, _) in zip(self._weights, pairs)))

    def _searchable(self) -> List[str]:
        fixed = self._protected(self.options.protect) if self.options.protect != "search" else ()
        return [w.key for w in self._weights if w.key not in fixed and
                not (self.options.pattern == "2:4" and not w.groupable)]

    # ------------------------------------------------------------------ targets
    def _target_bytes(self) -> Optional[float]:
        ratio = self.context.target.compression
        if ratio is None:
            return None
        if self._baseline_bytes is None:
            self._baseline_bytes = self.context.distributed.broadcast_object(self.context.baseline_tflite_bytes)
        if not self._baseline_bytes:
            raise ConfigError("--target-compression needs the baseline's float TFLite size; do not pass "
                              "--export none with this target")
        if self.options.format == "fast":
            raise ConfigError("weight-sparse.format = fast ships whichever file runs fastest, so its size is not "
                              "known while searching; with --target-compression use format auto, tflite or "
                              "container (or give --target-sparsity)")
        return self._baseline_bytes / ratio

    def _kinds(self) -> Tuple[str, ...]:
        return {"auto": ("tflite", "container"), "tflite": ("tflite",), "container": ("container",),
                "fast": ("tflite", "dense")}[self.options.format]

    def _allocation(self, densities: Mapping[str, float], protect: str, zeros: int) -> Dict[str, int]:
        return allocate(self._weights, densities, zeros, pattern=self.options.pattern,
                        max_sparsity=self.options.max_layer_sparsity, protected=self._protected(protect))

    def solve(self, densities: Mapping[str, float], protect: str) -> Dict[str, int]:
        """Zeros per tensor for the proposal: the fewest that meet every requested target."""
        fewest, most = self._bounds(protect)
        needed = fewest
        if self.context.target.sparsity is not None:
            needed = max(needed, ceil_zeros(self.context.target.sparsity, self.total))
        limit = self._target_bytes()
        if limit is not None:
            budget = limit * (1.0 - SIZE_MARGIN)

            def predicted(zeros: int) -> float:
                allocation = self._allocation(densities, protect, zeros)
                return min(self._sizes.predict(kind, allocation) for kind in self._kinds())

            solved = solve_zeros(predicted, budget, needed, most)
            needed = most if solved is None else solved
        return self._allocation(densities, protect, min(needed, most))

    def reachable(self) -> Dict[str, float]:
        baseline = self.baseline
        self.prepare(baseline)
        protect = "none" if self.options.protect == "search" else self.options.protect
        _, most = self._bounds(protect)
        reached = {"sparsity": most / self.total}
        if self.context.target.compression is not None:
            limit = self._target_bytes()
            zeros = self._allocation({}, protect, most)
            shipped = self._measure_size(self._masked_copy(zeros), zeros)
            reached["compression"] = self._baseline_bytes / shipped
            log.info("weight-sparse: at most %.3f sparsity and %.2fx compression (%s bytes, target %s)",
                     reached["sparsity"], reached["compression"], f"{shipped:,}", f"{int(limit):,}")
        return reached

    # ------------------------------------------------------------------ search space
    def search_space(self, trial: Any) -> SparseHyperparameters:
        self.prepare(self.baseline)  # raises when prepare(baseline) never ran
        protect = self.options.protect
        if protect == "search":
            protect = trial.suggest_categorical("protect", list(PROTECT_CHOICES))
        if self.options.mode == "uniform":
            densities = {key: 1.0 for key in self._searchable()}
        else:
            densities = {key: trial.suggest_float(f"density_{key}", MIN_PROPOSED_DENSITY, 1.0)
                         for key in self._searchable()}
        zeros = self._solved.get(self._signature(densities, protect)) or self.solve(densities, protect)
        return SparseHyperparameters(protect=protect, densities=densities, zeros=zeros)

    def reference_params(self) -> Dict[str, Any]:
        """Uniform densities with both end layers dense: the classic recipe the search must beat."""
        params: Dict[str, Any] = {}
        if self.options.mode != "uniform":
            params.update({f"density_{key}": 0.5 for key in self._searchable()})
        if self.options.protect == "search":
            params["protect"] = "both"
        return params

    def max_trials(self) -> Optional[int]:
        if self.options.mode == "uniform":
            return len(PROTECT_CHOICES) if self.options.protect == "search" else 1
        return None

    @staticmethod
    def _signature(densities: Mapping[str, float], protect: str) -> Tuple:
        return (protect,) + tuple(sorted(densities.items()))

    # ------------------------------------------------------------------ candidates
    def _masked_copy(self, zeros: Mapping[str, int]) -> tf.keras.Model:
        """The working copy with the baseline's weights and magnitude masks for ``zeros`` applied.
        A candidate is valid until the next call (the runner fine-tunes the last one built)."""
        model = self.baseline
        self.prepare(model)
        self._work.set_weights(model.get_weights())
        self._masks.update(compute_masks(self._masks.variables, self._weights, zeros, self.options.pattern))
        self._masks.apply()
        self._current = _Candidate(dict(zeros))
        return self._work

    def _state(self, candidate: Candidate) -> Optional[_Candidate]:
        """The candidate's masks state while the working copy still holds it; None for a model not
        built here. A candidate that a later compress() replaced raises: its weights are gone."""
        if candidate.state is None:
            return None
        if candidate.state is not self._current:
            raise RuntimeError("weight-sparse keeps one candidate at a time in its working copy; this one was "
                               "replaced by a later compress()")
        return candidate.state

    def _quantized_names(self, model: tf.keras.Model) -> List[str]:
        return [v.name for v in variables_by_key(model, self._weights).values()]

    def _representative(self) -> Optional[np.ndarray]:
        if self.options.bits == 8 and self.options.int8_mode == "full":
            return self.context.dataset.sample_train(200, seed=self.context.seed)
        return None

    def _file_sizes(self, model: tf.keras.Model) -> Dict[str, int]:
        sizes = {}
        if "container" in self._kinds():
            sizes["container"] = len(artifact.container_bytes(model, self._quantized_names(model), self.options.bits))
        if "tflite" in self._kinds():
            sizes["tflite"] = len(artifact.sparse_tflite(model, self.options.bits, self.options.int8_mode,
                                                         self._representative()))
        return sizes

    def _measure_size(self, model: tf.keras.Model, zeros: Mapping[str, int]) -> int:
        """Bytes of the file that would ship (the smaller allowed format); calibrates the size model."""
        sizes = self._file_sizes(model)
        for kind, size in sizes.items():
            self._sizes.observe(kind, zeros, size)
        return min(sizes.values())

    def compress(self, hparams: SparseHyperparameters) -> Candidate:
        zeros = dict(hparams.zeros)
        candidate = self._masked_copy(zeros)
        limit = self._target_bytes()
        if limit is not None:
            signature = self._signature(hparams.densities, hparams.protect)
            for attempt in range(VERIFY_ATTEMPTS):
                shipped = self._measure_size(candidate, zeros)
                if shipped <= limit or attempt == VERIFY_ATTEMPTS - 1:
                    break
                log.debug("candidate file %d bytes > %d; recalibrated, solving again", shipped, limit)
                zeros = self.solve(hparams.densities, hparams.protect)
                candidate = self._masked_copy(zeros)
            self._current.shipped_bytes = shipped
            self._solved[signature] = zeros
        if self.options.recovery_epochs > 0:
            recovery = from_trained(self.context.schedule.with_epochs(self.options.recovery_epochs))
            hook = FixedMasks(self._masks)
            train(candidate, self.context.dataset, recovery, distributed=self.context.distributed,
                  seed=self.context.seed, after_step=hook, description="recovery")
            hook.finish()
        self._recalibrate(candidate)
        return Candidate(candidate, hparams, state=self._current)

    def _recalibrate(self, model: tf.keras.Model) -> None:
        recalibrate_batchnorm(model, self.context.dataset, self.options.calibration_batches,
                              self.context.schedule.batch_size, seed=self.context.seed)

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        model = candidate.model
        zeros = sum(int(np.sum(v.numpy() == 0)) for v in variables_by_key(model, self._weights).values())
        metrics = {"sparsity": zeros / self.total}
        if self.context.target.compression is not None:
            state = self._state(candidate)
            shipped = state.shipped_bytes if state and state.shipped_bytes else \
                self._measure_size(model, self._zeros_of(model))
            metrics["compression"] = self._baseline_bytes / shipped
        return metrics

    def _zeros_of(self, model: tf.keras.Model) -> Dict[str, int]:
        return {key: int(np.sum(v.numpy() == 0)) for key, v in variables_by_key(model, self._weights).items()}

    # ------------------------------------------------------------------ the winner
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Distiller] = None) -> Candidate:
        state, model = self._state(candidate), candidate.model
        if state is None:
            raise RuntimeError("finetune() takes a candidate compress() returned")
        schedule = replace(self.context.schedule, epochs=epochs,
                           learning_rate=self.context.schedule.learning_rate * self.options.finetune_learning_rate)
        if self.options.finetune == "gradual":
            model.set_weights(self._baseline.get_weights())  # start again from the dense baseline
            self._masks.update({w.key: np.ones(w.shape, bool) for w in self._weights})
            steps = training_steps(self.context.dataset, schedule, self.context.distributed.size)
            hook = GradualPruning(self._masks, self._weights, state.zeros, pattern=self.options.pattern,
                                  total_steps=steps, begin=self.options.begin, end=self.options.end,
                                  frequency=self.options.frequency, power=self.options.power)
            description = "gradual pruning"
            log.info("gradual pruning over %d steps: masks from step %d to %d, every %d steps", steps,
                     hook.begin_step, hook.end_step, hook.frequency)
        else:
            hook = FixedMasks(self._masks)
            description = "fine-tune"
        train(model, self.context.dataset, schedule, distributed=self.context.distributed,
              seed=self.context.seed, after_step=hook, loss_function=distillation_loss(teacher, model),
              description=description)
        hook.finish()
        self._recalibrate(model)
        return candidate

    def finalize(self, candidate: Candidate) -> Candidate:
        if self._state(candidate) is not None:
            self._masks.apply()
        return candidate

    def masks_of(self, candidate: Candidate) -> Dict[str, np.ndarray]:
        if self._state(candidate) is not None:
            return self._masks.numpy()
        return {key: v.numpy() != 0 for key, v in variables_by_key(candidate.model, self._weights).items()}

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        if not self._weights:
            return {}
        zeros = self._zeros_of(candidate.model)
        return {"sparsity": sum(zeros.values()) / self.total, "pattern": self.options.pattern,
                "prunable_weights": self.total,
                "layer_sparsity": {w.key: round(zeros[w.key] / w.size, 4) for w in self._weights}}

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """masks.npz, then both sparse files, each measured on the test split; the smaller allowed one ships."""
        model = candidate.model
        masks_path = Path(directory) / "masks.npz"
        save_masks(masks_path, self.masks_of(candidate))
        fields = artifact.write_sparse_files(
            model, Path(directory), self.context.dataset, bits=self.options.bits, int8_mode=self.options.int8_mode,
            quantize=self._quantized_names(model), representative=self._representative(), kinds=self._kinds(),
            fastest=self.options.format == "fast",
            measure=self.context.measure_file)
        fields["masks_path"] = str(masks_path)
        return fields
