"""Chains: learners applied in order in one run, e.g. channel pruning then int8 (``--learner channel+uniform``).

What a deployment engineer ships is usually two techniques at once: a pruned model in int8. A chain
is a learner like any other (the runner, the search, the report and ``ship/`` see one learner), made
of stages that each keep their own options section (``channel:``, ``uniform:``):

- The first stage is searched exactly as on its own: its trials, its target, its trial score. The
  search is staged: a candidate is scored before the later stages run, because the later ones
  change accuracy little and uniformly across candidates (measured for int8), while running them per
  trial would cost a training each.
- The winner is fine-tuned (``1 - last_stage_share`` of the fine-tuning epochs, distilled from the
  original baseline where distillation is on), finalized to plain Keras, and becomes the last
  stage's baseline; the last stage compresses it with its options and trains for the rest of the
  epochs (QAT for int8), distilled from the same original baseline.
- What ships is the last stage's file (int8 TFLite, packed low-bit codes or codebooks of the pruned
  model); the first stage's finished model is also exported in float, so the report shows what each
  stage did on its own.

Each target goes to the stage that meets it: the first stage's kinds (``--target-speedup`` for
channel) steer the search; the others (``--target-bits``, ``--target-sparsity``,
``--target-compression``) go to the last stage and are checked on the shipped file. A compression
target is overall (the original baseline's float TFLite file over the shipped one), so the last stage
sizes its file with the pruning already counted: the overall target is split between the stages by
what the first one reached. The last stage is also set by its options (``--bits 8``,
``uniform.qat_epochs``). ``SUPPORTED`` lists the chains.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import optuna
import tensorflow as tf

from learners.base import LEARNERS, Candidate, Learner, LearnerContext
from pocketflow.config import TargetConfig, check_fields, parse_section
from pocketflow.errors import ConfigError
from pocketflow.metrics import count_macs, count_params
from pocketflow.training import accuracy

log = logging.getLogger(__name__)

SHARE = (lambda value: 0.0 <= value <= 1.0, "must be in [0, 1] (a share of the fine-tuning epochs)")

# (first stage, last stage): the chains that run end to end and are tested. Others need a last stage
# that can take a pruned model as its baseline, or a first stage whose result is plain Keras.
# channel+uniform is int8, or mixed low-bit when --target-bits / --target-compression / uniform.bits ask
# for fewer bits (uniform's own rule); channel+non-uniform ships per-layer codebooks; channel+weight-sparse
# zeros in the pruned model's kernels (float or, with --bits 8, int8 values).
SUPPORTED: Tuple[Tuple[str, str], ...] = (("channel", "uniform"), ("channel", "non-uniform"),
                                          ("channel", "weight-sparse"))


@dataclass(frozen=True)
class ChainConfig:
    """Options of a chain of learners (each stage keeps its own section)."""

    # Share of the fine-tuning epochs (--finetune-epochs) the last stage trains for (QAT for int8);
    # the first stage's model recovers for the rest. uniform.qat_epochs, when set, overrides it.
    last_stage_share: float = 0.2

    def __post_init__(self) -> None:
        check_fields("chain", self, {"last_stage_share": SHARE})


@dataclass(frozen=True)
class ChainOptions:
    """A chain's own options and each stage's, by stage name (the runner reads them from their sections)."""

    last_stage_share: float = 0.2
    stages: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ChainState:
    """A candidate that went through every stage: what each stage produced and what it reported."""

    first: Candidate  # the first stage's finished (fine-tuned, finalized) candidate
    last_learner: Learner
    last: Candidate
    records: List[Dict[str, Any]]


class ChainLearner(Learner):
    """Stages in order; subclasses made by ``chain_class`` name them."""

    stage_classes: ClassVar[Tuple[type, ...]] = ()
    Config = ChainConfig

    # ------------------------------------------------------------------ options
    @classmethod
    def parse_options(cls, section: Mapping[str, Any], source: str) -> ChainOptions:
        """The chain's own keys, plus ``stages: {name: section}`` for the stages' options."""
        section = dict(section)
        given = section.pop("stages", None) or {}
        unknown = sorted(set(given) - {stage.name for stage in cls.stage_classes})
        if unknown:
            raise ConfigError(f"{cls.name}.stages in {source} names {', '.join(unknown)}: the stages of this chain "
                              f"are {', '.join(stage.name for stage in cls.stage_classes)}")
        try:
            own = parse_section(ChainConfig, section, f"{cls.name}.", source)
        except ConfigError as error:  # the key as the user writes it: channel+uniform.last_stage_share
            raise ConfigError(str(error).replace("chain.", f"{cls.name}.")) from None
        stages = {stage.name: stage.parse_options(given.get(stage.name) or {}, source) for stage in cls.stage_classes}
        return ChainOptions(own.last_stage_share, stages)

    @classmethod
    def run_options(cls, sections: Mapping[str, Mapping[str, Any]], source: str) -> ChainOptions:
        stages = {stage.name: sections.get(stage.name, {}) for stage in cls.stage_classes}
        return cls.parse_options({**sections.get(cls.name, {}), "stages": stages}, source)

    @classmethod
    def recorded_sections(cls, options: ChainOptions) -> Dict[str, Dict[str, Any]]:
        recorded = {cls.name: {"last_stage_share": options.last_stage_share}}
        for stage in cls.stage_classes:
            recorded.update(stage.recorded_sections(options.stages[stage.name]))
        return recorded

    @classmethod
    def plan_lines(cls, options: ChainOptions, finetune_epochs: float) -> List[str]:
        first, last = (stage.name for stage in cls.stage_classes)
        share = finetune_epochs * options.last_stage_share
        first_epochs = finetune_epochs - share
        override = getattr(options.stages[last], "qat_epochs", None)  # uniform.qat_epochs replaces the share
        last_epochs = share if override is None else override
        return [f"stages:     {first} (searched; its winner fine-tuned {first_epochs:g} epochs), then "
                f"{last} on that model ({last_epochs:g} epochs; its file ships)"]

    @classmethod
    def stage_targets(cls, target: TargetConfig) -> Tuple[TargetConfig, TargetConfig]:
        """(the first stage's targets, the last stage's): a kind the first stage meets is its own, the
        rest belong to the last stage (compression there is overall, see the module docstring)."""
        first = cls.stage_classes[0]
        requested = target.requested()
        return (TargetConfig(**{kind: value for kind, value in requested.items() if kind in first.targets}),
                TargetConfig(**{kind: value for kind, value in requested.items() if kind not in first.targets}))

    @classmethod
    def searched_targets(cls, target: TargetConfig) -> Dict[str, float]:
        return cls.stage_targets(target)[0].requested()

    @classmethod
    def check_target(cls, target: TargetConfig) -> None:
        unsupported = [kind for kind in target.requested() if kind not in cls.targets]
        if unsupported:
            stages = "; ".join(f"{stage.name}: {', '.join(f'--target-{kind}' for kind in stage.targets) or 'none'}"
                               for stage in cls.stage_classes)
            raise ConfigError(f"learner '{cls.name}' cannot meet target {', '.join(unsupported)}; its stages take "
                              f"{stages}")
        for stage, routed in zip(cls.stage_classes, cls.stage_targets(target)):
            try:
                stage.check_target(routed)
            except ConfigError as error:
                raise ConfigError(f"the {stage.name} stage of '{cls.name}': {error}") from None

    # ------------------------------------------------------------------ the first stage: searched
    def __init__(self, options: ChainOptions, context: LearnerContext) -> None:
        super().__init__(options, context)
        first_class = self.stage_classes[0]
        # The first stage's choices that depend on its fine-tuning budget (channel's criterion) see its share.
        first_context = dataclasses.replace(context, target=self.stage_targets(context.target)[0],
                                            finetune_epochs=context.finetune_epochs * (1.0 - options.last_stage_share))
        self.first = first_class(options.stages[first_class.name], first_context)

    def prepare(self, baseline: tf.keras.Model) -> None:
        super().prepare(baseline)
        self.first.prepare(baseline)

    def reachable(self) -> Dict[str, float]:
        return self.first.reachable()

    def unreachable_hint(self) -> str:
        return self.first.unreachable_hint()

    def search_space(self, trial: Any) -> Any:
        return self.first.search_space(trial)

    def reference_params(self) -> Dict[str, Any]:
        return self.first.reference_params()

    def max_trials(self) -> Optional[int]:
        return self.first.max_trials()

    def compress(self, hparams: Any) -> Candidate:
        return self.first.compress(hparams)

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        if isinstance(candidate.state, ChainState):
            return self.first.candidate_metrics(candidate.state.first)
        return self.first.candidate_metrics(candidate)

    # ------------------------------------------------------------------ the winner through every stage
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Any] = None) -> Candidate:
        """The first stage's fine-tuning, then the last stage built on its finished model and trained."""
        if isinstance(candidate.state, ChainState):
            return candidate
        last_epochs = round(epochs * self.options.last_stage_share, 4)
        first_epochs = round(epochs - last_epochs, 4)
        first = self.first
        if first_epochs > 0:
            candidate = first.finetune(candidate, first_epochs, teacher=teacher)
        finished = first.finalize(candidate)
        record: Dict[str, Any] = {"learner": first.name, "finetune_epochs": first_epochs,
                                  "macs": count_macs(finished.model)}
        if self.context.distributed.is_chief:
            record["keras_test_accuracy"] = accuracy(finished.model, self.context.dataset.test(256))
        log.info("stage 1 (%s) finished%s; stage 2 (%s) starts from it", first.name,
                 f": test accuracy {record['keras_test_accuracy']:.4f} in float" if "keras_test_accuracy" in record
                 else "", self.stage_classes[-1].name)

        # The last stage's targets, and the original baseline's file size: its compression is overall.
        last_target = self.stage_targets(self.context.target)[1]
        last_options = self.options.stages[self.stage_classes[-1].name]
        last_class = self.stage_classes[-1].strategy(last_options, self._relative(last_target, finished.model))
        context = dataclasses.replace(self.context, target=last_target, baseline_macs=record["macs"],
                                      finetune_epochs=last_epochs)
        last = last_class(last_options, context)
        last.prepare(finished.model)
        hparams = last.search_space(optuna.trial.FixedTrial(last.reference_params()))
        compressed = last.compress(hparams)
        if last_epochs > 0:
            compressed = last.finetune(compressed, last_epochs, teacher=teacher)
        records = [record, {"learner": last.name, "finetune_epochs": last_epochs}]
        state = ChainState(first=finished, last_learner=last, last=compressed, records=records)
        return Candidate(compressed.model, candidate.hparams, state=state)

    def _relative(self, target: TargetConfig, pruned: tf.keras.Model) -> TargetConfig:
        """``target`` with its overall compression turned into what the last stage itself must add
        (parameters scale the float file): what a strategy choice reads (uniform: int8 up to 3x,
        low-bit codes beyond), so int8 is kept where it meets the overall target with the pruning."""
        if target.compression is None:
            return target
        remaining = target.compression * count_params(pruned) / count_params(self.baseline)
        return dataclasses.replace(target, compression=remaining if remaining > 1.0 else None)

    def finalize(self, candidate: Candidate) -> Candidate:
        if not isinstance(candidate.state, ChainState):  # no fine-tuning epochs: the stages still run
            candidate = self.finetune(candidate, 0.0)
        state = candidate.state
        state.last = state.last_learner.finalize(state.last)
        return Candidate(state.last.model, candidate.hparams, state=state)

    # ------------------------------------------------------------------ report and ship
    def describe(self, candidate: Candidate) -> Dict[str, Any]:
        state = self._state(candidate)
        first_facts = self.first.describe(state.first)
        last_facts = state.last_learner.describe(state.last)
        state.records[0].update({key: value for key, value in first_facts.items() if key != "report_sections"})
        state.records[1].update({key: value for key, value in last_facts.items() if key != "report_sections"})
        sections = first_facts.get("report_sections", []) + last_facts.get("report_sections", [])
        return {**last_facts, "stages": state.records, "report_sections": sections}

    def write_artifacts(self, candidate: Candidate, directory: Path) -> Dict[str, Any]:
        """The last stage's shipped file; the first stage's finished model in float beside it
        (``stage1_float.tflite``), measured the same way, so each stage's own effect is on record."""
        state = self._state(candidate)
        images, labels = self.context.dataset.test_arrays()
        first = self.context.export_and_measure(state.first.model, Path(directory) / "stage1_float.tflite", "float",
                                                images, labels)
        state.records[0].update(tflite_path=first.path, tflite_accuracy=first.accuracy, bytes=first.bytes,
                                tflite_latency_ms=first.latency_ms)
        fields = state.last_learner.write_artifacts(state.last, directory)
        if fields.get("qat_epochs") is not None:  # what the int8 stage trained (uniform.qat_epochs may override)
            state.records[1]["finetune_epochs"] = fields["qat_epochs"]
        state.records[1].update({key: fields[key] for key in ("shipped_format", "shipped_method", "tflite_path",
                                                              "tflite_accuracy", "artifact_path", "artifact_bytes",
                                                              "artifact_accuracy", "tflite_latency_ms")
                                 if key in fields})
        lines = [f"{index}. {record['learner']}: " + _stage_line(record) for index, record in
                 enumerate(state.records, 1)]
        sections = [{"title": f"Stages of {self.name}", "lines": lines}]
        return {**fields, "stages": state.records,
                "report_sections": self.describe(candidate)["report_sections"] + sections}

    def _state(self, candidate: Candidate) -> ChainState:
        if not isinstance(candidate.state, ChainState):
            raise RuntimeError(f"learner '{self.name}': finalize the candidate before describing or shipping it")
        return candidate.state


def _stage_line(record: Mapping[str, Any]) -> str:
    parts = [f"fine-tuned {record['finetune_epochs']:g} epochs"]
    if record.get("shipped_method"):
        parts.append(f"shipped {record['shipped_method']}")
    if record.get("macs"):
        parts.append(f"{record['macs']:,} MACs")
    measured = record.get("tflite_accuracy", record.get("artifact_accuracy"))  # a container: measured in Keras
    if measured is not None:
        size = record.get("artifact_bytes") or record.get("bytes")
        parts.append(f"{record.get('shipped_format', 'float TFLite')} test accuracy {100 * measured:.2f}%"
                     + (f", {size / 1024:.1f} KB" if size else "")
                     + (f", {record['tflite_latency_ms']:.3f} ms" if record.get("tflite_latency_ms") else ""))
    return "; ".join(parts)


def chain_class(first: str, last: str) -> type:
    """The learner class of the chain ``first+last`` (registered under that name by ``register_chains``)."""
    first_class, last_class = LEARNERS.get(first), LEARNERS.get(last)
    attributes = {
        "name": f"{first}+{last}",
        "stage_classes": (first_class, last_class),
        "sections": (first, last),
        "targets": first_class.targets + tuple(kind for kind in last_class.targets if kind not in first_class.targets),
        "searches": first_class.searches,
        "pareto_cost": first_class.pareto_cost,
        "distill_by_default": first_class.distill_by_default,
        "__doc__": f"{first} then {last} in one run (a chain; each stage keeps its own section).",
    }
    return type(f"Chain_{first}_{last}".replace("-", "_"), (ChainLearner,), attributes)


def register_chains() -> None:
    for first, last in SUPPORTED:
        cls = chain_class(first, last)
        LEARNERS.add(cls.name, cls)
