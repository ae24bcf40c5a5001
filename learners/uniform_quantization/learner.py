"""uniform: 8-bit uniform quantization that ships as a full-integer int8 TFLite file.

Two methods, both measured on every run so the report shows what training bought:
post-training quantization (PTQ: the float model converted with a representative set, no
training) and quantization-aware training (QAT: TFMOT fake-quantizers, fine-tuned with the
shared training loop, converted with the ranges they learned). The shipped artifact is the
int8 TFLite file of the method chosen: QAT unless ``method: ptq`` or ``qat_epochs: 0``, or unless
post-training int8 scores higher on the validation split. ``finalize`` makes that choice and returns
the float Keras model the shipped file is converted from: the QAT-trained weights, or the baseline
itself when post-training int8 ships (so ``model.keras`` and the report's Keras figures describe the
shipped file's model, never a QAT twin that was not shipped).

Targets: ``--target-bits 8`` (or more) and ``--target-compression`` up to what int8 reaches.
Fewer bits (``--target-bits 4``, ``uniform.bits: 4``, ``mode: mixed``, or a compression target
above ``INT8_COMPRESSION_LIMIT``) hand the run to the mixed low-bit strategy in
``learners.uniform_quantization.mixed`` (``UniformQuantizationLearner.strategy``): per-layer
2..8-bit weights chosen by the search, shipped as a bit-packed file.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import tensorflow as tf

from learners.base import Candidate, Learner, register_learner
from learners.distillation import Distiller, distillation_loss
from learners.uniform_quantization.options import (  # noqa: F401 - the options are part of this API
    DEFAULT_LOW_BITS, INT8_BITS, INT8_COMPRESSION_LIMIT, UniformConfig,
)
from pocketflow.config import TargetConfig
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteMeasurement, TFLiteModel, convert, tflite_accuracy, write_atomic
from pocketflow.metrics import count_params
from pocketflow.training import from_trained, train

log = logging.getLogger(__name__)


def _qat():
    """The QAT module, imported when a run first quantizes: it loads tensorflow-model-optimization (and
    Keras 3 behind it), seconds that every other learner's run would otherwise pay at start-up."""
    from learners.uniform_quantization import qat
    return qat


@dataclass
class QatState:
    """A QAT candidate: the fake-quantized model, the layers left float, the epochs it trained."""

    qat_model: tf.keras.Model
    left_float: List[str] = field(default_factory=list)
    trained_epochs: float = 0.0
    # set by finalize: each int8 file's validation accuracy, whether post-training int8 ships, and the
    # files it scored (by method; the chief's), which write_artifacts ships rather than converting again
    validation: Dict[str, float] = field(default_factory=dict)
    ships_ptq: bool = False
    int8_files: Dict[str, bytes] = field(default_factory=dict)


@register_learner
class UniformQuantizationLearner(Learner):
    name = "uniform"
    Config = UniformConfig
    targets = ("bits", "compression")
    _baseline_bytes = 0  # the baseline's float TFLite file, the same on every rank (set by prepare)

    @classmethod
    def strategy(cls, options: UniformConfig, target: TargetConfig) -> type:
        """int8 (this class) or, below 8 bits, the mixed low-bit learner (same options section)."""
        if options.low_bit(target):
            from learners.uniform_quantization.mixed import MixedPrecisionLearner

            return MixedPrecisionLearner
        return cls

    def prepare(self, baseline: tf.keras.Model) -> None:
        if self._baseline is baseline:
            return
        super().prepare(baseline)
        # every rank checks the same estimate against the target, and only the chief measured the file
        self._baseline_bytes = int(self.context.distributed.broadcast_object(self.context.baseline_tflite_bytes) or 0)
        if self.context.target.compression is not None and not self._baseline_bytes:
            raise ConfigError("--target-compression needs the baseline's float TFLite size; do not pass --export none "
                              "with this target")

    # ------------------------------------------------------------------ search
    def max_trials(self) -> Optional[int]:
        return 1  # int8 has one candidate; the search only checks it against the target

    def reachable(self) -> Dict[str, float]:
        return {"bits": INT8_BITS, **self._estimated_compression(self.baseline)}

    def _estimated_compression(self, model: tf.keras.Model) -> Dict[str, float]:
        """{"compression": float TFLite bytes / estimated int8 bytes} (kernels 1 byte per weight, the rest
        unchanged), or {} without the baseline's file (--export none): no figure rather than a made-up one.
        The target is checked on the shipped file."""
        float_bytes = self._baseline_bytes
        if not float_bytes:
            return {}
        kernels = sum(int(w.shape.num_elements()) for w in model.weights if "kernel" in w.name)
        return {"compression": float_bytes / max(1.0, float_bytes - 3.0 * kernels)}

    def expected_bytes(self) -> Optional[int]:
        """The int8 file of the baseline, converted (a few calibration images: the size does not depend
        on them); with QAT the larger of the post-training and the quantization-aware file."""
        representative = self._representative()[:8]
        sizes = [len(convert(self.baseline, "int8", representative))]
        if self.options.trains:
            qat_model, _ = _qat().quantize_aware(self.baseline)
            _qat().calibrate(qat_model, self.baseline, representative)
            sizes.append(len(convert(qat_model, "int8", representative)))
        return max(sizes)

    def expected_file(self) -> Optional[bytes]:
        """The baseline's post-training int8 file (a QAT file has the same operators, so the same speed)."""
        return convert(self.baseline, "int8", self._representative()[:8])

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        return {"bits": INT8_BITS, **self._estimated_compression(self.baseline),
                "params": float(count_params(self.baseline))}

    # ------------------------------------------------------------------ compress and train
    def compress(self, hparams: UniformConfig) -> Candidate:
        """Post-training int8 (the candidate is the baseline itself, no state), or a QAT model
        calibrated on training samples (state: ``QatState``)."""
        model = self.baseline
        if not hparams.trains:
            return Candidate(model, hparams)
        qat_model, left_float = _qat().quantize_aware(model)
        samples = self.context.dataset.sample_train(self.options.representative_samples, seed=self.context.seed)
        _qat().calibrate(qat_model, model, samples)
        return Candidate(qat_model, hparams, state=QatState(qat_model, left_float))

    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Distiller] = None) -> Candidate:
        state = candidate.state
        if state is None:
            return candidate  # PTQ: nothing to train
        epochs = self.options.qat_epochs if self.options.qat_epochs is not None else epochs
        schedule = from_trained(self.context.schedule.with_epochs(epochs))
        train(state.qat_model, self.context.dataset, schedule, distributed=self.context.distributed,
              seed=self.context.seed, loss_function=distillation_loss(teacher, state.qat_model),
              description="QAT fine-tune")
        state.trained_epochs = epochs
        return candidate

    def finalize(self, candidate: Candidate) -> Candidate:
        """QAT: the trained float weights copied back into the baseline's architecture (the QAT
        model stays in the state: it is what the int8 file is converted from). QAT must beat or match
        post-training int8 on the validation split (never the test split); where it does not, the
        post-training file ships and the model is the baseline it is converted from."""
        state = candidate.state
        if state is None:
            return candidate
        if hasattr(self.context.dataset, "validation_arrays"):
            scores = self._int8_validation(state) if self.context.distributed.is_chief else None
            state.validation = self.context.distributed.broadcast_object(scores)
            state.ships_ptq = state.validation["ptq"] > state.validation["qat"]
            if state.ships_ptq:
                log.warning("QAT int8 validation accuracy %.4f is below post-training int8 %.4f; shipping the "
                            "post-training file (and its float model, the baseline)", state.validation["qat"],
                            state.validation["ptq"])
                return candidate.with_model(self.baseline)
        return candidate.with_model(_qat().copy_back(state.qat_model, self.baseline))

    def _int8_validation(self, state: QatState) -> Dict[str, float]:
        """Validation accuracy of the QAT int8 file and of the baseline's post-training int8 file (both
        kept in ``state.int8_files``: they are the files write_artifacts ships and measures)."""
        images, labels = self.context.dataset.validation_arrays()
        representative = self._representative()
        scores = {}
        with tempfile.TemporaryDirectory() as directory:
            for method, model in (("qat", state.qat_model), ("ptq", self.baseline)):
                state.int8_files[method] = convert(model, "int8", representative)
                path = Path(directory) / f"{method}.tflite"
                write_atomic(path, state.int8_files[method])
                scores[method] = tflite_accuracy(TFLiteModel(path, threads=self.context.threads), images, labels)
        return scores

    def _representative(self):
        return self.context.dataset.sample_train(self.options.representative_samples, seed=self.context.seed)

    # ------------------------------------------------------------------ ship and report
    def _export(self, model: tf.keras.Model, path: Path, mode: str, converted: Optional[bytes] = None
                ) -> TFLiteMeasurement:
        """Write ``model`` as a ``mode`` TFLite file (``converted``: the file finalize already made of it)
        and measure it."""
        images, labels = self.context.dataset.test_arrays()
        if converted is None:
            return self.context.export_and_measure(model, path, mode, images, labels, self._representative())
        write_atomic(path, converted)
        return self.context.measure_file(path, mode, images, labels)

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        model, state = candidate.model, candidate.state
        converted = state.int8_files if state is not None else {}
        ptq = self._export(self.baseline, directory / "ptq_int8.tflite", "int8", converted.get("ptq"))
        fields: Dict[str, Any] = {
            "ptq_int8_accuracy": ptq.accuracy, "ptq_int8_latency_ms": ptq.latency_ms,
            "ptq_int8_bytes": ptq.bytes, "ptq_int8_path": ptq.path,
        }
        if self.options.compare_dynamic:
            dynamic = self._export(model, directory / "model_dynamic_compare.tflite", "dynamic")
            fields.update(dynamic_tflite_accuracy=dynamic.accuracy, dynamic_tflite_latency_ms=dynamic.latency_ms,
                          dynamic_tflite_bytes=dynamic.bytes)
        if state is not None:
            shipped = self._export(state.qat_model, directory / "model_int8.tflite", "int8", converted.get("qat"))
            fields.update(qat_int8_accuracy=shipped.accuracy, qat_epochs=state.trained_epochs,
                          method="qat", layers_left_float=list(state.left_float))
            if state.trained_epochs == 0:
                log.warning("QAT ran for 0 epochs (pass --finetune-epochs or uniform.qat_epochs); "
                            "the int8 file uses untrained quantizer ranges")
            if state.validation:  # the choice finalize made; the losing file stays for comparison
                fields.update(qat_int8_validation_accuracy=state.validation["qat"],
                              ptq_int8_validation_accuracy=state.validation["ptq"])
            if state.ships_ptq:
                shipped = ptq
        else:
            shipped = ptq
            fields.update(method="ptq", layers_left_float=[])
        fields["shipped_method"] = "qat" if shipped.path.endswith("model_int8.tflite") else "ptq"
        fields.update(
            artifact_path=shipped.path, artifact_bytes=shipped.bytes, shipped_format="int8 TFLite",
            tflite_path=shipped.path, tflite_accuracy=shipped.accuracy, tflite_latency_ms=shipped.latency_ms,
            int8_tensors=_qat().tensor_dtypes(shipped.path), bits=INT8_BITS,
        )
        log.info("shipped int8 TFLite (%s): accuracy %.4f, %.1f KB; post-training int8 %.4f",
                 fields["shipped_method"], shipped.accuracy, shipped.bytes / 1024, ptq.accuracy)
        return fields

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        state = candidate.state
        return {"method": "qat" if state is not None else "ptq",
                "layers_left_float": list(state.left_float) if state is not None
                else _qat().float_layers(candidate.model)}
