"""The Learner interface every compression algorithm implements, and the learner registry.

The lifecycle, in the order the runner (and the search in ``hpo/``) calls it; a call out of
order raises instead of returning something plausible:

1. ``Learner(options, context)``: no I/O, no training.
2. ``prepare(baseline)``: once per run, before anything below. The learner analyses the baseline
   here (prunable groups, quantizable kernels, size models); the baseline is never modified.
3. ``reachable()``: the most each target quantity can reach, so an impossible target stops early.
4. Per trial: ``search_space(trial)`` -> hyperparameters (``reference_params`` is enqueued first);
   ``compress(hparams)`` -> a ``Candidate``; ``candidate_metrics(candidate)`` -> target quantities.
   The search scores ``candidate.model`` on validation data.
5. For the winner: ``finetune(candidate, epochs, teacher)`` -> ``Candidate``; ``finalize(candidate)``
   -> a ``Candidate`` whose model is plain Keras (no wrappers, no masks) to save and export;
   ``describe(candidate)`` and ``write_artifacts(candidate, directory)`` for the report and the
   shipped file.

A ``Candidate`` carries the learner's private state for its model (masks, codebooks, the QAT
model), so nothing is keyed by model identity. Learners that reuse one working copy to save
memory (weight-sparse, the codebook learners) make a candidate stale when the next ``compress``
runs; a stale candidate raises, it is never silently mixed with another one's state.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import tensorflow as tf

from pocketflow.config import TargetConfig, parse_section, target_flag
from pocketflow.data.base import Dataset
from pocketflow.distributed import SingleProcess
from pocketflow.errors import ConfigError
from pocketflow.export import TFLiteMeasurement, export_and_measure, measure_file
from pocketflow.metrics import count_macs
from pocketflow.registry import Registry
from pocketflow.training import TrainSchedule

if TYPE_CHECKING:
    from learners.distillation import Distiller


@dataclass
class LearnerContext:
    """What a learner may use: the data, the training recipe, the target, the workers."""

    dataset: Dataset
    schedule: TrainSchedule  # the net's recipe; fine-tuning scales its epochs
    target: TargetConfig
    distributed: SingleProcess
    seed: int = 0
    baseline_macs: int = 0
    baseline_tflite_bytes: int = 0
    baseline_latency_ms: float = 0.0  # the baseline's float TFLite file (chief only; 0: not measured)
    run_directory: Optional[Path] = None  # where the run writes (a learner may record what it planned with)
    threads: int = 1  # export.threads: interpreter threads of every latency measurement
    latency_runs: int = 50  # export.latency_runs
    finetune_epochs: float = 0.0  # the fine-tuning the chosen candidate will get (a choice may depend on it)

    def measure_file(self, path: Path, mode: str, images, labels) -> TFLiteMeasurement:
        """The one measurement path: every file a learner ships is measured on ``images`` with the
        baseline's interpreter settings, so a latency ratio divides like by like."""
        return measure_file(Path(path), mode, test_images=images, test_labels=labels, threads=self.threads,
                            runs=self.latency_runs)

    def export_and_measure(self, model: tf.keras.Model, path: Path, mode: str, images, labels,
                           representative=None) -> TFLiteMeasurement:
        """Convert ``model`` to a TFLite file of ``mode`` (written atomically), then measure it."""
        return export_and_measure(model, Path(path), mode, test_images=images, test_labels=labels,
                                  representative=representative, threads=self.threads, runs=self.latency_runs)


@dataclass
class Candidate:
    """A compressed model and what its learner needs to finish it; only that learner reads ``state``."""

    model: tf.keras.Model
    hparams: Any = None
    state: Any = None

    def with_model(self, model: tf.keras.Model) -> "Candidate":
        return replace(self, model=model)


class Learner(abc.ABC):
    name: ClassVar[str]
    Config: ClassVar[type]  # frozen dataclass of this learner's hyperparameters
    targets: ClassVar[Tuple[str, ...]] = ()  # target kinds it can meet: speedup, compression, ...
    searches: ClassVar[bool] = True  # False: one candidate, no Optuna study
    # --objective pareto minimizes this candidate_metrics() key against accuracy ("macs", or "bytes"
    # for learners that shrink files, when their candidates differ in it); None: no front to search.
    pareto_cost: ClassVar[Optional[str]] = None
    # distillation.enabled = auto turns distillation on for this learner's fine-tuning: measured
    # to be worth it where compression removes whole channels (README, "Channel pruning recovery").
    distill_by_default: ClassVar[bool] = False

    def __init__(self, options: Any, context: LearnerContext) -> None:
        self.options = options
        self.context = context
        self._baseline: Optional[tf.keras.Model] = None

    # Config sections this learner reads besides its own: a chain (learners/chain.py) reads its stages'.
    sections: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def parse_options(cls, section: Mapping[str, Any], source: str) -> Any:
        return parse_section(cls.Config, dict(section), f"{cls.name}.", source)

    @classmethod
    def run_options(cls, sections: Mapping[str, Mapping[str, Any]], source: str) -> Any:
        """This learner's options from the run's learner sections (by section name)."""
        return cls.parse_options(sections.get(cls.name, {}), source)

    @classmethod
    def recorded_sections(cls, options: Any) -> Dict[str, Dict[str, Any]]:
        """The sections config.yaml records for ``options``: every key, with the value that ran."""
        given = {field.name for field in dataclasses.fields(options) if field.init}
        return {cls.name: {name: value for name, value in dataclasses.asdict(options).items() if name in given}}

    @classmethod
    def plan_lines(cls, options: Any, finetune_epochs: float) -> List[str]:
        """Lines ``--dry-run`` adds to the plan for this learner (a chain: its stages)."""
        return []

    @classmethod
    def check_target(cls, target: TargetConfig) -> None:
        """Reject targets this learner cannot meet, with the kinds it accepts."""
        unsupported = [kind for kind in target.requested() if kind not in cls.targets]
        if unsupported:
            accepted = ", ".join(target_flag(kind) for kind in cls.targets) or "no target"
            raise ConfigError(f"learner '{cls.name}' cannot meet target {', '.join(unsupported)}; "
                              f"it accepts {accepted}")

    @classmethod
    def searched_targets(cls, target: TargetConfig) -> Dict[str, float]:
        """The targets the search checks each trial against (the rest are checked on the shipped file
        only: a chain's later stages). Default: every requested one."""
        return target.requested()

    @classmethod
    def strategy(cls, options: Any, target: TargetConfig) -> type:
        """The class that carries out ``options`` and ``target`` (same name, same options section).
        A learner may hand some of them to another strategy, e.g. uniform: int8, or mixed low-bit
        below 8 bits. Default: itself."""
        return cls

    # ------------------------------------------------------------------ 2-3: once per run
    def prepare(self, baseline: tf.keras.Model) -> None:
        """Analyse ``baseline`` (never modified); every later step works from it. Subclasses extend
        this and call ``super().prepare(baseline)``; calling it again with the same model is free."""
        self._baseline = baseline

    @property
    def baseline(self) -> tf.keras.Model:
        if self._baseline is None:
            raise RuntimeError(f"learner '{self.name}': call prepare(baseline) before the other steps")
        return self._baseline

    def reachable(self) -> Dict[str, float]:
        """The most each target quantity can reach (to stop early on an impossible target); {} if unknown."""
        return {}

    def unreachable_hint(self) -> str:
        """What the user can change when ``reachable`` falls short of the target ('' if nothing but the target)."""
        return ""

    # ------------------------------------------------------------------ 4: per trial
    def search_space(self, trial: Any) -> Any:
        """Hyperparameters for one trial; fixed values in the options pass through."""
        return self.options

    def reference_params(self) -> Dict[str, Any]:
        """Parameters of a reference trial run first (e.g. uniform ratios), so the search is never worse."""
        return {}

    def max_trials(self) -> Optional[int]:
        """How many distinct candidates the search space holds, when that is small (None: many)."""
        return None

    @abc.abstractmethod
    def compress(self, hparams: Any) -> Candidate:
        """A compressed candidate built from the prepared baseline (which must not be modified)."""

    def expected_bytes(self) -> Optional[int]:
        """Bytes of the file this learner would ship for its prepared baseline at its reference
        hyperparameters, before any training (a chain sizes its pruning with it); None: unknown."""
        return None

    def expected_file(self) -> Optional[bytes]:
        """The TFLite file this learner would ship for its prepared baseline, made without training,
        where it runs at another speed than the float file (a chain times it to split a latency target
        between its stages); None: it runs as the float file does, or cannot be made before training."""
        return None

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        """Target quantities of a candidate; the default measures MACs and the MAC speedup."""
        macs = count_macs(candidate.model)
        return {"macs": float(macs), "speedup": self.context.baseline_macs / macs if macs else float("inf")}

    # ------------------------------------------------------------------ 5: the winner
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional["Distiller"] = None) -> Candidate:
        """Train the candidate for ``epochs``. With a ``teacher`` (a ``learners.distillation.Distiller``),
        pass ``loss_function=distillation_loss(teacher, model)`` to ``train`` so the fine-tuning is
        distilled from the baseline."""
        return candidate

    def finalize(self, candidate: Candidate) -> Candidate:
        """The candidate whose model is plain Keras, to save and export (no wrappers, no masks)."""
        return candidate

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """Write the shipped file when it is not the TFLite file; report fields to add to ``best``."""
        return {}

    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        """Learner-specific facts about a candidate for the report (e.g. per-layer channels).

        They go into report.json's ``best``. A ``report_sections`` entry, a list of
        ``{"title": ..., "lines": [...]}``, is also rendered in report.md, each line as a bullet:
        the report knows no learner's details."""
        return {}


LEARNERS: Registry[type] = Registry("learner", flag="--learner")


def register_learner(cls: type) -> type:
    LEARNERS.add(cls.name, cls)
    return cls
