"""uniform below 8 bits: per-layer 2..8-bit weights (mixed precision) under an average-bits budget,
shipped as a bit-packed file with per-channel scales.

The budget is the parameter-weighted average bits of the quantized kernels (Conv, Depthwise,
Separable, Dense; biases and BatchNorm stay float): ``--target-bits B``, ``uniform.bits``, or
the bits that make the packed file ``--target-compression`` times smaller than the float
TFLite (solved from the file's fixed part, checked on the real bytes). Each trial:

1. the optimizer proposes an allocation (``allocation``): ``sensitivity`` searches one power
   that blends uniform bits (0) with bits driven by each layer's measured sensitivity (KL of
   the predictions with only that layer quantized); ``free`` proposes every layer's bits
   (HAQ-style); either is projected exactly onto the budget (``learners.bit_budget``);
2. the kernels are quantized per channel (asymmetric or symmetric, clipping by least squared
   error), trained briefly with the straight-through estimator (``recovery_epochs``; BatchNorm
   frozen, or trained when distilling: ``UniformConfig.batchnorm``), and the candidate is scored on
   the validation split.

The first trial is uniform bits everywhere at the budget, so the search is never worse than
uniform quantization and the report shows both. The winner is fine-tuned with STE, then
written with ``learners.packing`` (BatchNorm folded into the scales and a bias, see ``fold``):
the shipped file, whose size on disk is the compression. Its loader rebuilds the Keras model;
a float TFLite of the decoded weights is measured (accuracy, latency), and an int8 TFLite
(8-bit activations, calibrated) of the same weights next to it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from learners.base import Candidate, Learner
from learners.bit_budget import average_bits, project_bits
from learners.distillation import Distiller, distillation_loss
from learners.packing import (PackedTensor, load_packed, packed_bytes, packed_size, packed_to_tflite,
                              write_packed)
from learners.uniform_quantization.allocation import (describe_bits, free_bits, measure_sensitivity, predict,
                                                      sensitivity_bits)
from learners.uniform_quantization.fold import FoldedPair, fold_weights, foldable_pairs, folded_model
from learners.uniform_quantization.options import DEFAULT_LOW_BITS, UniformConfig
from learners.uniform_quantization.lowbit import (SCHEMES, KernelSpec, ShadowQuantizer, kernel_specs, mse_ratios,
                                                  quantized_values)
from pocketflow.errors import ConfigError
from pocketflow.training import batchnorm_layers, outputs_probabilities, recalibrate_batchnorm, train

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model_lowbit.npz"
SIZE_MARGIN_BYTES = 64  # --target-compression: the packed file's metadata varies by a few bytes


@dataclass(frozen=True)
class MixedHyperparameters:
    scheme: str
    allocation: str
    power: Optional[float]  # the sensitivity power (allocation: sensitivity)
    bits: Mapping[str, int]  # per kernel, after projection onto the budget
    average_bits: float


@dataclass(eq=False)
class LowBitState:
    """Marks the candidate the working copy holds (compared by identity)."""

    hparams: MixedHyperparameters


class MixedPrecisionLearner(Learner):
    """The uniform learner's low-bit strategy (not registered: ``uniform`` hands runs to it)."""

    name = "uniform"
    Config = UniformConfig
    targets = ("bits", "compression")
    pareto_cost = "bytes"

    def __init__(self, options: UniformConfig, context) -> None:
        super().__init__(options, context)
        self._work: Optional[tf.keras.Model] = None  # the one working copy every candidate lives in
        self._specs: List[KernelSpec] = []
        self._sizes: Dict[str, int] = {}
        self._float_kernels: Dict[str, np.ndarray] = {}
        self._quantizer: Optional[ShadowQuantizer] = None
        self._pairs: List[FoldedPair] = []
        self._folded: Optional[tf.keras.Model] = None
        self._fixed_bytes = 0
        self._baseline_bytes = 0
        self._ratios: Dict[Tuple[str, int, str], np.ndarray] = {}
        self._sensitivity: Dict[str, Dict[str, float]] = {}
        self._current: Optional[LowBitState] = None

    # ------------------------------------------------------------------ analysis
    def prepare(self, baseline: tf.keras.Model) -> None:
        if self._baseline is baseline:
            return
        super().prepare(baseline)
        self._work = tf.keras.models.clone_model(baseline)
        self._work.set_weights(baseline.get_weights())
        self._specs = kernel_specs(self._work)
        if not self._specs:
            raise ConfigError("the model has no Conv/Dense kernels to quantize; the low-bit uniform learner has "
                              "nothing to do")
        self._sizes = {spec.key: int(spec.variable.shape.num_elements()) for spec in self._specs}
        self._float_kernels = {spec.key: spec.variable.numpy() for spec in self._specs}
        self._quantizer = ShadowQuantizer(self._specs)
        self._pairs = foldable_pairs(self._work) if self.options.fold_batchnorm else []
        self._folded = folded_model(self._work, self._pairs) if self._pairs else None
        self._fixed_bytes = self._measure_fixed_bytes()
        # the runner calls prepare on every rank at the same point: rank 0's measured size is shared
        self._baseline_bytes = int(self.context.distributed.broadcast_object(self.context.baseline_tflite_bytes) or 0)
        self._ratios.clear()
        self._sensitivity.clear()
        self._current = None
        log.info("low-bit: %d kernels, %s weights, budget %.3g bits; %d BatchNorm layers fold into the file",
                 len(self._specs), f"{sum(self._sizes.values()):,}", self.budget(), len(self._pairs))
        if self.options.allocation == "sensitivity":
            for scheme in self._schemes():
                self._sensitivity_of(scheme)

    def _schemes(self) -> Tuple[str, ...]:
        return SCHEMES if self.options.scheme == "search" else (self.options.scheme,)

    @property
    def _low(self) -> int:
        return self.options.min_bits

    @property
    def _high(self) -> int:
        return self.options.max_bits

    # ------------------------------------------------------------------ budget and file size
    def _packed_model(self) -> tf.keras.Model:
        return self._folded if self._folded is not None else self._work

    def _measure_fixed_bytes(self) -> int:
        """Bytes of the packed file that do not depend on the bit widths (architecture, tables,
        float tensors, container overhead): a file with 8-bit codes minus its codes."""
        model = self._packed_model()
        names = self._variable_names(model)
        packed = {}
        for spec in self._specs:
            channels = int(spec.variable.shape[spec.axis])
            packed[names[spec.key]] = PackedTensor(np.zeros(spec.variable.shape, np.int64), 8,
                                                   np.ones(2 * channels, np.float32), "affine",
                                                   {"channel_axis": spec.axis})
        total = len(packed_bytes(model, packed))
        return total - sum(packed_size(size, 8) for size in self._sizes.values())

    def predicted_bytes(self, bits: Mapping[str, int]) -> int:
        return self._fixed_bytes + sum(packed_size(self._sizes[key], int(bits[key])) for key in self._sizes)

    def _bits_for_compression(self, ratio: float) -> float:
        baseline_bytes = self._baseline_bytes
        if not baseline_bytes:
            raise ConfigError("--target-compression needs the baseline's float TFLite size; do not pass --export none "
                              "with this target")
        codes = baseline_bytes / ratio - self._fixed_bytes - SIZE_MARGIN_BYTES - len(self._sizes)
        return max(float(self._low), 8.0 * codes / sum(self._sizes.values()))

    def budget(self) -> float:
        """The average-bits budget: the tightest of --target-bits, uniform.bits and --target-compression."""
        target = self.context.target
        limits = [float(value) for value in (target.bits, self.options.bits) if value is not None]
        if target.compression is not None:
            limits.append(self._bits_for_compression(target.compression))
        budget = min(limits) if limits else DEFAULT_LOW_BITS
        if budget < self._low:
            raise ConfigError(f"a budget of {budget:g} bits is below uniform.min_bits = {self._low}; raise the target "
                              f"bits (the low-bit path quantizes to {self._low}..{self._high} bits)")
        return min(budget, float(self._high))

    def _probe_bits(self) -> int:
        if self.options.probe_bits is not None:
            return self.options.probe_bits
        return int(min(self._high, max(self._low, math.ceil(self.budget()) - 1)))

    # ------------------------------------------------------------------ quantization helpers
    def _ratio(self, key: str, bits: int, scheme: str) -> np.ndarray:
        spec = next(s for s in self._specs if s.key == key)
        channels = int(spec.variable.shape[spec.axis])
        if self.options.clip == "minmax":
            return np.ones(channels, np.float32)
        cache = (key, int(bits), scheme)
        if cache not in self._ratios:
            self._ratios[cache] = mse_ratios(self._float_kernels[key], int(bits), spec.axis, scheme)
        return self._ratios[cache]

    def _sensitivity_of(self, scheme: str) -> Dict[str, float]:
        """Per-kernel KL divergence with only that kernel quantized at the probe width (cached)."""
        if scheme not in self._sensitivity:
            probe = self._probe_bits()
            self._work.set_weights(self._baseline.get_weights())
            images = self.context.dataset.sample_train(self.options.sensitivity_samples, seed=self.context.seed)
            axes = {spec.key: spec.axis for spec in self._specs}

            def quantized(key: str) -> np.ndarray:
                return quantized_values(self._float_kernels[key], probe, axes[key], scheme,
                                        self._ratio(key, probe, scheme)).numpy()

            self._sensitivity[scheme] = measure_sensitivity(
                self._work, {spec.key: spec.variable for spec in self._specs}, quantized, images,
                outputs_probabilities(self._work))
            ranked = sorted(self._sensitivity[scheme].items(), key=lambda item: -item[1])
            log.info("low-bit sensitivity (%s, %d bits, KL): %s", scheme, probe,
                     ", ".join(f"{key.rsplit('/', 1)[0]} {value:.3g}" for key, value in ranked[:6]))
        return self._sensitivity[scheme]

    # ------------------------------------------------------------------ search
    def reachable(self) -> Dict[str, float]:
        self.prepare(self.baseline)
        reached = {"bits": float(self._low)}
        if self._baseline_bytes:
            reached["compression"] = self._baseline_bytes / self.predicted_bytes({key: self._low for key in self._sizes})
        return reached

    def search_space(self, trial: Any) -> MixedHyperparameters:
        self.prepare(self.baseline)
        scheme = self.options.scheme
        if scheme == "search":
            scheme = trial.suggest_categorical("scheme", list(SCHEMES))
        budget, power = self.budget(), None
        allocation = self.options.allocation
        if allocation == "sensitivity":
            power = trial.suggest_float("sensitivity_power", 0.0, self.options.max_power)
            bits = sensitivity_bits(self._sensitivity_of(scheme), self._sizes, budget, power, self._probe_bits(),
                                    self._low, self._high)
        elif allocation == "free":
            proposed = {key: trial.suggest_float(f"bits_{key}", float(self._low), float(self._high))
                        for key in self._sizes}
            bits = free_bits(proposed, self._sizes, budget, self._low, self._high)
        else:
            bits = project_bits({key: budget for key in self._sizes}, self._sizes, budget, self._low, self._high)
        return MixedHyperparameters(scheme=scheme, allocation=allocation, power=power, bits=dict(bits),
                                    average_bits=average_bits(bits, self._sizes))

    def reference_params(self) -> Dict[str, Any]:
        """Uniform bits everywhere at the budget (power 0, or every proposal at the budget)."""
        params: Dict[str, Any] = {}
        if self.options.scheme == "search":
            params["scheme"] = "asymmetric"
        if self.options.allocation == "sensitivity":
            params["sensitivity_power"] = 0.0
        elif self.options.allocation == "free":
            params.update({f"bits_{key}": self.budget() for key in self._sizes})
        return params

    def expected_bytes(self) -> Optional[int]:
        """The packed file with every kernel at the bit budget (the reference allocation's size)."""
        budget = self.budget()
        bits = project_bits({key: budget for key in self._sizes}, self._sizes, budget, self._low, self._high)
        return self.predicted_bytes(bits)

    def max_trials(self) -> Optional[int]:
        if self.options.allocation == "uniform":
            return len(self._schemes())
        return None

    # ------------------------------------------------------------------ candidates
    def compress(self, hparams: MixedHyperparameters) -> Candidate:
        """The working copy with the baseline's weights, quantized as ``hparams`` says, after a short
        STE recovery and BatchNorm re-estimation. Valid until the next call."""
        model = self.baseline
        self.prepare(model)
        work = self._work
        work.set_weights(model.get_weights())
        ratios = {key: self._ratio(key, hparams.bits[key], hparams.scheme) for key in self._sizes}
        self._quantizer.configure(hparams.bits, ratios, hparams.scheme)
        self._quantizer.start()
        log.info("low-bit candidate (%s, %.3f bits): %s", hparams.scheme, hparams.average_bits,
                 describe_bits(hparams.bits, list(self._sizes)))
        if self.options.recovery_epochs > 0:
            self._train(work, self.options.recovery_epochs, self.options.recovery_learning_rate, None,
                        "low-bit recovery")
        elif self.options.batchnorm == "recalibrate":
            self._recalibrate(work)
        self._current = LowBitState(hparams)
        return Candidate(work, hparams, state=self._current)

    def _train(self, model: tf.keras.Model, epochs: float, learning_rate: float, teacher: Optional[Distiller],
               description: str) -> None:
        """STE training (the quantizer runs after every step), with BatchNorm as ``options.batchnorm`` says;
        ``learning_rate`` is a fraction of the net's from-scratch rate."""
        base = self.context.schedule
        schedule = replace(base, epochs=epochs, learning_rate=base.learning_rate * learning_rate)
        mode = self.options.batchnorm
        if mode == "auto":  # a teacher's soft targets diverged with frozen statistics (UniformConfig.batchnorm)
            mode = "freeze" if teacher is None else "train"
        frozen = batchnorm_layers(model) if mode == "freeze" else []
        for layer in frozen:
            layer.trainable = False  # Keras runs a non-trainable BatchNorm in inference mode
        try:
            train(model, self.context.dataset, schedule, distributed=self.context.distributed, seed=self.context.seed,
                  after_step=self._quantizer, loss_function=distillation_loss(teacher, model),
                  description=description)
        finally:
            for layer in frozen:
                layer.trainable = True
        self._quantizer.finish()
        if mode == "recalibrate":
            self._recalibrate(model)

    def _recalibrate(self, model: tf.keras.Model) -> None:
        recalibrate_batchnorm(model, self.context.dataset, self.options.calibration_batches,
                              self.context.schedule.batch_size, seed=self.context.seed)

    def _check(self, candidate: Candidate) -> MixedHyperparameters:
        if candidate.state is None or candidate.state is not self._current:
            raise RuntimeError("the low-bit learner works on the candidate the last compress() returned "
                               "(its working copy holds one candidate at a time)")
        return candidate.state.hparams

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        hparams = self._check(candidate)
        size = len(packed_bytes(*self._packed(candidate)))
        metrics = {"bits": hparams.average_bits, "bytes": float(size)}
        if self._baseline_bytes:
            metrics["compression"] = self._baseline_bytes / size
        return metrics

    # ------------------------------------------------------------------ the winner
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Distiller] = None) -> Candidate:
        self._check(candidate)
        self._train(candidate.model, epochs, self.options.finetune_learning_rate, teacher, "low-bit fine-tune")
        return candidate

    def finalize(self, candidate: Candidate) -> Candidate:
        self._check(candidate)
        return candidate  # its kernels hold the quantized values; no wrappers to strip

    # ------------------------------------------------------------------ the packed file
    @staticmethod
    def _variable_names(model: tf.keras.Model) -> Dict[str, str]:
        from learners.weight_sparsification.masks import prunable_weights, variables_by_key

        return {key: variable.name for key, variable in variables_by_key(model, prunable_weights(model)).items()}

    def _packed(self, candidate: Candidate) -> Tuple[tf.keras.Model, Dict[str, PackedTensor]]:
        """The model the file describes (BatchNorm folded) and its packed kernels."""
        self._check(candidate)
        model = candidate.model
        gains: Dict[str, np.ndarray] = {}
        if self._folded is not None:
            gains = fold_weights(model, self._folded, self._pairs)
        target = self._packed_model()
        names = self._variable_names(target)
        packed = {}
        for spec in self._specs:
            codes, scales, zero_points, bits = self._quantizer.encoded(spec.key)
            layer = spec.key.rsplit("/", 1)[0]
            if layer in gains:
                scales = scales * gains[layer]
            packed[names[spec.key]] = PackedTensor(codes, bits, np.concatenate([scales, zero_points]), "affine",
                                                   {"channel_axis": spec.axis})
        return target, packed

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """The packed file (what ships), then TFLite files of its decoded weights, each measured."""
        hparams = self._check(candidate)
        directory = Path(directory)
        path = directory / ARTIFACT_NAME
        size = write_packed(*self._packed(candidate), path)
        dataset = self.context.dataset
        images, labels = dataset.test_arrays()
        rebuilt = load_packed(path)
        fields: Dict[str, Any] = {
            "shipped_format": "packed low-bit", "artifact_path": str(path), "artifact_bytes": size,
            "bits": hparams.average_bits, "average_bits": hparams.average_bits, "scheme": hparams.scheme,
            "packed_keras_accuracy": float(np.mean(np.argmax(predict(rebuilt, images), axis=-1) == labels)),
        }
        tflite_path = directory / "model_lowbit.tflite"
        packed_to_tflite(path, tflite_path)
        measured = self.context.measure_file(tflite_path, "float", images, labels)
        fields.update(tflite_path=measured.path, tflite_accuracy=measured.accuracy,
                      tflite_latency_ms=measured.latency_ms, tflite_bytes=measured.bytes)
        if self.options.int8_activations:
            representative = dataset.sample_train(self.options.representative_samples, seed=self.context.seed)
            int8_path = directory / "model_lowbit_int8.tflite"
            packed_to_tflite(path, int8_path, "int8", representative)
            int8 = self.context.measure_file(int8_path, "int8", images, labels)
            fields.update(int8_activations_tflite_path=int8.path, int8_activations_tflite_accuracy=int8.accuracy,
                          int8_activations_tflite_latency_ms=int8.latency_ms,
                          int8_activations_tflite_bytes=int8.bytes)
        log.info("shipped packed low-bit file: %s bytes, %.3f bits on average; decoded TFLite accuracy %.4f",
                 f"{size:,}", hparams.average_bits, measured.accuracy)
        return fields

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        hparams = self._check(candidate)
        found: Dict[str, Any] = {
            "precision": "mixed low-bit", "scheme": hparams.scheme, "allocation": hparams.allocation,
            "bit_budget": self.budget(), "average_bits": hparams.average_bits,
            "layer_bits": dict(hparams.bits), "layer_params": dict(self._sizes),
            "folded_batchnorm": [pair.batchnorm for pair in self._pairs],
        }
        if hparams.power is not None:
            found["sensitivity_power"] = hparams.power
            found["layer_sensitivity"] = {key: round(value, 6)
                                          for key, value in self._sensitivity_of(hparams.scheme).items()}
        return found
