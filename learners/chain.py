"""Chains: learners applied in order in one run, e.g. channel pruning then int8 (``--learner channel+uniform``).

What a deployment engineer ships is usually two techniques at once: a pruned model in int8. A chain
is a learner like any other (the runner, the search, the report and ``ship/`` see one learner), made
of stages that each keep their own options section (``channel:``, ``uniform:``):

- The first stage is searched exactly as on its own: its trials, its target, its trial score. The
  search is staged: a candidate is scored before the later stages run, because the later ones
  change accuracy little and uniformly across candidates (measured for int8), while running them per
  trial would cost a training each. ``<chain>.search: joint`` instead has every trial propose the last
  stage's hyperparameters too (codebook or low-bit widths, ...): the trial's pruned candidate goes
  through the last stage's ``compress`` (no training) and is scored and checked against every target
  as the final file would be, so the search trades one stage against the other.
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
what the first one reached. With ``--target-bits`` as well, the last stage's width is fixed, so the
pruning makes up the rest (``ChainLearner.pruning_compression``): the last stage's file is sized
before any training on the original model and on the first stage's reference candidate, and the first
stage searches under the float-file budget that puts the last stage's file on the overall target. The
last stage is also set by its options (``--bits 8``, ``uniform.qat_epochs``). ``SUPPORTED`` lists the
chains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Tuple

import optuna
import tensorflow as tf

from learners.base import LEARNERS, Candidate, Learner, LearnerContext
from pocketflow.config import TargetConfig, check_fields, parse_section, target_flag
from pocketflow.errors import ConfigError
from pocketflow.export import compare_latency, convert, write_atomic
from pocketflow.metrics import count_macs, count_params
from pocketflow.runs import stage_summary
from pocketflow.training import accuracy

log = logging.getLogger(__name__)

# An overall size split at fixed bits plans the last stage's file this far under the budget: the line
# through two sized files misses a pruned structure's per-channel records (scales, zero points, biases)
# by up to about 1% (digits int8: 7.999x for 8x at 0.5%).
SPLIT_MARGIN = 0.02
# An overall latency target's split times four files (the original's and the reference candidate's,
# float and last stage) in turn this many rounds, and records the timings in the run directory.
LATENCY_SPLIT_ROUNDS = 3
LATENCY_SPLIT_FILE = "latency_split.json"
# ... and plans the last stage's file this far under the target's time: the pruning's own planning margin is
# on its float file, which moves the int8 file's time little (ResNet-56 here: predicted 2.458x, shipped 2.436x).
# Where the int8 time is that flat in the float time, every point of margin costs a lot of pruning (3% took
# ResNet-56 from 2.9x to 7.0x fewer MACs for 2.45x), so it is kept to the prediction's error.
LATENCY_SPLIT_MARGIN = 0.015
SHARE = (lambda value: 0.0 <= value <= 1.0, "must be in [0, 1] (a share of the fine-tuning epochs)")

# (first stage, last stage): the chains that run end to end and are tested. Others need a last stage
# that can take a pruned model as its baseline, or a first stage whose result is plain Keras.
# channel+uniform is int8, or mixed low-bit when --target-bits / --target-compression / uniform.bits ask
# for fewer bits (uniform's own rule); channel+non-uniform ships per-layer codebooks; channel+weight-sparse
# zeros in the pruned model's kernels (float or, with --bits 8, int8 values). Zeros then int8
# (weight-sparse+uniform) is not built here: it is weight-sparse's own int8 stage, which keeps the zeros
# (learners/weight_sparsification/int8_chain.py).
SUPPORTED: Tuple[Tuple[str, str], ...] = (("channel", "uniform"), ("channel", "non-uniform"),
                                          ("channel", "weight-sparse"))


@dataclass(frozen=True)
class ChainConfig:
    """Options of a chain of learners (each stage keeps its own section)."""

    # Share of the fine-tuning epochs (--finetune-epochs) the last stage trains for (QAT for int8);
    # the first stage's model recovers for the rest. uniform.qat_epochs, when set, overrides it.
    last_stage_share: float = 0.2
    # staged: trials search the first stage alone, the last stage runs its reference hyperparameters on
    # the winner; joint: every trial proposes both stages' and is scored after both (no training).
    search: Literal["staged", "joint"] = "staged"

    def __post_init__(self) -> None:
        check_fields("chain", self, {"last_stage_share": SHARE})


@dataclass(frozen=True)
class ChainOptions:
    """A chain's own options and each stage's, by stage name (the runner reads them from their sections)."""

    last_stage_share: float = 0.2
    stages: Mapping[str, Any] = field(default_factory=dict)
    search: str = "staged"


@dataclass(frozen=True)
class JointHyperparameters:
    """A joint trial's choice: the first stage's hyperparameters and the last stage's raw parameters
    (re-applied to each pruned model, whose layers keep their names)."""

    first: Any
    last: Mapping[str, Any]


@dataclass
class JointTrial:
    """A joint trial's candidate: the pruned candidate, and the last stage's learner and candidate of it."""

    first: Candidate
    last_learner: Learner
    last: Candidate


class _RecordingTrial:
    """Passes a trial's suggestions through and keeps what was suggested (the last stage's parameters)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.values: Dict[str, Any] = {}

    def _record(self, name: str, value: Any) -> Any:
        self.values[name] = value
        return value

    def suggest_float(self, name: str, *args: Any, **kwargs: Any) -> float:
        return self._record(name, self.trial.suggest_float(name, *args, **kwargs))

    def suggest_int(self, name: str, *args: Any, **kwargs: Any) -> int:
        return self._record(name, self.trial.suggest_int(name, *args, **kwargs))

    def suggest_categorical(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._record(name, self.trial.suggest_categorical(name, *args, **kwargs))


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
        return ChainOptions(own.last_stage_share, stages, own.search)

    @classmethod
    def run_options(cls, sections: Mapping[str, Mapping[str, Any]], source: str) -> ChainOptions:
        stages = {stage.name: sections.get(stage.name, {}) for stage in cls.stage_classes}
        return cls.parse_options({**sections.get(cls.name, {}), "stages": stages}, source)

    @classmethod
    def recorded_sections(cls, options: ChainOptions) -> Dict[str, Dict[str, Any]]:
        recorded = {cls.name: {"last_stage_share": options.last_stage_share, "search": options.search}}
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
        if options.search == "joint":
            return [f"stages:     {first} and {last} searched together (each trial through both, no training); the "
                    f"winner's {first} fine-tuned {first_epochs:g} epochs, then its {last} ({last_epochs:g} epochs; "
                    f"its file ships)"]
        return [f"stages:     {first} (searched; its winner fine-tuned {first_epochs:g} epochs), then "
                f"{last} on that model ({last_epochs:g} epochs; its file ships)"]

    @classmethod
    def stage_targets(cls, target: TargetConfig) -> Tuple[TargetConfig, TargetConfig]:
        """(the first stage's targets, the last stage's): a kind the first stage meets is its own, the
        rest belong to the last stage. Compression is overall: the last stage's, unless --target-bits fixes
        that stage's width; then neither stage gets it as given (``pruning_compression`` derives the
        first stage's share once the baseline is known)."""
        first = cls.stage_classes[0]
        requested = target.requested()
        compression = requested.pop("compression", None)
        last = {kind: value for kind, value in requested.items() if kind not in first.targets}
        if compression is not None and not cls.splits_compression(target):
            last["compression"] = compression
        return (TargetConfig(**{kind: value for kind, value in requested.items() if kind in first.targets}),
                TargetConfig(**last))

    @classmethod
    def splits_compression(cls, target: TargetConfig) -> bool:
        """An overall compression with the last stage's bits fixed: the pruning must make up the rest."""
        return (target.compression is not None and target.bits is not None
                and "compression" in cls.stage_classes[0].targets)

    def searched_targets(self, target: TargetConfig) -> Dict[str, float]:
        """Staged: the first stage's targets (the rest are checked on the shipped file); joint: all of
        them, since each trial goes through both stages."""
        if self.options.search == "joint":
            return target.requested()
        searched = self.stage_targets(target)[0].requested()
        if self.latency_split is not None and self.first.context.target.latency_speedup is None:
            # the last stage alone meets the latency: the pruning plans none, and nothing predicts it per trial
            searched = {kind: value for kind, value in searched.items() if not kind.startswith("latency")}
        return searched

    @classmethod
    def check_target(cls, target: TargetConfig) -> None:
        unsupported = [kind for kind in target.requested() if kind not in cls.targets]
        if unsupported:
            stages = "; ".join(f"{stage.name}: {', '.join(target_flag(kind) for kind in stage.targets) or 'none'}"
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
        self._first_context = dataclasses.replace(
            context, target=self.stage_targets(context.target)[0],
            finetune_epochs=context.finetune_epochs * (1.0 - options.last_stage_share))
        self.first = first_class(options.stages[first_class.name], self._first_context)
        self.split: Optional[Dict[str, Any]] = None  # how an overall compression was split (report.json)
        self.latency_split: Optional[Dict[str, Any]] = None  # how an overall latency target was split
        self._reference: Optional[tf.keras.Model] = None
        self._proposing: Optional[Learner] = None  # joint search: the last stage on the original baseline

    def prepare(self, baseline: tf.keras.Model) -> None:
        if self._baseline is baseline:
            return
        super().prepare(baseline)
        self._proposing = None
        self._reference = None
        self.first.prepare(baseline)
        if self.options.search == "joint" and self._proposer().max_trials() == 1:
            raise ConfigError(f"{self.name}.search = joint needs a last stage with hyperparameters to search; "
                              f"{self._proposer().name} here has one candidate (int8): use {self.name}.search = staged")
        shares: Dict[str, Optional[float]] = {}
        if self.splits_compression(self.context.target):
            shares["compression"] = self.pruning_compression(baseline)
        target = self.context.target
        if (target.latency_speedup is not None or target.latency_ms is not None) and self.options.search != "joint":
            shares.update(self.pruning_latency(baseline))
        if shares:
            first_target = dataclasses.replace(self._first_context.target, **shares)
            first_class = self.stage_classes[0]
            self.first = first_class(self.options.stages[first_class.name],
                                     dataclasses.replace(self._first_context, target=first_target))
            self.first.prepare(baseline)

    def _reference_model(self) -> tf.keras.Model:
        """The first stage's reference candidate (its uniform ratios under its own targets): the second
        point, after the original model, of the lines that split an overall target between the stages."""
        if self._reference is None:
            self._reference = self.first.compress(self.first.search_space(optuna.trial.FixedTrial(
                self.first.reference_params()))).model
        return self._reference

    # ------------------------------------------------------------------ an overall size with fixed bits
    def pruning_compression(self, baseline: tf.keras.Model) -> Optional[float]:
        """How many times smaller the first stage must make the float file so that the last stage's
        file, at its fixed bits, meets the overall --target-compression (None: any pruning does).

        The last stage sizes its file before any training (``Learner.expected_bytes``) for the original
        model and for the first stage's reference candidate; its size is taken as linear in the float
        file's between those two points (both move with the weights the pruning removes)."""
        target = self.context.target
        base_float = self.context.distributed.broadcast_object(self.context.baseline_tflite_bytes)
        if not base_float:
            raise ConfigError("--target-compression needs the baseline's float TFLite size; do not pass --export "
                              "none with this target")
        reference = self._reference_model()
        ref_float = len(convert(reference, "float"))
        sizer = self._last_learner(baseline, 0.0)
        last_name, base_last = sizer.name, sizer.expected_bytes()
        ref_last = self._last_learner(reference, 0.0).expected_bytes()
        if base_last is None or ref_last is None:
            raise ConfigError(f"the {last_name} stage of '{self.name}' cannot size its file before training, "
                              f"so an overall --target-compression cannot be split with --target-bits fixed; give "
                              f"one of the two")
        goal = base_float / target.compression * (1.0 - SPLIT_MARGIN)
        if ref_float < base_float and base_last > ref_last:
            slope = (base_last - ref_last) / (base_float - ref_float)
        else:  # the reference prunes nothing: proportional
            slope = base_last / base_float
        needed = ref_float + (goal - ref_last) / slope
        if needed <= 0:
            raise ConfigError(f"an overall --target-compression of {target.compression:g} cannot be met at "
                              f"--target-bits {target.bits:g}: the {last_name} stage's fixed part alone "
                              f"is {ref_last - slope * ref_float:,.0f} bytes; lower the compression or the bits")
        share = base_float / needed
        self.split = {"overall_compression": target.compression, "bits": target.bits,
                      "pruning_float_compression": share,
                      "reference": {"float_bytes": ref_float, "last_stage_bytes": ref_last},
                      "baseline": {"float_bytes": base_float, "last_stage_bytes": base_last}}
        log.info("overall compression %gx at %g bits: the pruning makes the float file %.3gx smaller (its reference "
                 "candidate %.3gx; %s's file of it %.1f KB, of the original %.1f KB)", target.compression,
                 target.bits, share, base_float / ref_float, last_name, ref_last / 1024, base_last / 1024)
        return share if share > 1.0 else None

    # ------------------------------------------------------------------ an overall latency
    def pruning_latency(self, baseline: tf.keras.Model) -> Dict[str, Optional[float]]:
        """The first stage's latency targets: the float latency ratio it must plan for so that the last
        stage's file (int8) meets the overall latency target (None: the last stage alone does). Empty
        (the targets stay as given) where the last stage's file runs as a float file does (codebooks
        rebuilt in float) or cannot be made before training: then the pruning plans the whole target
        on the float curve, conservatively.

        As for a size, two points: the original model's float and last-stage files, and the first
        stage's reference candidate's, timed in turn; the last stage's time is taken as linear in the
        float file's between them (an int8 file's time falls more slowly with the channels than a
        float file's: measured on this project's AVX512/AMX machine, README "Fewer MACs, less time?").
        The timings are recorded in the run directory, so ``--resume`` plans with the same split."""
        target = self.context.target
        recorded = Path(self.context.run_directory) / LATENCY_SPLIT_FILE if self.context.run_directory else None
        timings = None
        if self.context.distributed.is_chief:
            timings = _load_timings(recorded) if recorded is not None else None
            if timings is None:
                timings = self._time_stage_files(baseline)
                if timings is not None and recorded is not None:
                    write_atomic(recorded, json.dumps(timings).encode())
        timings = self.context.distributed.broadcast_object(timings)
        if timings is None:
            log.info("latency target: the %s stage's file runs as a float file does; the pruning plans the whole "
                     "target on the float width curve", self.stage_classes[-1].name)
            return {}
        base_float, ref_float = timings["original"]["float"], timings["reference"]["float"]
        base_last, ref_last = timings["original"]["last"], timings["reference"]["last"]
        ratios = [target.latency_speedup] if target.latency_speedup is not None else []
        if target.latency_ms is not None:  # a time: the ratio the baseline's measured file must be sped up by
            base_ms = self.context.distributed.broadcast_object(self.context.baseline_latency_ms)
            if not base_ms:
                raise ConfigError("--target-latency-ms needs the baseline's TFLite latency; do not pass --export none "
                                  "with this target")
            ratios.append(base_ms / target.latency_ms)
        ratio = max(ratios)
        goal = base_float / (ratio * (1.0 + LATENCY_SPLIT_MARGIN))  # the last stage's file, on the timings' clock
        if ref_float < base_float and base_last > ref_last:
            slope = (base_last - ref_last) / (base_float - ref_float)
        else:  # the reference prunes nothing, or the last stage's file did not get faster: proportional
            slope = base_last / base_float
        needed = ref_float + (goal - ref_last) / slope
        last_name = self.stage_classes[-1].name
        if needed <= 0:
            raise ConfigError(f"an overall latency speedup of {ratio:.3g}x cannot be met by '{self.name}' here: the "
                              f"{last_name} file's time falls too little with pruning on this machine (original "
                              f"{base_last:.3f} ms, the pruning's reference candidate {ref_last:.3f} ms, while the "
                              f"float file went from {base_float:.3f} to {ref_float:.3f} ms); lower the target")
        share = base_float / needed
        if share <= 1.0:  # the last stage alone is fast enough
            others = [kind for kind in self._first_context.target.requested() if not kind.startswith("latency")]
            if not others:
                raise ConfigError(f"the {last_name} stage alone makes the file {base_float / base_last:.3g}x faster than "
                                  f"the original's float file, beyond the {ratio:.3g}x asked: the pruning has nothing "
                                  f"to do; ask for more, or give the pruning its own target (--target-speedup)")
        self.latency_split = {"overall_latency_speedup": ratio, "pruning_float_latency_speedup": share,
                              "timings_ms": timings, "slope": slope, "method": "original and reference files timed in turn "
                              f"(best of {LATENCY_SPLIT_ROUNDS} medians, batch 1); the {last_name} file's time "
                              "linear in the float file's between them"}
        log.info("overall latency %.3gx: the pruning plans its float file %.3gx faster (the %s file of the original "
                 "%.3f ms, of the reference candidate %.3f ms; float %.3f and %.3f ms)", ratio, max(share, 1.0),
                 last_name, base_last, ref_last, base_float, ref_float)
        if share > base_float / ref_float:  # past the reference candidate: extrapolated, and costly
            log.warning("the %s file alone runs %.2fx faster than the original's float file, and pruning moves it "
                        "little here (%.3f -> %.3f ms at the reference candidate); reaching %.3gx asks the pruning "
                        "for more than the reference's %.2fx in float: expect a large accuracy cost, or ask for "
                        "%.2fx or less", last_name, base_float / base_last, base_last, ref_last, ratio,
                        base_float / ref_float, base_float / base_last)
        return {"latency_speedup": share if share > 1.0 else None, "latency_ms": None}

    def _time_stage_files(self, baseline: tf.keras.Model) -> Optional[Dict[str, Dict[str, float]]]:
        """The float and last-stage files of the original model and of the reference candidate, timed
        in turn (ms); None where the last stage's file runs as a float file does."""
        original_last = self._last_learner(baseline, 0.0).expected_file()
        if original_last is None:
            return None
        reference = self._reference_model()
        payloads = {("original", "float"): convert(baseline, "float"), ("original", "last"): original_last,
                    ("reference", "float"): convert(reference, "float"),
                    ("reference", "last"): self._last_learner(reference, 0.0).expected_file()}
        with tempfile.TemporaryDirectory(prefix="latency-split-") as directory:
            paths = {}
            for (model, kind), payload in payloads.items():
                paths[(model, kind)] = Path(directory) / f"{model}_{kind}.tflite"
                write_atomic(paths[(model, kind)], payload)
            timed = compare_latency(list(paths.values()), rounds=LATENCY_SPLIT_ROUNDS, min_seconds=0.2,
                                    threads=self.context.threads)
        timings: Dict[str, Dict[str, float]] = {"original": {}, "reference": {}}
        for (model, kind), path in paths.items():
            timings[model][kind] = timed[str(path)]
        return timings

    def _overall_latency(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The first stage's predicted float latency figures as the last stage's file's (the split's line),
        so trials, their check and the reachable limit speak of the file that ships."""
        split = self.latency_split
        if split is None or "latency_speedup" not in metrics:
            return metrics
        timings, slope = split["timings_ms"], split["slope"]
        base_float, ref_float = timings["original"]["float"], timings["reference"]["float"]
        last = timings["reference"]["last"] + slope * (base_float / metrics["latency_speedup"] - ref_float)
        overall = base_float / last if last > 0 else float("inf")
        metrics = dict(metrics)
        if "latency_ms" in metrics:  # the first stage's: the baseline's measured file over its float ratio
            metrics["latency_ms"] *= metrics["latency_speedup"] / overall
        metrics["latency_speedup"] = overall
        return metrics

    def reachable(self) -> Dict[str, float]:
        return self._overall_latency(self.first.reachable())

    def unreachable_hint(self) -> str:
        split = self.latency_split
        if split is not None:
            timings, last = split["timings_ms"], self.stage_classes[-1].name
            return (f"the {last} file alone runs {timings['original']['float'] / timings['original']['last']:.2f}x "
                    f"faster than the original's float file, and pruning to the reference candidate (float file "
                    f"{timings['original']['float'] / timings['reference']['float']:.2f}x faster) made it only "
                    f"{timings['original']['last'] / timings['reference']['last']:.2f}x faster again on this machine "
                    f"(latency_split in report.json)")
        return self.first.unreachable_hint()

    def search_space(self, trial: Any) -> Any:
        first = self.first.search_space(trial)
        if self.options.search != "joint":
            return first
        recording = _RecordingTrial(trial)
        self._proposer().search_space(recording)
        return JointHyperparameters(first, dict(recording.values))

    def reference_params(self) -> Dict[str, Any]:
        params = self.first.reference_params()
        if self.options.search == "joint":
            last = self._proposer().reference_params()
            clash = sorted(set(params) & set(last))
            if clash:  # pragma: no cover - the registered learners' parameter names differ
                raise ConfigError(f"'{self.name}' cannot search both stages jointly: both name {', '.join(clash)}")
            params = {**params, **last}
        return params

    def max_trials(self) -> Optional[int]:
        if self.options.search == "joint":
            counts = [self.first.max_trials(), self._proposer().max_trials()]
            return None if None in counts else counts[0] * counts[1]
        return self.first.max_trials()

    def compress(self, hparams: Any) -> Candidate:
        if not isinstance(hparams, JointHyperparameters):
            return self.first.compress(hparams)
        first = self.first.compress(hparams.first)
        last = self._last_learner(first.model, 0.0)
        compressed = last.compress(last.search_space(optuna.trial.FixedTrial(dict(hparams.last))))
        return Candidate(compressed.model, hparams, state=JointTrial(first, last, compressed))

    def candidate_metrics(self, candidate: Candidate) -> Dict[str, float]:
        state = candidate.state
        first = state.first if isinstance(state, (ChainState, JointTrial)) else candidate
        metrics = self._overall_latency(self.first.candidate_metrics(first))
        metrics.pop("compression", None)  # the pruning's own file: not the overall figure the target names
        if isinstance(state, JointTrial):  # the last stage's figures (its compression is overall)
            last = state.last_learner.candidate_metrics(state.last)
            metrics.update({key: value for key, value in last.items() if key not in ("macs", "speedup", "params")})
        return metrics

    def _proposer(self) -> Learner:
        """The last stage on the original baseline: it names the last stage's searched parameters and
        their ranges, which a pruned model (same layer names) takes as they are."""
        if self._proposing is None:
            self._proposing = self._last_learner(self.baseline, 0.0)
        return self._proposing

    def _last_learner(self, model: tf.keras.Model, epochs: float) -> Learner:
        """The last stage, prepared on ``model``, with its targets (a compression is overall: its context
        keeps the original baseline's file size)."""
        last_target = self.stage_targets(self.context.target)[1]
        last_options = self.options.stages[self.stage_classes[-1].name]
        reference = model if self.options.search != "joint" else self.baseline  # joint: one method for all trials
        last_class = self.stage_classes[-1].strategy(last_options, self._relative(last_target, reference))
        context = dataclasses.replace(self.context, target=last_target, baseline_macs=count_macs(model),
                                      finetune_epochs=epochs)
        learner = last_class(last_options, context)
        learner.prepare(model)
        return learner

    # ------------------------------------------------------------------ the winner through every stage
    def finetune(self, candidate: Candidate, epochs: float, teacher: Optional[Any] = None) -> Candidate:
        """The first stage's fine-tuning, then the last stage built on its finished model and trained
        (staged: its reference hyperparameters; joint: the trial's)."""
        if isinstance(candidate.state, ChainState):
            return candidate
        chosen, last_params = candidate.hparams, None
        if isinstance(candidate.state, JointTrial):
            last_params = dict(chosen.last)
            candidate = candidate.state.first
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
        last = self._last_learner(finished.model, last_epochs)
        hparams = last.search_space(optuna.trial.FixedTrial(last_params if last_params is not None
                                                            else last.reference_params()))
        compressed = last.compress(hparams)
        if last_epochs > 0:
            compressed = last.finetune(compressed, last_epochs, teacher=teacher)
        records = [record, {"learner": last.name, "finetune_epochs": last_epochs}]
        state = ChainState(first=finished, last_learner=last, last=compressed, records=records)
        return Candidate(compressed.model, chosen, state=state)

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
        facts = {**last_facts, "stages": state.records, "report_sections": sections}
        if self.split is not None:
            facts["compression_split"] = self.split
        if self.latency_split is not None:
            facts["latency_split"] = self.latency_split
        return facts

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
        state.records[1].update({key: fields[key] for key in SHIPPED_FIELDS if key in fields})
        lines = stage_lines(state.records)
        if self.options.search == "joint":
            lines.append("Searched jointly: every trial went through both stages (no training) before it was scored "
                         "and checked against every target; the winner's last-stage hyperparameters were kept.")
        if self.split is not None:
            lines.append(f"The overall {self.split['overall_compression']:g}x at {self.split['bits']:g} bits was split: "
                         f"the pruning searched under a float file {self.split['pruning_float_compression']:.3g}x "
                         f"smaller than the original's (sized before training: see compression_split in report.json).")
        if self.latency_split is not None:
            lines.append(f"The overall {self.latency_split['overall_latency_speedup']:.3g}x in latency was split: the "
                         f"pruning planned its float file "
                         f"{self.latency_split['pruning_float_latency_speedup']:.3g}x faster than the original's "
                         f"(files timed before training: see latency_split in report.json).")
        sections = [{"title": f"Stages of {self.name}", "lines": lines}]
        return {**fields, "stages": state.records,
                "report_sections": self.describe(candidate)["report_sections"] + sections}

    def _state(self, candidate: Candidate) -> ChainState:
        if not isinstance(candidate.state, ChainState):
            raise RuntimeError(f"learner '{self.name}': finalize the candidate before describing or shipping it")
        return candidate.state


# What a last stage's write_artifacts says of the file it ships, copied into its stage record.
SHIPPED_FIELDS = ("shipped_format", "shipped_method", "tflite_path", "tflite_accuracy", "artifact_path",
                  "artifact_bytes", "artifact_accuracy", "tflite_latency_ms")


def stage_lines(records: List[Dict[str, Any]]) -> List[str]:
    """report.md's lines for a chain's stage records, one per stage."""
    return [f"{index}. {record['learner']}: " + stage_summary(record, detailed=True)
            for index, record in enumerate(records, 1)]


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


def _load_timings(path: Path) -> Optional[Dict[str, Dict[str, float]]]:
    """A run's recorded latency split timings, or None where missing or damaged (then timed again)."""
    try:
        timings = json.loads(Path(path).read_text())
        return {model: {kind: float(timings[model][kind]) for kind in ("float", "last")}
                for model in ("original", "reference")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
