"""uniform: 8-bit uniform quantization that ships as a full-integer int8 TFLite file.

Two methods, both measured on every run so the report shows what training bought:
post-training quantization (PTQ: the float model converted with a representative set, no
training) and quantization-aware training (QAT: TFMOT fake-quantizers, fine-tuned with the
shared training loop, converted with the ranges they learned). The shipped artifact is the
int8 TFLite file of the method chosen (QAT unless ``method: ptq`` or ``qat_epochs: 0``);
``finalize`` returns the plain float Keras model holding the QAT-trained weights.

Targets: ``--target-bits 8`` (or more) and ``--target-compression`` up to what int8 reaches.
Fewer bits (``--target-bits 4``, ``uniform.bits: 4``, ``mode: mixed``, or a compression target
above ``INT8_COMPRESSION_LIMIT``) hand the run to the mixed low-bit strategy in
``learners.uniform_quantization.mixed`` (``UniformQuantizationLearner.strategy``): per-layer
2..8-bit weights chosen by the search, shipped as a bit-packed file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

import tensorflow as tf

from learners.base import Learner, register_learner
from learners.distillation import Distiller, distillation_loss
from learners.uniform_quantization.qat import calibrate, copy_back, float_layers, quantize_aware, tensor_dtypes
from pocketflow.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, RATE_FRACTION, TargetConfig, check_fields
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteMeasurement, TFLiteModel, export_and_measure, tflite_accuracy
from pocketflow.metrics import count_params
from pocketflow.training import from_trained, train

log = logging.getLogger(__name__)

INT8_BITS = 8.0
INT8_COMPRESSION_LIMIT = 3.0  # mode auto: a --target-compression above this goes to the low-bit path
DEFAULT_LOW_BITS = 4.0  # mode mixed without --target-bits / bits / --target-compression


@dataclass(frozen=True)
class UniformConfig:
    """Hyperparameters of uniform quantization."""

    method: Literal["qat", "ptq"] = "qat"  # ptq: no training, convert the float model with calibration
    # QAT fine-tuning epochs; None: the run's fine-tuning epochs (--finetune-epochs); 0 means ptq.
    qat_epochs: Optional[float] = None
    representative_samples: int = 200  # training images that calibrate ranges for the int8 converter
    compare_dynamic: bool = True  # also export and time the dynamic-range TFLite, for the report
    threads: int = 1  # interpreter threads for the latency measurements
    latency_runs: int = 50
    # Which path: int8 (TFMOT QAT / post-training int8 TFLite) or mixed (per-layer 2..8-bit weights,
    # packed file). auto: mixed when the target asks for fewer than 8 bits (--target-bits < 8,
    # bits < 8, or --target-compression above INT8_COMPRESSION_LIMIT), else int8.
    mode: Literal["auto", "int8", "mixed"] = "auto"
    bits: Optional[int] = None  # --bits: 8 = the int8 path; 2..7 = low-bit at this average (the budget)
    # ---- the mixed low-bit path (learners/uniform_quantization/mixed.py)
    # sensitivity: the optimizer searches how strongly measured per-layer sensitivity shapes the
    # allocation (one parameter); free: one proposal per layer (HAQ-style); uniform: every layer alike.
    allocation: Literal["sensitivity", "free", "uniform"] = "sensitivity"
    scheme: Literal["asymmetric", "symmetric", "search"] = "asymmetric"  # per-channel; search: optimizer
    min_bits: int = 2
    max_bits: int = 8
    clip: Literal["mse", "minmax"] = "mse"  # per-channel clipping ratio with the least squared error, or none
    recovery_epochs: float = 0.1  # STE training of every candidate before it is scored
    # Learning rates as fractions of the net's from-scratch rate. A candidate's short recovery uses a
    # small one: a few steps at the usual fine-tuning rate (0.1) knock a pretrained model off its
    # minimum by more than they recover (shared ResNet-20, 18 steps at 8 bits: -1.2 points test).
    recovery_learning_rate: float = 0.01
    finetune_learning_rate: float = 0.1
    # BatchNorm during low-bit training: freeze (inference mode: the baseline's statistics and affine
    # are kept; a pretrained model's statistics may come from augmentation this pipeline does not
    # reproduce), recalibrate (train it, then re-estimate the statistics on calibration_batches
    # training batches), or train (train it, keep the moving averages).
    batchnorm: Literal["freeze", "recalibrate", "train"] = "freeze"
    calibration_batches: int = 20
    sensitivity_samples: int = 256  # training images for the per-layer sensitivity (KL divergence)
    probe_bits: Optional[int] = None  # sensitivity measured at this width; None: one below the budget
    max_power: float = 2.0  # upper end of the searched sensitivity power
    fold_batchnorm: bool = True  # fold BatchNorm into the preceding conv/dense in the shipped file
    int8_activations: bool = True  # also export + measure an int8-activation TFLite of the packed weights

    def __post_init__(self) -> None:
        check_fields("uniform", self, {
            "qat_epochs": AT_LEAST_0, "representative_samples": AT_LEAST_1, "threads": AT_LEAST_1,
            "latency_runs": AT_LEAST_1, "recovery_epochs": AT_LEAST_0, "recovery_learning_rate": RATE_FRACTION,
            "finetune_learning_rate": RATE_FRACTION, "calibration_batches": AT_LEAST_0,
            "sensitivity_samples": AT_LEAST_1, "max_power": POSITIVE})
        if self.bits is not None and not 2 <= self.bits <= 8:
            raise ConfigError(f"uniform.bits = {self.bits} is out of range: it must be in [2, 8] (8: int8 TFLite; "
                              f"2-7: packed low-bit weights)")
        if not 2 <= self.min_bits <= self.max_bits <= 8:
            raise ConfigError(f"uniform.min_bits = {self.min_bits}, max_bits = {self.max_bits} are out of range: "
                              f"they must satisfy 2 <= min_bits <= max_bits <= 8")
        if self.probe_bits is not None and not 2 <= self.probe_bits <= 8:
            raise ConfigError(f"uniform.probe_bits = {self.probe_bits} is out of range: it must be in [2, 8]")
        if self.mode == "int8" and self.bits is not None and self.bits < 8:
            raise ConfigError(f"uniform.mode = int8 conflicts with uniform.bits = {self.bits}; drop one of them")
        if self.mode == "mixed" and self.bits == 8:
            raise ConfigError("uniform.mode = mixed conflicts with uniform.bits = 8 (the int8 path); drop one of them")

    def low_bit(self, target: TargetConfig) -> bool:
        """True when these options and ``target`` need the mixed low-bit path (see ``mode``)."""
        wants_low = ((target.bits is not None and target.bits < INT8_BITS)
                     or (self.bits is not None and self.bits < INT8_BITS)
                     or (target.compression is not None and target.compression > INT8_COMPRESSION_LIMIT))
        int8_only = self.mode == "int8" or self.bits == 8
        if int8_only and target.bits is not None and target.bits < INT8_BITS:
            raise ConfigError(f"--target-bits {target.bits:g} needs fewer than 8 bits, but "
                              f"{'uniform.bits = 8' if self.bits == 8 else 'uniform.mode = int8'} selects the int8 "
                              f"path; drop it (the low-bit path is chosen from the target)")
        if self.mode == "mixed":
            return True
        return wants_low and not int8_only

    @property
    def trains(self) -> bool:
        return self.method == "qat" and self.qat_epochs != 0


@register_learner
class UniformQuantizationLearner(Learner):
    name = "uniform"
    Config = UniformConfig
    targets = ("bits", "compression")

    @classmethod
    def strategy(cls, options: UniformConfig, target: TargetConfig) -> type:
        """int8 (this class) or, below 8 bits, the mixed low-bit learner (same options section)."""
        if options.low_bit(target):
            from learners.uniform_quantization.mixed import MixedPrecisionLearner

            return MixedPrecisionLearner
        return cls

    def __init__(self, options: UniformConfig, context) -> None:
        super().__init__(options, context)
        self._baseline: Optional[tf.keras.Model] = None
        self._qat_model: Optional[tf.keras.Model] = None
        self._left_float: List[str] = []
        self._trained_epochs = 0.0

    # ------------------------------------------------------------------ search
    def max_trials(self) -> Optional[int]:
        return 1  # int8 has one candidate; the search only checks it against the target

    def reachable(self, baseline: tf.keras.Model) -> Dict[str, float]:
        self._baseline = baseline
        return {"bits": INT8_BITS, "compression": self._estimated_compression(baseline)}

    def _estimated_compression(self, model: tf.keras.Model) -> float:
        """Float TFLite bytes / estimated int8 bytes: kernels 1 byte per weight, the rest unchanged."""
        float_bytes = self.context.baseline_tflite_bytes
        if not float_bytes:
            return 4.0
        kernels = sum(int(w.shape.num_elements()) for w in model.weights if "kernel" in w.name)
        return float_bytes / max(1.0, float_bytes - 3.0 * kernels)

    def candidate_metrics(self, model: tf.keras.Model) -> Dict[str, float]:
        source = self._baseline if self._baseline is not None else model
        return {"bits": INT8_BITS, "compression": self._estimated_compression(source),
                "params": float(count_params(source))}

    # ------------------------------------------------------------------ compress and train
    def compress(self, model: tf.keras.Model, hparams: UniformConfig) -> tf.keras.Model:
        self._baseline = model
        if not hparams.trains:
            self._qat_model = None
            self._left_float = []
            return model
        self._qat_model, self._left_float = quantize_aware(model)
        samples = self.context.dataset.sample_train(self.options.representative_samples, seed=self.context.seed)
        calibrate(self._qat_model, model, samples)
        self._trained_epochs = 0.0
        return self._qat_model

    def finetune(self, model: tf.keras.Model, epochs: float,
                 teacher: Optional[Distiller] = None) -> tf.keras.Model:
        if self._qat_model is None or model is not self._qat_model:
            return model  # PTQ: nothing to train
        epochs = self.options.qat_epochs if self.options.qat_epochs is not None else epochs
        schedule = from_trained(self.context.schedule.with_epochs(epochs))
        train(model, self.context.dataset, schedule, distributed=self.context.distributed, seed=self.context.seed,
              loss_function=distillation_loss(teacher, model), description="QAT fine-tune")
        self._trained_epochs = epochs
        return model

    def finalize(self, model: tf.keras.Model) -> tf.keras.Model:
        if self._qat_model is None or model is not self._qat_model:
            return model
        return copy_back(self._qat_model, self._baseline)

    # ------------------------------------------------------------------ ship and report
    def _export(self, model: tf.keras.Model, path: Path, mode: str) -> TFLiteMeasurement:
        dataset = self.context.dataset
        images, labels = dataset.test_arrays()
        representative = dataset.sample_train(self.options.representative_samples, seed=self.context.seed)
        return export_and_measure(model, path, mode, test_images=images, test_labels=labels,
                                  representative=representative, threads=self.options.threads,
                                  runs=self.options.latency_runs)

    def write_artifacts(self, model: tf.keras.Model, directory: Path) -> Dict[str, Any]:
        baseline = self._baseline if self._baseline is not None else model
        ptq = self._export(baseline, directory / "ptq_int8.tflite", "int8")
        fields: Dict[str, Any] = {
            "ptq_int8_accuracy": ptq.accuracy, "ptq_int8_latency_ms": ptq.latency_ms,
            "ptq_int8_bytes": ptq.bytes, "ptq_int8_path": ptq.path,
        }
        if self.options.compare_dynamic:
            dynamic = self._export(model, directory / "model_dynamic_compare.tflite", "dynamic")
            fields.update(dynamic_tflite_accuracy=dynamic.accuracy, dynamic_tflite_latency_ms=dynamic.latency_ms,
                          dynamic_tflite_bytes=dynamic.bytes)
        if self._qat_model is not None:
            shipped = self._export(self._qat_model, directory / "model_int8.tflite", "int8")
            fields.update(qat_int8_accuracy=shipped.accuracy, qat_epochs=self._trained_epochs,
                          method="qat", layers_left_float=list(self._left_float))
            if self._trained_epochs == 0:
                log.warning("QAT ran for 0 epochs (pass --finetune-epochs or uniform.qat_epochs); "
                            "the int8 file uses untrained quantizer ranges")
        else:
            shipped = ptq
            fields.update(method="ptq", layers_left_float=[])
        if self._qat_model is not None and hasattr(self.context.dataset, "validation_arrays"):
            # QAT must beat or match post-training int8; the choice is made on the validation split
            # (never the test split), and the losing file stays in the run directory for comparison.
            qat_validation, ptq_validation = self._validation_accuracy(shipped), self._validation_accuracy(ptq)
            fields.update(qat_int8_validation_accuracy=qat_validation, ptq_int8_validation_accuracy=ptq_validation)
            if ptq_validation > qat_validation:
                log.warning("QAT int8 validation accuracy %.4f is below post-training int8 %.4f; shipping the "
                            "post-training file", qat_validation, ptq_validation)
                shipped = ptq
        fields["shipped_method"] = "qat" if shipped.path.endswith("model_int8.tflite") else "ptq"
        fields.update(
            artifact_path=shipped.path, artifact_bytes=shipped.bytes, shipped_format="int8 TFLite",
            tflite_path=shipped.path, tflite_accuracy=shipped.accuracy, tflite_latency_ms=shipped.latency_ms,
            int8_tensors=tensor_dtypes(shipped.path), bits=INT8_BITS,
        )
        log.info("shipped int8 TFLite (%s): accuracy %.4f, %.1f KB; post-training int8 %.4f",
                 fields["shipped_method"], shipped.accuracy, shipped.bytes / 1024, ptq.accuracy)
        return fields

    def _validation_accuracy(self, measured: TFLiteMeasurement) -> float:
        images, labels = self.context.dataset.validation_arrays()
        return tflite_accuracy(TFLiteModel(measured.path, threads=self.options.threads), images, labels)

    def describe(self, model: tf.keras.Model) -> Dict[str, Any]:
        return {"method": "qat" if self._qat_model is not None else "ptq",
                "layers_left_float": list(self._left_float) if self._qat_model is not None
                else float_layers(model)}
