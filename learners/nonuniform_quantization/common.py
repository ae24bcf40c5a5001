"""What the two codebook learners share: the kernels they quantize, targets turned into a bit
allocation, the per-model codebook state, cluster fine-tuning, and the shipped file.

Subclasses say how a layer is cut (``layout``), what a layer costs at b bits (``layer_cost``),
what the ``bits`` target measures (``bits_of``) and how a candidate is built (``compress``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from learners.base import Candidate, Learner
from learners.distillation import Distiller, as_distiller, distillation_loss
from learners.nonuniform_quantization.artifact import (QuantizedKernel, artifact_bytes, artifact_to_tflite,
                                                       kernel_bytes, load_artifact, packed_tensors, rest_variables,
                                                       round_half, write_artifact)
from learners.nonuniform_quantization.clustering import AdaptiveClusterProjection, ClusterProjection
from learners.nonuniform_quantization.codebooks import Layout
from learners.packing import distinct_values, packed_bytes
from learners.weight_sparsification.masks import PrunableWeight, prunable_weights, variables_by_key
from pocketflow.config import TargetConfig
from pocketflow.errors import ConfigError
from pocketflow.training import batchnorm_layers, from_trained, recalibrate_batchnorm, train

log = logging.getLogger(__name__)

SIZE_MARGIN = 0.005  # plan compression targets 0.5% under the byte budget (file headers vary a little)


@dataclass
class CodebookState:
    """A candidate's codebooks: kernel key -> (its codes, the model's variable)."""

    kernels: Dict[str, Tuple[QuantizedKernel, tf.Variable]]
    hparams: Any
    notes: Dict[str, Any]
    # full-precision kernels that adaptive codes train on, kept between stages (empty: the baseline's)
    shadows: Dict[str, np.ndarray] = field(default_factory=dict)


class CodebookLearner(Learner):
    """Base of ``non-uniform`` and ``product-quant`` (not registered itself)."""

    targets = ("bits", "compression")
    pareto_cost: ClassVar[Optional[str]] = "bytes"
    artifact_stem: ClassVar[str] = "model_codebook"
    shipped_format: ClassVar[str] = "codebook file"
    half_table: ClassVar[bool] = False

    def __init__(self, options: Any, context) -> None:
        super().__init__(options, context)
        self._weights: List[PrunableWeight] = []
        self._overheads: Dict[Any, int] = {}
        self._baseline_bytes: Optional[int] = None

    @classmethod
    def check_target(cls, target: TargetConfig) -> None:
        super().check_target(target)
        if not target.requested():
            raise ConfigError(f"learner '{cls.name}' needs a target: pass --target-bits B (e.g. 4) or "
                              f"--target-compression R (e.g. {cls.example_compression})")

    example_compression: ClassVar[int] = 8

    # ------------------------------------------------------------------ analysis
    def prepare(self, baseline: tf.keras.Model) -> List[PrunableWeight]:
        if self._baseline is not baseline:
            super().prepare(baseline)
            self._weights = prunable_weights(baseline)
            if not self._weights:
                raise ConfigError(f"the model has no Conv/Dense kernels; '{self.name}' has nothing to quantize")
            self._overheads.clear()
            log.info("%s: %d kernels, %s weights", self.name, len(self._weights), f"{self.total:,}")
        return self._weights

    @property
    def total(self) -> int:
        return sum(w.size for w in self._weights)

    def _prepare_targets(self) -> None:
        """Called from ``reachable`` (on every rank): the baseline size is broadcast here once, so the
        chief alone can later measure candidates without a collective call."""
        self.prepare(self.baseline)
        self._baseline_float_bytes()

    def _require_prepared(self) -> None:
        self.prepare(self.baseline)  # raises when prepare(baseline) never ran

    # ------------------------------------------------------------------ per-layer geometry (subclasses)
    def layout(self, weight: PrunableWeight, hparams: Any) -> Layout:
        raise NotImplementedError

    def bit_range(self, weight: PrunableWeight, layout: Layout) -> Tuple[int, int]:
        """(lowest, highest) bits this layer may get: never more centroids than sub-vectors."""
        most = max(1, int(np.floor(np.log2(max(layout.count, 2)))))
        return self.options.min_bits, max(self.options.min_bits, min(self.options.max_bits, most))

    def layer_cost(self, layout: Layout, bits: int) -> int:
        return kernel_bytes(layout, bits, self.half_table)

    def bits_of(self, bits: Mapping[str, int], layouts: Mapping[str, Layout]) -> float:
        raise NotImplementedError

    # ------------------------------------------------------------------ targets
    def _target_bytes(self) -> Optional[float]:
        ratio = self.context.target.compression
        if ratio is None:
            return None
        base = self._baseline_float_bytes()
        if not base:
            raise ConfigError("--target-compression needs the baseline's float TFLite size; do not pass "
                              "--export none with this target")
        return base / ratio

    def _baseline_float_bytes(self) -> int:
        if self._baseline_bytes is None:
            self._baseline_bytes = self.context.distributed.broadcast_object(self.context.baseline_tflite_bytes)
        return self._baseline_bytes

    def overhead(self, layouts: Mapping[str, Layout], signature: Any = None) -> int:
        """Bytes of the file that are not codes or codebooks (graph, meta, headers, other tensors),
        measured once on a file written in memory."""
        if signature not in self._overheads:
            variables = variables_by_key(self._baseline, self._weights)
            kernels = {}
            for w in self._weights:
                layout = layouts[w.key]
                bits = self.bit_range(w, layout)[0]
                codes = np.zeros(layout.count, np.int64)
                kernels[w.key] = (QuantizedKernel(w.key, layout, bits, codes, self.half_table), variables[w.key])
            size = len(packed_bytes(self._baseline, packed_tensors(self._baseline, kernels,
                                                                   self.options.half_precision_rest)))
            self._overheads[signature] = size - sum(k.nbytes() for k, _ in kernels.values())
        return self._overheads[signature]

    def costs(self, layouts: Mapping[str, Layout]) -> Dict[str, List[int]]:
        return {w.key: [self.layer_cost(layouts[w.key], b) if b >= 1 else 0 for b in range(17)]
                for w in self._weights}

    def predicted_bytes(self, bits: Mapping[str, int], layouts: Mapping[str, Layout], signature: Any = None) -> int:
        return self.overhead(layouts, signature) + sum(self.layer_cost(layouts[k], b) for k, b in bits.items())

    # ------------------------------------------------------------------ candidates
    def _working_copy(self) -> tf.keras.Model:
        """A fresh copy of the baseline for one candidate (the baseline is never modified)."""
        model = self.baseline
        self.prepare(model)
        work = tf.keras.models.clone_model(model)
        work.set_weights(model.get_weights())
        return work

    @staticmethod
    def _state(candidate: Candidate) -> CodebookState:
        if not isinstance(candidate.state, CodebookState):
            raise RuntimeError("a codebook learner works on a candidate its compress() returned")
        return candidate.state

    def _settle_batchnorm(self, candidate: Candidate, stage: str) -> str:
        """BatchNorm statistics after quantizing and after training: keep them ("keep": the baseline's
        after quantizing, as trained after training) or re-estimate them on training batches
        ("recalibrate"); "auto" scores both on validation images and keeps the better.

        Re-estimating rescues heavily quantized models (ResNet-20 at 2 bits: 25% -> 67% before any
        training) but can hurt a model whose statistics never matched its data exactly (the shared
        pretrained ResNet-20 loses 2.9 points from re-estimation alone), so the data decides.
        """
        model, state = candidate.model, self._state(candidate)
        mode = self.options.batchnorm
        layers = batchnorm_layers(model)
        if not layers or self.options.calibration_batches == 0:
            mode = "keep"
        if mode == "auto":
            saved = [layer.get_weights() for layer in layers]
            kept = self._selection_score(model)
            self._recalibrate(model)
            recalibrated = self._selection_score(model)
            mode = self.context.distributed.broadcast_object("recalibrate" if recalibrated > kept else "keep")
            if mode == "keep":
                for layer, weights in zip(layers, saved):
                    layer.set_weights(weights)
            state.notes.setdefault("batchnorm_selection", {})[stage] = {"keep": kept, "recalibrate": recalibrated}
        elif mode == "recalibrate":
            self._recalibrate(model)
        state.notes.setdefault("batchnorm", {})[stage] = mode
        return mode

    def _recalibrate(self, model: tf.keras.Model) -> None:
        recalibrate_batchnorm(model, self.context.dataset, self.options.calibration_batches,
                              self.context.schedule.batch_size, seed=self.context.seed)

    def _selection_score(self, model: tf.keras.Model) -> float:
        """Accuracy on the first ``selection_samples`` validation images (never the test split)."""
        correct = seen = 0
        for images, labels in self.context.dataset.validation(256):
            outputs = model(images, training=False).numpy()
            correct += int(np.sum(np.argmax(outputs, axis=-1) == labels.numpy()))
            seen += len(outputs)
            if seen >= self.options.selection_samples:
                break
        return correct / max(seen, 1)

    def _recover(self, candidate: Candidate, epochs: float, description: str,
                 teacher: Optional[Distiller] = None, learning_rate_factor: Optional[float] = None) -> None:
        """Train the codebooks for ``epochs`` (codes fixed, or re-assigned every step with
        ``assignment: adaptive``), then settle the BatchNorm statistics again.

        BatchNorm trains as usual (batch statistics, moving averages updated): with its statistics
        frozen the network loses its scale invariance, and distillation's soft targets made SGD
        diverge on the digits CNN at the usual fine-tuning rate.
        """
        if epochs <= 0:
            return
        model, state = candidate.model, self._state(candidate)
        schedule = self.context.schedule.with_epochs(epochs)
        if learning_rate_factor is None:
            schedule = from_trained(schedule)
        else:
            schedule = replace(schedule, learning_rate=schedule.learning_rate * learning_rate_factor)
        adaptive = getattr(self.options, "assignment", "fixed") == "adaptive"
        if adaptive:
            before = {key: kernel.codes.copy() for key, (kernel, _) in state.kernels.items()}
            hook = AdaptiveClusterProjection(state.kernels, state.shadows or self._baseline_kernels())
        else:
            hook = ClusterProjection(state.kernels)
        train(model, self.context.dataset, schedule, distributed=self.context.distributed, seed=self.context.seed,
              after_step=hook, loss_function=distillation_loss(teacher, model), description=description)
        shadows = hook.finish()
        if adaptive:
            state.shadows = shadows
            moved = sum(int(np.count_nonzero(kernel.codes != before[key])) for key, (kernel, _) in state.kernels.items())
            state.notes.setdefault("codes_changed", {})[description] = moved
            log.info("%s: %s of %s codes changed", description, f"{moved:,}", f"{self.total:,}")
        self._settle_batchnorm(candidate, description)

    def _baseline_kernels(self) -> Dict[str, np.ndarray]:
        """The baseline's full-precision kernels: where adaptive codes start their shadows."""
        return {key: variable.numpy() for key, variable in variables_by_key(self._baseline, self._weights).items()}

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        model, state = candidate.model, self._state(candidate)
        bits = {key: kernel.bits for key, (kernel, _) in state.kernels.items()}
        layouts = {key: kernel.layout for key, (kernel, _) in state.kernels.items()}
        size = artifact_bytes(model, state.kernels, self.options.half_precision_rest)
        metrics = {"bits": self.bits_of(bits, layouts), "bytes": float(size)}
        base = self._baseline_float_bytes()
        if base:
            metrics["compression"] = base / size
        return metrics

    # ------------------------------------------------------------------ the winner
    def default_teacher(self, teacher: Optional[Distiller]) -> Optional[Distiller]:
        """The run's teacher (``--distill``), or with ``distill: true`` the baseline itself with the default
        temperature and weight (distillation keeps the fine-tuned student close to the model it replaces)."""
        if teacher is None and self.options.distill and self._baseline is not None:
            return as_distiller(self._baseline)
        return teacher

    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Distiller] = None) -> Candidate:
        self._recover(candidate, epochs, "codebook fine-tune", teacher=self.default_teacher(teacher),
                      learning_rate_factor=self.options.finetune_learning_rate)
        return candidate

    def finalize(self, candidate: Candidate) -> Candidate:
        """Kernels exactly at their centroids (codebooks rounded to float16 where stored so), other
        float tensors rounded to float16 where the file stores them so: the model is the file."""
        model, state = candidate.model, self._state(candidate)
        ClusterProjection(state.kernels)()
        if self.half_table:
            round_half([variable for _, variable in state.kernels.values()])
        if self.options.half_precision_rest:
            round_half(rest_variables(model, [variable for _, variable in state.kernels.values()]))
        return candidate

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        state = self._state(candidate)
        bits = {key: kernel.bits for key, (kernel, _) in state.kernels.items()}
        layouts = {key: kernel.layout for key, (kernel, _) in state.kernels.items()}
        return {"quantized_weights": self.total, "average_bits": self.bits_of(bits, layouts), "layer_bits": bits,
                **state.notes}

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """The codebook file, loaded back into Keras (test accuracy, weights and outputs compared with
        the model) and converted to TFLite from the loaded model (accuracy and latency measured)."""
        model, state = candidate.model, self._state(candidate)
        directory = Path(directory)
        path = directory / f"{self.artifact_stem}.npz"
        size = write_artifact(model, state.kernels, path, self.options.half_precision_rest)
        rebuilt = load_artifact(path)
        dataset = self.context.dataset
        images, labels = dataset.test_arrays()
        weight_gap = max(float(np.max(np.abs(a - b), initial=0.0))
                         for a, b in zip(model.get_weights(), rebuilt.get_weights()))
        sample = images[:64]
        output_gap = float(np.max(np.abs(_outputs(model, sample) - _outputs(rebuilt, sample))))
        layers = {key: variable for key, (_, variable) in state.kernels.items()}
        rebuilt_vars = variables_by_key(rebuilt, [w for w in self._weights if w.key in layers])
        distinct = dict(zip(rebuilt_vars, distinct_values([v.numpy() for v in rebuilt_vars.values()])))
        over = {k: n for k, n in distinct.items()
                if state.kernels[k][0].layout.block == 1 and n > state.kernels[k][0].centroids}
        if over:
            raise RuntimeError(f"kernels hold more distinct values than their codebooks: {over}")
        tflite_path = directory / f"{self.artifact_stem}.tflite"
        artifact_to_tflite(path, tflite_path)
        measured = self.context.measure_file(tflite_path, "float", images, labels)
        artifact_accuracy = float(np.mean(np.argmax(_outputs(rebuilt, images), axis=-1) == labels))
        log.info("shipped %s: %s bytes, test accuracy %.4f (loaded back into Keras), TFLite from it %.4f, "
                 "largest weight difference %.2g", self.shipped_format, f"{size:,}", artifact_accuracy,
                 measured.accuracy, weight_gap)
        return {
            "artifact_path": str(path), "artifact_bytes": size, "shipped_format": self.shipped_format,
            "artifact_accuracy": artifact_accuracy, "artifact_weight_max_difference": weight_gap,
            "artifact_output_max_difference": output_gap, "distinct_values": distinct,
            "tflite_path": measured.path, "tflite_bytes": measured.bytes, "tflite_accuracy": measured.accuracy,
            "tflite_latency_ms": measured.latency_ms,
        }


def _outputs(model: tf.keras.Model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eager inference in batches (no predict function to trace for a model used once)."""
    return np.concatenate([model(images[start:start + batch_size], training=False).numpy()
                           for start in range(0, len(images), batch_size)])
