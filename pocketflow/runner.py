"""The loop of DESIGN.md: config -> data and baseline -> learner (searched or not) -> fine-tune ->
finalize -> export -> measure -> report. Only the chief process writes files."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

import learners as learner_registry  # noqa: F401  (registers the learners)
from learners.base import LEARNERS, Candidate, Learner, LearnerContext
from nets import NETS, NetSpec, Schedule
from pocketflow import __version__, interrupts
from pocketflow.baseline import load_baseline, train_baseline
from pocketflow.config import RunConfig, target_flag
from pocketflow.data import DATASETS, load_dataset
from pocketflow.data.base import Dataset
from pocketflow.distributed import SingleProcess, make_context
from pocketflow.errors import ConfigError, TargetNotMetError, UserError
from pocketflow.export import (TFLiteMeasurement, compare_latency, delegation_of_file, export_and_measure, runtime_name,
                               write_atomic)
from pocketflow.metrics import count_macs, count_params, weight_bytes
from pocketflow.model_io import save_model
from pocketflow.report import write_report
from pocketflow.run_directory import RunDirectory
from pocketflow.shipping import write_ship_directory
from hpo.pareto import check_run as check_pareto
from hpo.results import SearchOutcome
from hpo.targets import meets
from learners.distillation import check_run as check_distillation, load_teacher, make_distiller, resolve_enabled
from pocketflow.precision import AUTO, BFLOAT16_WIDTH_MULTIPLE, hardware_bfloat16
from pocketflow.training import DivergenceError, TrainSchedule, accuracy, resolve_schedule

log = logging.getLogger(__name__)

DEFAULT_DATASET = "digits"
LATENCY_COMPARISON_ROUNDS = 3  # the report's latency ratio: baseline and shipped file timed in turn


@dataclass
class Measurement:
    """What we know about one model: measured, never estimated."""

    accuracy: float
    macs: int
    params: int
    weight_bytes: int
    tflite: Dict[str, TFLiteMeasurement] = field(default_factory=dict)

    def fields(self) -> Dict[str, Any]:
        float_file = self.tflite.get("float")
        return {
            "accuracy": self.accuracy,
            "macs": self.macs,
            "params": self.params,
            "bytes": float_file.bytes if float_file else None,
            "weight_bytes": self.weight_bytes,
            "tflite_path": float_file.path if float_file else None,
            "tflite_accuracy": float_file.accuracy if float_file else None,
            "tflite_latency_ms": float_file.latency_ms if float_file else None,
            "delegation": float_file.delegation if float_file else None,
        }


def resolve_names(config: RunConfig) -> RunConfig:
    """Fill in the dataset from the net, or the net from the dataset (digits + digits_cnn by default)."""
    dataset_name, net_name = config.data.name, config.net
    if net_name is not None:
        NETS.get(net_name)
    if dataset_name is None:
        dataset_name = NETS.get(net_name).default_dataset if net_name else DEFAULT_DATASET
    spec = DATASETS.get(dataset_name)
    if net_name is None and config.model is None:
        net_name = spec.default_net
        if net_name is None:
            raise ConfigError(f"dataset '{dataset_name}' has no default net; name one with --net "
                              f"({', '.join(NETS.names())}) or pass your model with --model")
    if spec.needs_dir and not config.data.dir:
        raise ConfigError(f"dataset '{dataset_name}' needs its files: pass --data-dir DIR")
    return dataclasses.replace(config, net=net_name, data=dataclasses.replace(config.data, name=dataset_name))


def default_output_dir(config: RunConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    subject = Path(config.model).stem if config.model else config.net
    return Path("runs") / f"{stamp}-{config.learner}-{subject}"


class Runner:
    """One run of the product, from a resolved RunConfig to a report in the output directory."""

    def __init__(self, config: RunConfig, *, resume: bool = False,
                 distributed: Optional[SingleProcess] = None) -> None:
        self.config = config
        self.resume = resume
        self.distributed = distributed
        self.notes: List[str] = []
        self.run_directory: Optional[RunDirectory] = None  # the chief's, once claimed

    # ------------------------------------------------------------------ set-up
    def _resolve(self) -> None:
        """Everything decided from the configuration alone: no data read, no file written."""
        config = resolve_names(self.config)
        learner_class = LEARNERS.get(config.learner)
        learner_class.check_target(config.target)
        check_distillation(learner_class, config)  # what the user asked for (auto is never an error)
        config = resolve_enabled(learner_class, config)
        check_pareto(learner_class, config)
        ignored = []
        read = {config.learner, *learner_class.sections}
        for name, section in config.learners.items():  # catch typos in every learner section
            options = LEARNERS.get(name).parse_options(section, "the configuration")
            if name not in read:  # another learner's section: only its defaults may be there
                defaults = LEARNERS.get(name).parse_options({}, "the defaults")  # a chain's: with its stages
                ignored += [f"{name}.{field.name}" for field in dataclasses.fields(options)
                            if field.init and getattr(options, field.name) != getattr(defaults, field.name)]
        if ignored:
            sections = " and ".join(f"'{name}'" for name in sorted(read))
            raise ConfigError(f"{', '.join(ignored)} would be ignored: --learner {config.learner} reads only the "
                              f"{sections} section{'s' if len(read) > 1 else ''} (remove those settings, or use the "
                              f"learner they are for)")
        self.options = learner_class.run_options(config.learners, "the configuration")
        self.learner_class = learner_class.strategy(self.options, config.target)  # e.g. uniform below 8 bits
        output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
        self.config = dataclasses.replace(config, output_dir=str(output_dir))
        self.output_dir = output_dir
        net = NETS.get(self.config.net) if self.config.net else None
        self.schedule = resolve_schedule(_schedule_for(net, self.config.data.name), self.config.train,
                                         self.config.data)

    def _prepare(self) -> None:
        self._resolve()
        config, output_dir = self.config, self.output_dir
        self.distributed = self.distributed or make_context()
        if self.distributed.is_chief:
            if self.learner_class.searches and config.hpo.storage:
                from hpo.storage import open_storage, study_lock, study_name

                # An unusable --storage fails now, not after the baseline; under the study's lock, so
                # searchers starting together do not race to create the database's tables.
                with study_lock(config.hpo.storage, study_name(config)):
                    open_storage(config.hpo.storage)
            self.run_directory = RunDirectory(output_dir)
            self.run_directory.claim(self.resume)
            write_atomic(output_dir / "config.yaml", self.config.to_yaml().encode())
            self.run_directory.open_log()
        self.distributed.barrier()

    def plan(self) -> List[str]:
        """``--dry-run``: what this run would do and the configuration it would record, every value
        resolved; nothing is read, trained or written."""
        from pocketflow.baseline import cache_directory, cache_key

        self._resolve()
        config, schedule, learner_class = self.config, self.schedule, self.learner_class
        target = ", ".join(f"{kind} {value:g}" for kind, value in config.target.requested().items()) or "none"
        lines = [f"learner:    {config.learner} ({learner_class.__name__}), target {target}"]
        if config.model:
            lines.append(f"baseline:   load {config.model}"
                         + (f", then train it {schedule.epochs:g} epochs" if not learner_class.searches
                            and schedule.epochs > 0 else ""))
        else:
            cached = cache_directory() / f"{cache_key(NETS.get(config.net), config.data, schedule, config.seed)}.keras"
            use_cache = learner_class.searches and schedule.epochs > 0
            lines.append(f"baseline:   {config.net} on {config.data.name}: "
                         + (f"load the cached training {cached}" if use_cache and cached.exists() else
                            f"train {schedule.epochs:g} epochs (batch {schedule.batch_size}, learning rate "
                            f"{schedule.learning_rate:g}, {schedule.schedule})"))
        if learner_class.searches:
            lines.append(f"search:     up to {config.hpo.trials} trials, {config.hpo.sampler} sampler, objective "
                         f"{config.hpo.objective}" + (f", stopping after {config.hpo.timeout:g} s"
                                                       if config.hpo.timeout else ""))
            epochs = self._finetune_epochs(schedule)
            distilled = ", distilled from the baseline" if config.distillation.enabled is True else ""
            finished = "every Pareto-front model" if config.hpo.objective == "pareto" else "the best candidate"
            lines.append(f"fine-tune:  {finished} for {epochs:g} epochs{distilled}" if epochs > 0
                         else "fine-tune:  none")
            lines += learner_class.plan_lines(self.options, epochs)
        else:
            lines.append("search:     none (this learner measures the baseline itself)")
        export = config.export
        lines.append("export:     " + ("none (no TFLite file, no latency)" if not export.tflite else
                                      f"float TFLite{'' if export.quantize == 'none' else ' + ' + export.quantize}, "
                                      f"latency over {export.latency_runs} runs on {export.threads} thread(s)"))
        held = (self.output_dir / "config.yaml").exists() or (self.output_dir / "report.json").exists()
        lines.append(f"output:     {self.output_dir}" + (" (holds a run: needs --resume)" if held and not self.resume
                                                         else ""))
        lines += ["", "configuration (config.yaml of the run; --config FILE repeats it):", "",
                  self._resolved(schedule).to_yaml().rstrip()]
        return lines

    # ------------------------------------------------------------------ stopping early
    def _write_interrupted_report(self, interrupt: KeyboardInterrupt) -> None:
        """Ctrl-C: report.json/report.md with status "interrupted", the trials so far and no best.

        The search has already marked its current trial failed ('interrupted') and saved the study;
        ``--resume`` runs that trial again and goes on.
        """
        if self.run_directory is None or not self.run_directory.claimed:
            return
        partial = self._partial
        trials = getattr(interrupt, "trials", None) or partial.get("trials") or \
            {"completed": 0, "failed": 0, "pruned": 0}
        report = self._report_header("interrupted", partial.get("dataset", self.config.data.name),
                                     partial.get("model_source"), trials, partial.get("baseline"))
        report.update(reason="interrupted by the user (SIGINT) before the run finished; this report is partial "
                             "(no best model): run the same command with --resume to continue",
                      seconds=time.time() - partial["started"])
        details = getattr(interrupt, "details", None) or partial.get("search")
        if details:
            report["search"] = details
        with _sigint_deferred():
            write_report(self.output_dir, report)
        interrupt.note = (f"partial report in {self.output_dir / 'report.json'}; run the same command with "
                          f"--resume to continue")

    # ------------------------------------------------------------------ measuring
    def _measure(self, model: tf.keras.Model, dataset: Dataset, stem: str, modes: List[str]) -> Measurement:
        keras_accuracy = accuracy(model, dataset.test(256))
        measurement = Measurement(accuracy=keras_accuracy, macs=count_macs(model), params=count_params(model),
                                  weight_bytes=weight_bytes(model))
        export = self.config.export
        if not export.tflite:
            return measurement
        test_images, test_labels = dataset.test_arrays()
        representative = dataset.sample_train(export.representative_samples, seed=self.config.seed)
        for mode in modes:
            suffix = "" if mode == "float" else f"_{mode}"
            measurement.tflite[mode] = export_and_measure(
                model, self.output_dir / f"{stem}{suffix}.tflite", mode, test_images=test_images,
                test_labels=test_labels, representative=representative, threads=export.threads,
                runs=export.latency_runs)
        return measurement

    # ------------------------------------------------------------------ the loop
    def run(self) -> Dict[str, Any]:
        """The loop, with what happens when it stops early: Ctrl-C writes a partial report (status
        "interrupted"); bad input or a diverging baseline leaves no half-written run behind."""
        self._partial: Dict[str, Any] = {"started": time.time()}
        try:
            with interrupts.recorded():
                return self._run_loop()
        except KeyboardInterrupt as interrupt:
            try:
                self._write_interrupted_report(interrupt)
            except Exception as error:  # noqa: BLE001 - the interruption is what the user must see
                log.warning("the partial report could not be written: %s", error)
            raise
        except (UserError, DivergenceError):
            if self.run_directory is not None:
                self.run_directory.discard_failed_start()
            raise
        finally:
            if self.run_directory is not None:
                self.run_directory.release()

    def _report_header(self, status: str, dataset: str, source: Optional[str], trials: Dict[str, int],
                       baseline: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The fields every report.json starts with, finished or interrupted."""
        config = self.config
        return {
            "pocketflow_version": __version__,
            "learner": config.learner,
            "net": config.net or Path(config.model).stem,
            "dataset": dataset,
            "model_source": source,
            "status": status,
            "started": datetime.datetime.fromtimestamp(self._partial["started"]).isoformat(timespec="seconds"),
            "world_size": self.distributed.size if self.distributed else 1,
            "target": config.target.requested(),
            "trials": trials,
            "config_path": str(self.output_dir / "config.yaml"),
            "environment": _environment(config, self.schedule),
            "baseline": baseline,
            "best": None,
            "notes": self.notes,
        }

    def _run_loop(self) -> Dict[str, Any]:
        started = time.time()
        self._prepare()
        config = self.config
        distributed = self.distributed
        dataset = load_dataset(config.data, config.seed)
        log.info("dataset %s: %d train, %d validation, %d test, images %s, %d classes", dataset.name,
                 dataset.num_train, dataset.num_validation, dataset.num_test, dataset.input_shape,
                 dataset.num_classes)
        net: Optional[NetSpec] = NETS.get(config.net) if config.net else None
        schedule = self.schedule
        if distributed.is_chief:  # what runs, every value resolved: --config config.yaml repeats it
            write_atomic(self.output_dir / "config.yaml", self._resolved(schedule).to_yaml().encode())
            targets = self.learner_class.targets
            if targets and not config.target.requested() and config.hpo.objective != "pareto":
                log.warning("no target given: the search keeps the most accurate candidate at whatever %s it "
                            "reaches; name one with %s", " / ".join(targets),
                            " or ".join(target_flag(kind) for kind in targets))

        if config.model:
            baseline_model, source = load_baseline(config.model, dataset, config.trust_model), f"file:{config.model}"
            if not self.learner_class.searches and schedule.epochs > 0:
                from pocketflow.training import from_trained, train
                train(baseline_model, dataset, from_trained(schedule), distributed=distributed, seed=config.seed,
                      description="train")
                source += f" (+{schedule.epochs} epochs)"
        else:
            assert net is not None
            baseline_model, source = train_baseline(net, config.data, dataset, schedule, seed=config.seed,
                                                    distributed=distributed,
                                                    use_cache=self.learner_class.searches)
        baseline = self._measure(baseline_model, dataset, "baseline", ["float"]) if distributed.is_chief else None
        self._partial.update(dataset=dataset.name, model_source=source,
                             baseline=baseline.fields() if baseline else None)
        if baseline:
            log.info("baseline: accuracy %.4f, %s MACs, %s params", baseline.accuracy,
                     f"{baseline.macs:,}", f"{baseline.params:,}")
            if config.model is None:
                save_model(baseline_model, self.output_dir / "baseline.keras")

        teacher_model, teacher_described = load_teacher(config.distillation, baseline_model, dataset,
                                                        trust=config.trust_model)
        context = LearnerContext(
            dataset=dataset, schedule=schedule, target=config.target, distributed=distributed, seed=config.seed,
            baseline_macs=count_macs(baseline_model),
            baseline_tflite_bytes=baseline.tflite["float"].bytes if baseline and baseline.tflite else 0,
            baseline_latency_ms=baseline.tflite["float"].latency_ms if baseline and baseline.tflite else 0.0,
            run_directory=self.output_dir,
            threads=config.export.threads, latency_runs=config.export.latency_runs,
            finetune_epochs=self._finetune_epochs(schedule))
        learner: Learner = self.learner_class(self.options, context)
        outcome = self._search_or_compress(learner, baseline_model, teacher_model, dataset)
        self._partial.update(trials=outcome.trials, search=outcome.details)

        report = self._report_header("completed", dataset.name, source, outcome.trials,
                                     baseline.fields() if baseline else None)
        if outcome.details:
            report["search"] = outcome.details

        if outcome.candidate is None and not outcome.front:
            report.update(status="target_not_met", reason=outcome.reason, seconds=time.time() - started)
            if distributed.is_chief:
                write_report(self.output_dir, report)
            raise TargetNotMetError(f"{outcome.reason}; report written to {self.output_dir / 'report.json'}")

        finetune_epochs = self._finetune_epochs(schedule)
        if outcome.front:  # --objective pareto: every front model is finished and listed
            if teacher_described:  # each front row gives its own temperature and weight; the file is shared
                report["distillation"] = {"teacher": teacher_described}
            return self._finish_front(learner, baseline_model, dataset, baseline, outcome, report,
                                      finetune_epochs, started, teacher_model=teacher_model)
        candidate = outcome.candidate
        teacher = make_distiller(config.distillation, teacher_model, outcome.hyperparameters.get("distillation"),
                                 precision=self.schedule.precision)
        if learner.searches and finetune_epochs > 0:
            log.info("fine-tuning the best candidate for %s epochs%s", finetune_epochs,
                     f", distilled from {'the baseline' if teacher_described is None else config.distillation.teacher}"
                     f" (temperature {teacher.temperature:g}, weight of the teacher's term {teacher.alpha:g})"
                     if teacher else "")
            candidate = learner.finetune(candidate, finetune_epochs, teacher=teacher)
            if teacher:
                report["distillation"] = teacher.describe()
                if teacher_described:
                    report["distillation"]["teacher"] = teacher_described
        candidate = learner.finalize(candidate)

        missed = None
        if distributed.is_chief:
            report["best"] = self._best_fields(learner, candidate, dataset, baseline, outcome)
            report["best"]["target_check"], missed = check_shipped(config.target.requested(), report["best"])
            if missed:
                report.update(status="target_not_met", reason=missed)
            report["ship"] = self._ship(report["best"], dataset, missed)
        report["seconds"] = time.time() - started
        if distributed.is_chief:
            write_report(self.output_dir, report)
        distributed.barrier()
        missed = distributed.broadcast_object(missed)  # every rank exits alike, with the chief's reason
        if missed:
            raise TargetNotMetError(f"{missed}; the files are in {self.output_dir}, report.json says what they reach")
        return report

    def _finish_front(self, learner: Learner, baseline_model: tf.keras.Model, dataset: Dataset,
                      baseline: Optional[Measurement], outcome: SearchOutcome, report: Dict[str, Any],
                      finetune_epochs: float, started: float,
                      teacher_model: Optional[tf.keras.Model] = None) -> Dict[str, Any]:
        """--objective pareto: fine-tune, export and measure every front model (hpo/pareto.py); the
        report's ``best`` is the model picked by --pick-latency-ms/--pick-size-kb (else the most accurate)."""
        from hpo.pareto import finish_front

        finished = finish_front(self.config, self.distributed, self.output_dir, self._best_fields, learner,
                                baseline_model, dataset, baseline, outcome, finetune_epochs, teacher_model=teacher_model)
        reason = finished["reason"]
        if finished["best"] is not None:  # the picked model is what ships: its target is re-checked on it
            finished["best"]["target_check"], missed = check_shipped(self.config.target.requested(),
                                                                     finished["best"])
            reason = reason or missed
            if self.distributed.is_chief:
                report["ship"] = self._ship(finished["best"], dataset, missed)
        report.update(pareto=finished["pareto"], best=finished["best"], seconds=time.time() - started)
        if reason:
            report.update(status="target_not_met", reason=reason)
        if self.distributed.is_chief:
            write_report(self.output_dir, report)
        self.distributed.barrier()
        reason = self.distributed.broadcast_object(reason)
        if reason:
            raise TargetNotMetError(f"{reason}; every front model is in {self.output_dir / 'pareto.csv'}")
        return report

    def _ship(self, best: Dict[str, Any], dataset: Dataset, missed: Optional[str]) -> Dict[str, Any]:
        """ship/: the shipped file, its runtime TFLite file, predict.py and a README (pocketflow/shipping.py)."""
        preprocess = getattr(dataset, "preprocess", None)
        settings = ({"scale": preprocess.scale, "mean": preprocess.mean, "std": preprocess.std}
                    if preprocess is not None else {"scale": 1.0})
        return write_ship_directory(self.output_dir, best, settings, missed)

    def _search_or_compress(self, learner: Learner, baseline_model: tf.keras.Model, teacher_model: tf.keras.Model,
                            dataset: Dataset) -> SearchOutcome:
        learner.prepare(baseline_model)  # every rank, before anything else the learner does
        if not learner.searches:
            candidate = learner.compress(self.options)
            return SearchOutcome(candidate, dataclasses.asdict(self.options),
                                 {"completed": 0, "failed": 0, "pruned": 0})
        from hpo.search import run_search  # the optimizer arrives with the search issue

        return run_search(learner, baseline_model, self.config, self.output_dir, resume=self.resume,
                          distributed=self.distributed, teacher=teacher_model)

    def _resolved(self, schedule: TrainSchedule) -> RunConfig:
        """The configuration with the values this run uses in place of 'the net's default': the
        training schedule, the fine-tuning epochs, and the learner's own section with every key."""
        train = dataclasses.replace(
            self.config.train, epochs=schedule.epochs, finetune_epochs=self._finetune_epochs(schedule),
            batch_size=schedule.batch_size, learning_rate=schedule.learning_rate, schedule=schedule.schedule,
            optimizer=schedule.optimizer, weight_decay=schedule.weight_decay, precision=schedule.precision)
        learners = {**self.config.learners, **self.learner_class.recorded_sections(self.options)}
        return dataclasses.replace(self.config, train=train, learners=learners)

    def _finetune_epochs(self, schedule: TrainSchedule) -> float:
        if self.config.train.finetune_epochs is not None:
            return self.config.train.finetune_epochs
        return max(1.0, round(schedule.epochs * 0.2, 2))

    def _best_fields(self, learner: Learner, candidate: Candidate, dataset: Dataset,
                     baseline: Measurement, outcome: SearchOutcome,
                     directory: Optional[Path] = None) -> Dict[str, Any]:
        """Save, export and measure a finalized candidate (into ``directory``, default the run directory)."""
        directory = directory or self.output_dir
        model = candidate.model
        modes = ["float"] + ([self.config.export.quantize] if self.config.export.quantize != "none" else [])
        model_path = save_model(model, directory / "model.keras")
        if not learner.searches and not self.config.model and self.config.export.quantize == "none":
            measured = dataclasses.replace(baseline)  # full-prec on a built net: the baseline is the result
        else:
            measured = self._measure(model, dataset, str(directory.relative_to(self.output_dir) / "model"), modes)
        best = measured.fields()
        best["model_path"] = str(model_path)
        best["hyperparameters"] = outcome.hyperparameters
        best.update(learner.describe(candidate))
        artifacts = learner.write_artifacts(candidate, directory)
        best.update(artifacts)
        shipped_bytes = artifacts.get("artifact_bytes", best["bytes"])
        base_bytes = baseline.fields()["bytes"]
        best["speedup"] = baseline.macs / measured.macs if measured.macs else None
        best["compression"] = base_bytes / shipped_bytes if base_bytes and shipped_bytes else None
        best.setdefault("shipped_format", "float TFLite")
        best["accuracy_delta"] = measured.accuracy - baseline.accuracy
        comparison = self._latency_comparison(baseline.fields()["tflite_path"], best.get("tflite_path"))
        if comparison:
            best["latency_comparison"] = comparison
            best["latency_speedup"] = comparison["ratio"]
        else:  # a file is missing: the two first timings are all there is
            base_latency = baseline.fields()["tflite_latency_ms"]
            best["latency_speedup"] = (base_latency / best["tflite_latency_ms"]
                                       if base_latency and best["tflite_latency_ms"] else None)
        best["exports"] = {mode: m.as_dict() for mode, m in measured.tflite.items()}
        best["delegation"] = {os.path.relpath(path, self.output_dir): delegation_of_file(path).as_dict()
                              for path in _tflite_paths(best)}
        return best

    def _latency_comparison(self, baseline_path: Optional[str],
                            shipped_path: Optional[str]) -> Optional[Dict[str, Any]]:
        """The baseline's file and the shipped one timed in turn, now: the ratio the report gives and
        a latency target is checked on. Their first timings lie minutes apart, under whatever else
        ran then: one run's in-run ratio was 1.22x where the files timed in turn gave 2.06x
        (docs/channel-recovery.md)."""
        if not (baseline_path and shipped_path and Path(baseline_path).is_file() and Path(shipped_path).is_file()):
            return None
        rounds = LATENCY_COMPARISON_ROUNDS
        timings = compare_latency([baseline_path, shipped_path], rounds=rounds, min_seconds=0.2,
                                  threads=self.config.export.threads)
        base_ms, shipped_ms = timings[str(baseline_path)], timings[str(shipped_path)]
        return {"baseline_ms": base_ms, "shipped_ms": shipped_ms, "ratio": base_ms / shipped_ms,
                "shipped_file": os.path.relpath(shipped_path, self.output_dir),
                "method": f"best of {rounds} medians, the two files timed in turn, batch 1, "
                          f"{self.config.export.threads} thread(s)"}


def _tflite_paths(fields: Any) -> List[str]:
    """Every TFLite file a result names (the shipped file, other exports, a learner's companions)."""
    if isinstance(fields, dict):
        found = [path for value in fields.values() for path in _tflite_paths(value)]
    elif isinstance(fields, list):  # e.g. a chain's stages
        found = [path for value in fields for path in _tflite_paths(value)]
    elif isinstance(fields, str) and fields.endswith(".tflite") and Path(fields).is_file():
        found = [fields]
    else:
        found = []
    return list(dict.fromkeys(found))


def shipped_values(best: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """What the shipped result reaches, read from measurements of the files (not from the search):
    MACs of the saved model, bytes of the shipped file, zeros and bits the learner counts in the
    weights it wrote."""
    return {"speedup": best.get("speedup"), "compression": best.get("compression"),
            "latency_speedup": best.get("latency_speedup"),
            "latency_ms": (best.get("latency_comparison") or {}).get("shipped_ms", best.get("tflite_latency_ms")),
            "sparsity": best.get("sparsity"), "bits": best.get("average_bits", best.get("bits"))}


def check_shipped(requested: Dict[str, float], best: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
    """The target re-checked on what ships: ({kind: {target, shipped, met}}, why it misses or None).

    A kind the shipped result does not report is not checked (met: None) rather than failed."""
    shipped = shipped_values(best)
    check, short = {}, []
    for kind, target in requested.items():
        value = shipped.get(kind)
        met = None if value is None else meets({kind: target}, {kind: float(value)})
        check[kind] = {"target": target, "shipped": value, "met": met}
        if met is False:
            short.append(f"{kind} {target:g} requested, the shipped result reaches {float(value):.4g}")
    return check, ("the shipped result misses the target: " + "; ".join(short)) if short else None


class _sigint_deferred:
    """Hold back a second Ctrl-C for the few milliseconds it takes to write the partial report."""

    def __enter__(self) -> None:
        self.pending = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "pending", True))

    def __exit__(self, *exc_info: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _schedule_for(net: Optional[NetSpec], dataset_name: str) -> Schedule:
    """The net's recipe; for a user's model, the recipe of the dataset's default net (e.g. CIFAR
    augmentation). Training that starts from trained weights scales the learning rate down itself."""
    if net is not None:
        return net.schedule
    default_net = DATASETS.get(dataset_name).default_net
    if default_net in NETS:
        return NETS.get(default_net).schedule
    return Schedule(epochs=10, batch_size=128, learning_rate=0.1, schedule="cosine", weight_decay=5e-4)


def _environment(config: RunConfig, schedule: TrainSchedule) -> Dict[str, Any]:
    native, hardware = hardware_bfloat16()
    return {
        # train.precision as asked and as the schedule resolved it (auto stays auto where the hardware
        # has bfloat16: each training then picks by its model's widths); every fallback is in run.log.
        "training_precision": {
            "requested": config.train.precision, "used": schedule.precision,
            "bfloat16_hardware": hardware if native else f"none: {hardware}",
            **({"rule": f"bfloat16 for trainings whose layer widths are all multiples of {BFLOAT16_WIDTH_MULTIPLE}, "
                        f"float32 for the others (run.log says which)"} if schedule.precision == AUTO else {})},
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "tflite_threads": config.export.threads,
        "tflite_runtime": runtime_name(),
        "numpy": np.__version__,
    }
