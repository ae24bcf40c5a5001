"""Typed run configuration: YAML -> dict -> CLI overrides -> frozen dataclasses.

Every value is checked where it enters: an unknown key, a wrong type or a value out of
range raises ConfigError naming the key, the value, where it came from and the fix.
Learner sections (top-level keys named after a learner, e.g. ``channel:``) are kept as
plain dicts here and validated against the learner's own Config dataclass by
``parse_section``, so this module does not need to know the learners.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Tuple, Union

import yaml

from pocketflow.errors import ConfigError

# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how raw pixels become model inputs."""

    name: Optional[str] = None  # None: the net's default dataset
    dir: Optional[str] = None
    scale: float = 1.0 / 255.0  # raw pixels are multiplied by this first
    mean: Optional[Tuple[float, ...]] = None  # then (x - mean) / std, per channel
    std: Optional[Tuple[float, ...]] = None
    validation_split: float = 0.1  # carved from the training data, used to choose; never the test split
    image_size: Optional[int] = None  # resize (TFRecord images); None keeps the dataset's size
    augment: Optional[bool] = None  # None: the net's default (random crop + flip for CIFAR nets)

    def __post_init__(self) -> None:
        _check(self.scale > 0, "data.scale", self.scale, "must be > 0 (1/255 maps 0-255 pixels to 0-1)")
        _check(0.0 < self.validation_split < 0.9, "data.validation_split", self.validation_split,
               "must be in (0, 0.9)")
        if self.std is not None:
            _check(all(s > 0 for s in self.std), "data.std", self.std, "every entry must be > 0")
        if self.mean is not None and self.std is not None:
            _check(len(self.mean) == len(self.std), "data.std", self.std,
                   f"must have as many entries as data.mean ({len(self.mean)})")
        if self.image_size is not None:
            _check(self.image_size >= 8, "data.image_size", self.image_size, "must be >= 8")


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule. None means: use the net's default for that value."""

    epochs: Optional[float] = None  # 0: build or load, evaluate, export; no training
    finetune_epochs: Optional[float] = None  # fine-tuning of the best compressed candidate
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    schedule: Optional[Literal["cosine", "step", "constant"]] = None
    optimizer: Optional[Literal["sgd", "adam"]] = None
    weight_decay: Optional[float] = None
    scale_learning_rate: bool = True  # multiply by the number of Horovod workers
    # auto: bfloat16 for models whose layer widths are multiples of 16, on CPUs with AVX512-BF16 / AMX or GPUs
    # with bfloat16 tensor cores; float32 elsewhere (README, Training precision)
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "finetune_epochs"):
            value = getattr(self, name)
            if value is not None:
                _check(value >= 0, f"train.{name}", value, "must be >= 0")
        if self.batch_size is not None:
            _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        if self.learning_rate is not None:
            _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "must be > 0")
        if self.weight_decay is not None:
            _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")


def target_flag(kind: str) -> str:
    """The command-line flag of a target kind: latency_ms -> --target-latency-ms."""
    return "--target-" + kind.replace("_", "-")


@dataclass(frozen=True)
class TargetConfig:
    """What the compressed model must reach. Learners say which of these they accept."""

    speedup: Optional[float] = None  # baseline MACs / compressed MACs
    compression: Optional[float] = None  # float TFLite bytes of the baseline / bytes of the shipped file
    # TFLite latency of the baseline's file / the shipped file's (batch 1, one thread, timed in turn)
    latency_speedup: Optional[float] = None
    latency_ms: Optional[float] = None  # the shipped TFLite file's latency on this machine (batch 1, one thread)
    sparsity: Optional[float] = None  # fraction of prunable weights that are zero
    bits: Optional[float] = None  # parameter-weighted average weight bits

    def __post_init__(self) -> None:
        if self.speedup is not None:
            _check(1.0 < self.speedup <= 1000.0, "target.speedup", self.speedup,
                   "must be > 1 (2.5 means 2.5x fewer multiply-accumulates)")
        if self.compression is not None:
            _check(1.0 < self.compression <= 1000.0, "target.compression", self.compression,
                   "must be > 1 (8 means an 8x smaller file)")
        if self.latency_speedup is not None:
            _check(1.0 < self.latency_speedup <= 1000.0, "target.latency_speedup", self.latency_speedup,
                   "must be > 1 (2 means the shipped TFLite file runs in half the baseline's time)")
        if self.latency_ms is not None:
            _check(self.latency_ms > 0, "target.latency_ms", self.latency_ms,
                   "must be > 0 milliseconds (the shipped file's latency at batch 1 on this machine)")
        if self.sparsity is not None:
            _check(0.0 < self.sparsity < 1.0, "target.sparsity", self.sparsity,
                   "must be in (0, 1), e.g. 0.8 for 80% zeros")
        if self.bits is not None:
            _check(1.0 <= self.bits <= 16.0, "target.bits", self.bits, "must be in [1, 16]")

    def requested(self) -> Dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class HpoConfig:
    """The Optuna search."""

    trials: int = 20
    timeout: Optional[float] = None  # seconds for the whole search
    sampler: Literal["tpe", "random", "gp", "cmaes", "nsga2"] = "tpe"
    storage: Optional[str] = None  # Optuna RDB URL; None: sqlite:///<output_dir>/study.db
    study_name: Optional[str] = None
    # accuracy: the most accurate candidate that meets the target; pareto: accuracy vs cost (MACs,
    # or bytes for size learners), ending with the non-dominated set fine-tuned and exported.
    objective: Literal["accuracy", "pareto"] = "accuracy"

    def __post_init__(self) -> None:
        _check(self.trials >= 1, "hpo.trials", self.trials, "must be >= 1")
        if self.timeout is not None:
            _check(self.timeout > 0, "hpo.timeout", self.timeout, "must be > 0 seconds")


@dataclass(frozen=True)
class ExportConfig:
    """TFLite export and the measurements made on the exported file."""

    tflite: bool = True
    quantize: Literal["none", "dynamic", "int8"] = "none"  # added next to the float file
    latency_runs: int = 50
    threads: int = 1
    representative_samples: int = 200

    def __post_init__(self) -> None:
        _check(self.latency_runs >= 1, "export.latency_runs", self.latency_runs, "must be >= 1")
        _check(self.threads >= 1, "export.threads", self.threads, "must be >= 1")
        _check(self.representative_samples >= 1, "export.representative_samples",
               self.representative_samples, "must be >= 1")


SEARCH = "search"  # a hyperparameter value that lets the optimizer choose
AUTO = "auto"  # a setting the run resolves from the learner


@dataclass(frozen=True)
class DistillationConfig:
    """Knowledge distillation from the uncompressed baseline during fine-tuning (learners/distillation.py)."""

    # auto: on for the learners that declare it worth its cost (channel), off for the others;
    # the run resolves it and config.yaml records what ran.
    enabled: Union[bool, Literal["auto"]] = "auto"
    temperature: Union[float, str] = 4.0  # T > 0, or "search"
    alpha: Union[float, str] = 0.9  # weight of the soft (teacher) term in [0, 1], or "search"
    temperature_range: Tuple[float, float] = (1.0, 10.0)  # searched on a log scale
    alpha_range: Tuple[float, float] = (0.3, 0.95)
    # When T or alpha is searched: each trial's candidate is fine-tuned this long with its T and
    # alpha before it is scored, so the search measures what they do.
    search_epochs: float = 0.5
    # Weight of the feature term, where the learner offers matched layers (channel pruning: the residual
    # blocks' outputs on the channels kept); 0 turns it off. learners/distillation.py says what it is.
    feature_weight: float = 0.0
    # A Keras model file to distil from instead of the baseline (e.g. a deeper net trained on the same
    # data with the same input scaling); None: the baseline. It must take the baseline's inputs and
    # predict its classes; the run checks its validation accuracy against the baseline's before use.
    teacher: Optional[str] = None

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool) or self.enabled == AUTO, "distillation.enabled", self.enabled,
               "must be true, false or 'auto'")
        _check(self.teacher is None or (isinstance(self.teacher, str) and self.teacher.strip() != ""),
               "distillation.teacher", self.teacher, "must be the path of a Keras model file, or null")
        _check(isinstance(self.feature_weight, (int, float)) and not isinstance(self.feature_weight, bool)
               and self.feature_weight >= 0, "distillation.feature_weight", self.feature_weight, "must be a number >= 0")
        for name, value, rule in (("temperature", self.temperature, "a number > 0"),
                                  ("alpha", self.alpha, "a number in [0, 1]")):
            if value == SEARCH:
                if self.enabled is False:
                    raise ConfigError(f"distillation.{name} = 'search' needs distillation: enabled (pass "
                                      f"--distill, or --set distillation.enabled=true)")
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value > 0 if name == "temperature" else 0.0 <= value <= 1.0)
            _check(ok, f"distillation.{name}", value, f"must be {rule} or 'search'")
        for name, bounds, positive in (("temperature_range", self.temperature_range, True),
                                       ("alpha_range", self.alpha_range, False)):
            ok = len(bounds) == 2 and bounds[0] < bounds[1] and (bounds[0] > 0 if positive else
                                                                  0.0 <= bounds[0] and bounds[1] <= 1.0)
            _check(ok, f"distillation.{name}", bounds,
                   "must be [low, high] with low < high" + (", low > 0" if positive else ", within [0, 1]"))
        _check(self.search_epochs > 0, "distillation.search_epochs", self.search_epochs, "must be > 0")
        if self.teacher is not None and self.enabled is False:
            raise ConfigError("--teacher names a model to distil from, but distillation is off (--no-distill or "
                              "distillation.enabled=false); drop one of them")
        if self.teacher is not None and self.feature_weight > 0:
            raise ConfigError("--distill-features matches the student's layers with the baseline's by name, so it "
                              "needs the baseline as teacher; drop --teacher or --distill-features")


@dataclass(frozen=True)
class ParetoConfig:
    """--objective pareto: how many front models to finish, and an optional budget to pick one by."""

    max_models: int = 6  # front models fine-tuned, exported and measured (spread along the cost axis)
    min_models: int = 3  # fewer on the first front: models of the next fronts are finished too
    pick_latency_ms: Optional[float] = None  # the most accurate model whose TFLite latency fits
    pick_size_kb: Optional[float] = None  # the most accurate model whose shipped file fits (KiB)

    def __post_init__(self) -> None:
        _check(self.max_models >= 1, "pareto.max_models", self.max_models, "must be >= 1")
        _check(1 <= self.min_models <= self.max_models, "pareto.min_models", self.min_models,
               f"must be in [1, pareto.max_models = {self.max_models}]")
        for name in ("pick_latency_ms", "pick_size_kb"):
            value = getattr(self, name)
            if value is not None:
                _check(value > 0, f"pareto.{name}", value, "must be > 0")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; written to <output_dir>/config.yaml so the run can be repeated."""

    learner: str = "full-prec"
    net: Optional[str] = None  # None: the dataset's default net (digits_cnn for the default dataset)
    model: Optional[str] = None  # a user's trained Keras model; replaces the built-in net as baseline
    # Let --model files run the Python code their Lambda layers carry (only for files you trust).
    trust_model: bool = False
    output_dir: Optional[str] = None
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    hpo: HpoConfig = field(default_factory=HpoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    pareto: ParetoConfig = field(default_factory=ParetoConfig)
    # Learner sections as given (validated against each learner's Config by the learner registry).
    learners: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        for name in ("pick_latency_ms", "pick_size_kb"):
            if getattr(self.pareto, name) is not None and self.hpo.objective != "pareto":
                raise ConfigError(f"pareto.{name} = {getattr(self.pareto, name)!r} picks a model from a Pareto "
                                  f"front; add --objective pareto (or --set hpo.objective=pareto)")

    def learner_section(self, name: str) -> Mapping[str, Any]:
        return self.learners.get(name, {})

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "learners":
                out.update({k: _plain(dict(v)) for k, v in value.items()})
            elif dataclasses.is_dataclass(value):
                out[f.name] = _plain(dataclasses.asdict(value))
            else:
                out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range: it {rule}")


# Rules for ``check_fields``: (test, what the error says the value must be).
Rule = Tuple[Callable[[Any], bool], str]
AT_LEAST_0: Rule = (lambda value: value >= 0, "must be >= 0")
AT_LEAST_1: Rule = (lambda value: value >= 1, "must be >= 1")
POSITIVE: Rule = (lambda value: value > 0, "must be > 0")
RATE_FRACTION: Rule = (lambda value: 0.0 < value <= 10.0,
                       "must be in (0, 10] (a fraction of the net's learning rate)")


def check_fields(section: str, config: Any, rules: Mapping[str, Rule]) -> None:
    """Range-check fields of a learner's config section, so every learner words the error the same
    way (``section.field = value is out of range: it must ...``); None (an unset optional) passes."""
    for name, (ok, rule) in rules.items():
        value = getattr(config, name)
        if value is not None:
            _check(ok(value), f"{section}.{name}", value, rule)


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (not 'the last wins'), and
    that an exponent without a dot is a number: YAML 1.1 (PyYAML) reads ``1e-4`` as a string, so
    ``--set train.weight_decay=1e-4`` was refused with "must be a number" (YAML 1.2 reads it as a float)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(  # after the int and YAML 1.1 float patterns, which are tried first
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml_file(path: str) -> Dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file to --config")
    if not file.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"config file '{path}' cannot be read ({reason}); pass a YAML text file to "
                          f"--config") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader that refuses duplicate keys
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                          f"{getattr(error, 'problem', error)}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys (learner:, data:, ...), "
                          f"not a {type(data).__name__}")
    return data


def parse_override(text: str) -> Tuple[str, Any]:
    """Parse one ``--set section.key=value`` (value read as YAML: numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}' needs the form section.key=value, e.g. --set train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{text}' has no key before '='")
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else None  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        raise ConfigError(f"--set '{text}': the value '{raw}' is not valid YAML; quote it") from None
    return key, value


def apply_override(data: Dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``a.b.c = value`` inside nested dicts, creating sections as needed."""
    parts = dotted_key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted_key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_run_config(data: Mapping[str, Any], learner_names: typing.Iterable[str],
                     source: str = "the configuration") -> RunConfig:
    """Turn a merged dict into a RunConfig; learner sections are recognised by learner name."""
    known_learners = set(learner_names)
    plain: Dict[str, Any] = {}
    learners: Dict[str, Mapping[str, Any]] = {}
    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"learners"}
    for key, value in data.items():
        if key == "learner" and isinstance(value, list):  # learner: [channel, uniform] is the chain channel+uniform
            value = "+".join(str(stage) for stage in value)
        if key in fields:
            plain[key] = value
        elif key in known_learners:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {source} must be a section (a mapping), not {value!r}")
            learners[key] = dict(value)
        else:
            options = sorted(fields) + sorted(known_learners)
            raise ConfigError(f"unknown key '{key}' in {source}; known keys: {', '.join(options)}")
    config = parse_section(RunConfig, plain, "", source)
    return dataclasses.replace(config, learners=learners)


def parse_section(cls: type, data: Any, prefix: str, source: str) -> Any:
    """Build dataclass ``cls`` from a dict, checking keys and types recursively."""
    where = prefix.rstrip(".") or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' in {source} must be a section (a mapping), not {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "learners"}
    values: Dict[str, Any] = {}
    for key, value in data.items():
        removed = getattr(cls, "REMOVED", {})
        if key not in known and key in removed:
            raise ConfigError(f"'{prefix}{key}' in {source} is no longer an option: {removed[key]}")
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}' in {source}; "
                              f"known keys in '{where}': {', '.join(sorted(known))}")
        values[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{error} (in {source})") from None


def _spelled(hint: Any) -> str:
    """The values a simple hint accepts, as a user writes them (for a union's one error); '' otherwise."""
    if hint is bool:
        return "true, false"
    if typing.get_origin(hint) is Literal:
        return ", ".join(str(a) for a in typing.get_args(hint))
    return ""


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check ``value`` against a type hint; convert where lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(value, candidate, key, source)
            except ConfigError as error:
                errors.append(error)
        spelled = [_spelled(candidate) for candidate in inner]
        if len(inner) > 1 and all(spelled):
            raise ConfigError(f"{key} = {value!r} in {source} is not allowed; choose one of: {', '.join(spelled)}")
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, f"{key}.", source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} in {source} is not allowed; choose one of: "
                              f"{', '.join(str(a) for a in args)}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} in {source} must be a list, e.g. [0.5, 0.5, 0.5]")
        item_hint = args[0] if args else Any
        return tuple(_coerce(v, item_hint, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} in {source} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} = {value!r} in {source} must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} in {source} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} in {source} must be a string")
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key} = {value!r} in {source} has the wrong type; expected {hint}")
