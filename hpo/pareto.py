"""--objective pareto: accuracy against cost (MACs, or bytes for learners that shrink files).

The search is a two-objective Optuna study (maximize validation accuracy, minimize the
learner's ``pareto_cost``). When it ends, the non-dominated trials are rebuilt, fine-tuned
(distilled from the baseline when ``--distill`` is on: every student shares the one frozen
teacher), finalized, exported to TFLite and measured. Models that a sibling dominates *after*
fine-tuning (on validation accuracy and cost) are dropped, so the table lists a real front.

Choices (which trials form the front, which models are dropped, which model ``--pick-*``
ships) use the validation split only; ``accuracy`` in the table is the test split, measured,
never used to choose. Outputs: ``pareto.csv`` (one row per model, cheapest first),
``pareto.png``, and ``report.json["pareto"]``.

Pick from a finished run later, without running anything again::

    python -m hpo.pareto RUN_DIR --pick-size-kb 60
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from pocketflow.export import write_atomic

log = logging.getLogger(__name__)

CSV_COLUMNS = ("trial", "accuracy", "validation_accuracy", "validation_loss", "search_validation_accuracy", "macs",
               "params",
               "bytes", "speedup", "compression", "tflite_path", "tflite_accuracy", "tflite_latency_ms",
               "model_path", "distillation", "hyperparameters")
COST_LABELS = {"macs": "MACs (multiply-accumulates per image)", "bytes": "bytes of the shipped file"}


MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "random", "gp")


def check_run(learner_class: type, config: Any) -> None:
    """Reject --objective pareto (or a --pick-* budget) where it cannot work, before any work is done."""
    from pocketflow.errors import ConfigError

    if config.hpo.objective != "pareto":
        return
    if not learner_class.searches or learner_class.pareto_cost is None:
        able = ", ".join(sorted(_pareto_learners())) or "none"
        raise ConfigError(f"--objective pareto needs a learner with a trade-off to search; learner "
                          f"'{learner_class.name}' has none (learners with a Pareto objective: {able})")
    if config.hpo.sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise ConfigError(f"--sampler {config.hpo.sampler} optimizes one objective; with --objective pareto use "
                          f"one of: {', '.join(MULTI_OBJECTIVE_SAMPLERS)} (tpe is multi-objective TPE, nsga2 is "
                          f"NSGA-II)")


def _pareto_learners() -> List[str]:
    from learners import LEARNERS

    return [name for name in LEARNERS.names()
            if LEARNERS.get(name).searches and LEARNERS.get(name).pareto_cost is not None]


# --------------------------------------------------------------------------- dominance


def dominates(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """(accuracy, cost): a is at least as accurate and at most as costly, and strictly better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def non_dominated(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point dominates (equal points: the first one is kept)."""
    keep = []
    for i, point in enumerate(points):
        if any(dominates(other, point) for j, other in enumerate(points) if j != i):
            continue
        if any(points[k] == point for k in keep):
            continue
        keep.append(i)
    return keep


def fronts(points: Sequence[Tuple[float, float]]) -> List[List[int]]:
    """Non-dominated sorting: the first front, then the front of what is left, and so on (a point
    equal to one already in a front is left out: the same score twice is one model to finish)."""
    left = list(range(len(points)))
    layers = []
    while left:
        layer = [left[i] for i in non_dominated([points[i] for i in left])]
        if not layer:  # only duplicates of points already taken
            break
        layers.append(layer)
        taken = {points[i] for i in layer}
        left = [i for i in left if points[i] not in taken]  # exact duplicates of a taken point go with it
    return layers


def spread(indices: Sequence[int], costs: Sequence[float], count: int) -> List[int]:
    """``count`` of ``indices`` spread evenly along the cost axis (both ends always kept)."""
    ordered = sorted(indices, key=lambda i: costs[i])
    if len(ordered) <= count:
        return ordered
    positions = sorted({int(round(p)) for p in np.linspace(0, len(ordered) - 1, count)})
    return [ordered[p] for p in positions]


def band_leaders(points: Sequence[Tuple[float, float]], bands: int) -> List[int]:
    """The most accurate point (ties: the cheapest) of each of ``bands`` log-spaced cost bands."""
    if not points:
        return []
    logs = [float(np.log(max(p[1], 1e-12))) for p in points]
    low, high = min(logs), max(logs)
    width = (high - low) / bands or 1.0
    leaders: Dict[int, int] = {}
    for i, value in enumerate(logs):
        band = min(bands - 1, int((value - low) / width))
        best = leaders.get(band)
        if best is None or (points[i][0], -points[i][1]) > (points[best][0], -points[best][1]):
            leaders[band] = i
    return [leaders[band] for band in sorted(leaders)]


def select_front(points: Sequence[Tuple[float, float]], max_models: int,
                 min_models: int) -> Tuple[List[int], List[int]]:
    """The trials to finish, and reserves.

    The search scores candidates before fine-tuning, which squeezes their accuracies together
    (on an easy task every one recovers to about the same), so its front alone would crowd the
    cheap end. The trials finished are therefore spread along the cost axis: the most accurate
    trial of each of ``max_models`` log-spaced cost bands (every first-front point is the leader of
    its neighbourhood), topped up from the fronts to ``min_models``. The fine-tuned models then
    decide the front. Reserves (the remaining trials, by front, at most ``max_models``) are
    finished only if fine-tuning leaves fewer than ``min_models`` non-dominated models.
    """
    costs = [p[1] for p in points]
    chosen: List[int] = []
    for i in band_leaders(points, max_models):
        if points[i] not in {points[j] for j in chosen}:
            chosen.append(i)
    reserves: List[int] = []
    for layer in fronts(points):
        layer = [i for i in layer if i not in chosen and points[i] not in {points[j] for j in chosen}]
        if len(chosen) < min_models:
            taken = spread(layer, costs, min_models - len(chosen))
            chosen += taken
            layer = [i for i in layer if i not in taken]
        reserves += spread(layer, costs, len(layer))
    return sorted(chosen, key=lambda i: costs[i]), reserves[:max_models]


# --------------------------------------------------------------------------- the study's side


def _feasible(study: Any) -> List[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("feasible") and t.values and len(t.values) == 2]


def front_trials(study: Any) -> List[Any]:
    """The feasible completed trials no other dominates (validation accuracy up, cost down)."""
    trials = _feasible(study)
    return [trials[i] for i in non_dominated([(t.values[0], t.values[1]) for t in trials])]


def front_decisions(study: Any, options: Any) -> Tuple[List[Dict[str, Any]], List[List[float]]]:
    """The trials to finish (see ``select_front``), and every feasible trial's [accuracy, cost] for the plot."""
    trials = _feasible(study)
    points = [(t.values[0], t.values[1]) for t in trials]
    chosen, reserves = select_front(points, options.max_models, options.min_models)
    members = [{"number": trials[i].number, "params": dict(trials[i].params),
                "hyperparameters": trials[i].user_attrs.get("hyperparameters", {}),
                "validation_accuracy": trials[i].values[0], "cost": trials[i].values[1],
                "reserve": i in reserves} for i in chosen + reserves]
    return members, [list(p) for p in points]


# --------------------------------------------------------------------------- picking


def pick(rows: Sequence[Mapping[str, Any]], latency_ms: Optional[float] = None,
         size_kb: Optional[float] = None) -> Tuple[Optional[Mapping[str, Any]], str]:
    """The most accurate row (validation accuracy; ties: lower validation loss, then the smaller file)
    within the budgets, and why."""
    fitting = [row for row in rows
               if (latency_ms is None or _float(row.get("tflite_latency_ms"), np.inf) <= latency_ms)
               and (size_kb is None or _float(row.get("bytes"), np.inf) / 1024.0 <= size_kb)]
    budget = " and ".join(text for text in (f"TFLite latency <= {latency_ms:g} ms" if latency_ms else "",
                                             f"file <= {size_kb:g} KB" if size_kb else "") if text) or "no budget"
    if not fitting:
        smallest = min(rows, key=lambda r: _float(r.get("bytes"), np.inf), default=None)
        fastest = min(rows, key=lambda r: _float(r.get("tflite_latency_ms"), np.inf), default=None)
        shown = []
        if size_kb and smallest:
            shown.append(f"the smallest is {_float(smallest.get('bytes'), np.nan) / 1024:.1f} KB")
        if latency_ms and fastest:
            shown.append(f"the fastest takes {_float(fastest.get('tflite_latency_ms'), np.nan):.3f} ms")
        return None, f"no model on the Pareto front fits {budget} ({', '.join(shown) or 'no models'})"
    chosen = max(fitting, key=lambda r: (_float(r.get("validation_accuracy"), -1.0),
                                         -_float(r.get("validation_loss"), 0.0), -_float(r.get("bytes"), 0.0),
                                         -_float(r.get("tflite_latency_ms"), 0.0)))
    return chosen, f"most accurate (validation) of {len(fitting)} models with {budget}"


def _float(value: Any, default: float) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return default
    return default if np.isnan(result) else result


# --------------------------------------------------------------------------- finishing the front


def finish_front(config: Any, distributed: Any, output_dir: Path, measure: Callable[..., Dict[str, Any]],
                 learner: Any, baseline_model: Any, dataset: Any, baseline: Any, outcome: Any,
                 finetune_epochs: float, teacher_model: Any = None) -> Dict[str, Any]:
    """Fine-tune, finalize, export and measure every front model; write pareto.csv and pareto.png.

    ``measure(learner, model, dataset, baseline, outcome, directory=...)`` saves, exports and measures
    one model (the runner's, so a front model is measured like the best model of a plain run).
    Every rank trains (training is collective under Horovod); rank 0 measures and writes. Distillation
    distils from ``teacher_model`` (default: the baseline).
    Returns ``{"pareto": summary, "best": fields or None, "reason": why no pick (or None)}``.
    """
    import optuna

    from learners.distillation import make_distiller

    cost_key = learner.pareto_cost
    rows: List[Dict[str, Any]] = []
    minimum = config.pareto.min_models
    for member in outcome.front:
        if member.get("reserve"):  # only while fine-tuning has left too few non-dominated models
            short = distributed.is_chief and len(_kept(rows, cost_key)) < minimum
            if not distributed.broadcast_object(short):
                break
            log.info("fewer than %d non-dominated models after fine-tuning: finishing trial %d too", minimum,
                     member["number"])
        number = member["number"]
        hparams = learner.search_space(optuna.trial.FixedTrial(member["params"]))
        candidate = learner.compress(hparams)
        teacher = make_distiller(config.distillation, baseline_model if teacher_model is None else teacher_model,
                                 member["hyperparameters"].get("distillation"),
                                 precision=learner.context.schedule.precision)
        if finetune_epochs > 0:
            log.info("Pareto model from trial %d: fine-tuning for %s epochs%s", number, finetune_epochs,
                     f" ({teacher})" if teacher else "")
            candidate = learner.finetune(candidate, finetune_epochs, teacher=teacher)
        candidate = learner.finalize(candidate)
        model = candidate.model
        if not distributed.is_chief:
            continue
        fields = measure(learner, candidate, dataset, baseline,
                         dataclasses.replace(outcome, hyperparameters=member["hyperparameters"]),
                         directory=Path(output_dir) / "pareto" / f"trial_{number}")
        validation_accuracy, validation_loss = validation_scores(model, dataset)
        fields.update(trial=number, validation_accuracy=validation_accuracy, validation_loss=validation_loss,
                      search_validation_accuracy=member["validation_accuracy"],
                      bytes=fields.get("artifact_bytes", fields.get("bytes")),
                      distillation=teacher.describe() if teacher else None)
        log.info("Pareto model from trial %d: validation %.4f, test %.4f, %s MACs, %.1f KB, %.3f ms", number,
                 fields["validation_accuracy"], fields["accuracy"], f"{fields['macs']:,}",
                 (fields["bytes"] or 0) / 1024, fields.get("tflite_latency_ms") or float("nan"))
        rows.append(fields)
    distributed.barrier()
    if not distributed.is_chief:
        return {"pareto": None, "best": None, "reason": None}

    kept = _kept(rows, cost_key)
    dropped = []
    for row in rows:
        if row in kept:
            continue
        winner = next(k for k in kept if dominates(_point(k, cost_key), _point(row, cost_key))
                      or _point(k, cost_key) == _point(row, cost_key))
        dropped.append({"trial": row["trial"], "validation_accuracy": row["validation_accuracy"],
                        "validation_loss": row["validation_loss"], cost_key: row[cost_key],
                        "dominated_by": winner["trial"]})
        log.info("Pareto model from trial %d is dominated by trial %d after fine-tuning; dropped", row["trial"],
                 winner["trial"])
        shutil.rmtree(output_dir / "pareto" / f"trial_{row['trial']}", ignore_errors=True)
    kept.sort(key=lambda row: float(row[cost_key]))
    write_csv(output_dir / "pareto.csv", kept)
    plot(output_dir / "pareto.png", kept, outcome.details.get("pareto_points", []), cost_key)

    budget = config.pareto
    chosen, why = pick(kept, budget.pick_latency_ms, budget.pick_size_kb)
    requested = budget.pick_latency_ms is not None or budget.pick_size_kb is not None
    summary = {
        "objectives": ["validation_accuracy (max; ties: validation_loss, min)", f"{cost_key} (min)"],
        "cost": cost_key,
        "models": len(kept),
        "csv": "pareto.csv",
        "plot": "pareto.png",
        "rows": [{column: row.get(column) for column in CSV_COLUMNS} for row in kept],
        "dropped_after_finetuning": dropped,
        "pick": {"latency_ms": budget.pick_latency_ms, "size_kb": budget.pick_size_kb,
                 "trial": chosen["trial"] if chosen else None, "why": why},
    }
    log.info("Pareto front: %d models in %s (%d dropped after fine-tuning); %s", len(kept),
             output_dir / "pareto.csv", len(dropped),
             f"picked trial {chosen['trial']}: {why}" if chosen else why)
    return {"pareto": summary, "best": dict(chosen) if chosen else None,
            "reason": None if chosen or not requested else why}


def _point(row: Mapping[str, Any], cost_key: str) -> Tuple[Tuple[float, float], float]:
    """A finished model's (quality, cost): quality is validation accuracy, ties broken by the lower
    validation loss (a small validation split gives many models the same accuracy: on digits the
    baseline itself gets 142 of 144 right, and so does nearly every fine-tuned model)."""
    return (float(row["validation_accuracy"]), -float(row["validation_loss"])), float(row[cost_key])


def _kept(rows: Sequence[Dict[str, Any]], cost_key: str) -> List[Dict[str, Any]]:
    """The finished models no other finished model dominates (validation quality after fine-tuning, cost)."""
    return [rows[i] for i in non_dominated([_point(row, cost_key) for row in rows])]


def validation_scores(model: Any, dataset: Any) -> Tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy on the validation split."""
    from pocketflow.training import outputs_probabilities, predict_logits

    outputs, labels = predict_logits(model, dataset.validation(256))
    outputs = outputs.astype(np.float64)
    if outputs_probabilities(model):
        log_p = np.log(np.clip(outputs, 1e-12, 1.0))
    else:
        shifted = outputs - outputs.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    labels = labels.astype(int).reshape(-1)
    accuracy = float(np.mean(np.argmax(outputs, axis=-1) == labels))
    return accuracy, float(-np.mean(log_p[np.arange(len(labels)), labels]))


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS))
    writer.writeheader()
    for row in rows:
        out = {column: row.get(column) for column in CSV_COLUMNS}
        for column in ("distillation", "hyperparameters"):
            out[column] = json.dumps(out[column], sort_keys=True, default=str) if out[column] else ""
        writer.writerow(out)
    write_atomic(path, buffer.getvalue().encode())


def read_csv(path: Path) -> List[Dict[str, Any]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def plot(path: Path, rows: Sequence[Mapping[str, Any]], searched: Sequence[Sequence[float]], cost_key: str) -> None:
    """Every trial (validation accuracy before fine-tuning), and the finished front (validation and test)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    if searched:
        axis.scatter([p[1] for p in searched], [p[0] for p in searched], color="lightgray",
                     label="every trial (validation, before fine-tuning)")
    costs = [float(row[cost_key]) for row in rows]
    axis.step(costs, [row["validation_accuracy"] for row in rows], where="post", color="tab:blue", alpha=0.5)
    axis.scatter(costs, [row["validation_accuracy"] for row in rows], color="tab:blue",
                 label="front, validation (after fine-tuning)")
    axis.scatter(costs, [row["accuracy"] for row in rows], color="tab:orange", marker="D",
                 label="front, test")
    for row, cost in zip(rows, costs):
        latency = row.get("tflite_latency_ms")
        axis.annotate(f"#{row['trial']}" + (f" {latency:.3f} ms" if latency else ""), (cost, row["accuracy"]),
                      textcoords="offset points", xytext=(4, -10), fontsize=7)
    axis.set_xscale("log")
    axis.set_xlabel(COST_LABELS.get(cost_key, cost_key))
    axis.set_ylabel("accuracy")
    axis.set_title("Pareto front: accuracy vs " + cost_key)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


# --------------------------------------------------------------------------- picking later


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpo.pareto",
                                     description="Pick a model from a finished --objective pareto run by budget.")
    parser.add_argument("run_dir", help="the run directory (holds pareto.csv)")
    parser.add_argument("--pick-latency-ms", type=float, help="TFLite latency budget (ms, batch 1)")
    parser.add_argument("--pick-size-kb", type=float, help="file size budget (KiB)")
    args = parser.parse_args(argv)
    table = Path(args.run_dir) / "pareto.csv"
    if not table.is_file():
        print(f"error: {table} does not exist; run main.py with --objective pareto first", file=sys.stderr)
        return 2
    chosen, why = pick(read_csv(table), args.pick_latency_ms, args.pick_size_kb)
    if chosen is None:
        print(f"no pick: {why}", file=sys.stderr)
        return 3
    print(f"trial {chosen['trial']}: validation accuracy {float(chosen['validation_accuracy']):.4f}, test accuracy "
          f"{float(chosen['accuracy']):.4f}, {int(float(chosen['macs'])):,} MACs, "
          f"{float(chosen['bytes']) / 1024:.1f} KB, {float(chosen['tflite_latency_ms']):.3f} ms ({why})")
    print(chosen["tflite_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
