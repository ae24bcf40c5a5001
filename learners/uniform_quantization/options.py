"""Options of uniform quantization, shared by the int8 learner and the mixed low-bit strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Literal, Optional

from pocketflow.config import AT_LEAST_0, AT_LEAST_1, POSITIVE, RATE_FRACTION, TargetConfig, check_fields
from pocketflow.errors import ConfigError

INT8_BITS = 8.0
INT8_COMPRESSION_LIMIT = 3.0  # mode auto: a --target-compression above this goes to the low-bit path
DEFAULT_LOW_BITS = 4.0  # mode mixed without --target-bits / bits / --target-compression


@dataclass(frozen=True)
class UniformConfig:
    """Hyperparameters of uniform quantization."""

    # Keys that existed once: a config that still sets one gets this message, not "unknown key".
    REMOVED: ClassVar[Dict[str, str]] = {
        key: "every shipped file is now measured like the baseline, with export.threads and "
             "export.latency_runs; set those instead" for key in ("threads", "latency_runs")}

    method: Literal["qat", "ptq"] = "qat"  # ptq: no training, convert the float model with calibration
    # QAT fine-tuning epochs; None: the run's fine-tuning epochs (--finetune-epochs); 0 means ptq.
    qat_epochs: Optional[float] = None
    representative_samples: int = 200  # training images that calibrate ranges for the int8 converter
    compare_dynamic: bool = True  # also export and time the dynamic-range TFLite, for the report
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
    # training batches), train (train it, keep the moving averages), or auto: freeze, except in a
    # distilled fine-tuning, which trains it (frozen, the digits CNN's distilled 4-bit fine-tuning
    # diverged: loss 48, 17.8% test; trained: 99.7%; the codebook learners saw the same).
    batchnorm: Literal["auto", "freeze", "recalibrate", "train"] = "auto"
    calibration_batches: int = 20
    sensitivity_samples: int = 256  # training images for the per-layer sensitivity (KL divergence)
    probe_bits: Optional[int] = None  # sensitivity measured at this width; None: one below the budget
    max_power: float = 2.0  # upper end of the searched sensitivity power
    fold_batchnorm: bool = True  # fold BatchNorm into the preceding conv/dense in the shipped file
    int8_activations: bool = True  # also export + measure an int8-activation TFLite of the packed weights

    def __post_init__(self) -> None:
        check_fields("uniform", self, {
            "qat_epochs": AT_LEAST_0, "representative_samples": AT_LEAST_1, "recovery_epochs": AT_LEAST_0, "recovery_learning_rate": RATE_FRACTION,
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
