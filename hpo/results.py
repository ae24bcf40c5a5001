"""What the search leaves beside the report: trials.csv, two plots, and a summary for report.json."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import optuna
from optuna.trial import TrialState

from hpo.targets import TARGET_KINDS
from pocketflow.export import write_atomic

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("macs", "speedup", "compression", "sparsity", "bits")


@dataclass
class SearchOutcome:
    """What the optimizer hands the runner: the best candidate that met the target, or why there is none."""

    candidate: Optional[Any]  # a learners.base.Candidate
    hyperparameters: Dict[str, Any]
    trials: Dict[str, int]
    reason: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)
    # --objective pareto: the trials to finish ({number, params, hyperparameters, validation_accuracy, cost})
    front: Optional[List[Dict[str, Any]]] = None


BASELINE_ACCURACY_ATTRIBUTE = "baseline_validation_accuracy"  # a study user attribute


def baseline_accuracy(study: optuna.Study) -> Optional[float]:
    """The uncompressed baseline's accuracy on the validation images the trials are scored on."""
    value = study.user_attrs.get(BASELINE_ACCURACY_ATTRIBUTE)
    return float(value) if value is not None else None


def accuracy_of(trial: optuna.trial.FrozenTrial) -> Optional[float]:
    """A trial's validation accuracy: its value, or its first value in a multi-objective (Pareto) study."""
    return trial.values[0] if trial.values else None


def _rows(study: optuna.Study) -> List[Dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        row: Dict[str, Any] = {
            "number": trial.number,
            "state": trial.state.name,
            "validation_accuracy": accuracy_of(trial) if trial.state == TrialState.COMPLETE else None,
            "feasible": attrs.get("feasible"),
            "seconds": round(attrs["seconds"], 2) if "seconds" in attrs else None,
        }
        for metric in METRIC_COLUMNS:
            row[metric] = attrs.get(metric)
        row["reference"] = bool(attrs.get("reference"))
        row["params"] = json.dumps(trial.params, sort_keys=True)
        row["reason"] = attrs.get("fail_reason", "")
        rows.append(row)
    return rows


def best_feasible(study: optuna.Study) -> Optional[optuna.trial.FrozenTrial]:
    """The trial that ships: the most accurate completed trial that met the target (ties: the earliest)."""
    feasible = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("feasible")]
    return max(feasible, key=lambda t: (accuracy_of(t), -t.number)) if feasible else None


def write_trials(study: optuna.Study, output_dir: Path, requested: Mapping[str, float]) -> None:
    rows = _rows(study)
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output_dir / "trials.csv", buffer.getvalue().encode())


def largest_reached(study: optuna.Study) -> Dict[str, float]:
    """The most each target quantity reached over completed trials (least, for bits)."""
    reached: Dict[str, float] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for name, kind in TARGET_KINDS.items():
            value = trial.user_attrs.get(name)
            if value is None:
                continue
            better = value > reached.get(name, float("-inf")) if kind.higher_is_better else \
                value < reached.get(name, float("inf"))
            if better:
                reached[name] = value
    return reached


def summary(study: optuna.Study, requested: Mapping[str, float], storage_url: str,
            validation_images: Optional[int] = None, plots: Sequence[str] = ()) -> Dict[str, Any]:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    feasible = [t for t in completed if t.user_attrs.get("feasible")]
    reference = [t for t in completed if t.user_attrs.get("reference")]
    best = best_feasible(study)
    seconds = [float(t.user_attrs["seconds"]) for t in completed if "seconds" in t.user_attrs]
    return {
        "study_name": study.study_name,
        "storage": storage_url,
        "sampler": type(study.sampler).__name__,
        "feasible_trials": len(feasible),
        "best_validation_accuracy": accuracy_of(best) if best else None,
        "best_trial": best.number if best else None,
        "reference_validation_accuracy": accuracy_of(reference[0]) if reference else None,
        "baseline_validation_accuracy": baseline_accuracy(study),
        "largest_reached": largest_reached(study),
        # What one trial costs (compress + score, BatchNorm re-estimation included), over the
        # completed trials of the study (earlier sessions' too, when resumed).
        "median_trial_seconds": round(statistics.median(seconds), 2) if seconds else None,
        "trials_csv": "trials.csv",
        # What one validation image is worth: differences below it are ties, not rankings.
        "validation_images": validation_images,
        "plots": list(plots),
    }


def write_plots(study: optuna.Study, output_dir: Path, requested: Mapping[str, float],
                validation_images: Optional[int] = None) -> List[str]:
    """search_history.png and accuracy_vs_speedup.png (or vs the requested target quantity): the
    reference trial and the shipped one marked, the baseline's validation accuracy as a line,
    whole-number trial ticks, and what one validation image is worth written on the plot (a
    one-image difference is not a better candidate)."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    resolution = (f"{validation_images:,} validation images: one image = {100 / validation_images:.2g} points"
                  if validation_images else "")
    single = len(study.directions) == 1  # a Pareto study ships the pick of its front, marked in pareto.png
    shipped = best_feasible(study) if single else None
    reference = next((t for t in completed if t.user_attrs.get("reference")), None)
    baseline = baseline_accuracy(study)

    def mark(axis, x_of) -> None:
        """Rings for the reference trial and a star for the shipped one (when they have an x value)."""
        for trial, style in ((reference, dict(marker="o", s=160, facecolors="none", edgecolors="tab:green",
                                                label="reference trial")),
                             (shipped, dict(marker="*", s=220, color="gold", edgecolors="black",
                                            label="shipped trial", zorder=3))):
            if trial is not None and x_of(trial) is not None:
                axis.scatter([x_of(trial)], [accuracy_of(trial)], **style)
        if baseline is not None:
            axis.axhline(baseline, color="tab:gray", linestyle=":", label=f"baseline {100 * baseline:.2f}%")
    numbers = [t.number for t in completed]
    values = [accuracy_of(t) for t in completed]
    feasible = [bool(t.user_attrs.get("feasible")) for t in completed]
    best_so_far, best = [], float("-inf")
    for value, ok in zip(values, feasible):
        if ok:
            best = max(best, value)
        best_so_far.append(best if best > float("-inf") else None)

    figure, axis = plt.subplots(figsize=(6, 4))
    if any(feasible):
        axis.scatter([n for n, ok in zip(numbers, feasible) if ok], [v for v, ok in zip(values, feasible) if ok],
                     label="meets target", color="tab:blue")
    if not all(feasible):
        axis.scatter([n for n, ok in zip(numbers, feasible) if not ok],
                     [v for v, ok in zip(values, feasible) if not ok], label="misses target", color="tab:red",
                     marker="x")
    axis.step(numbers, [b if b is not None else float("nan") for b in best_so_far], where="post",
              label="best so far", color="black")
    mark(axis, lambda trial: trial.number)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("trial")
    axis.set_ylabel("validation accuracy")
    axis.set_title("search history" + (f"\n({resolution})" if resolution else ""), fontsize=10)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    _save(figure, output_dir / "search_history.png")
    written.append("search_history.png")

    quantity = next(iter(requested), "speedup")
    points = [(t.user_attrs.get(quantity), accuracy_of(t), ok) for t, ok in zip(completed, feasible)
              if t.user_attrs.get(quantity) is not None]
    if points:
        figure, axis = plt.subplots(figsize=(6, 4))
        if any(p[2] for p in points):
            axis.scatter([p[0] for p in points if p[2]], [p[1] for p in points if p[2]], label="meets target",
                         color="tab:blue")
        if not all(p[2] for p in points):
            axis.scatter([p[0] for p in points if not p[2]], [p[1] for p in points if not p[2]],
                         label="misses target", color="tab:red", marker="x")
        mark(axis, lambda trial: trial.user_attrs.get(quantity))
        if quantity in requested:
            axis.axvline(requested[quantity], color="gray", linestyle="--", label=f"target {requested[quantity]:g}")
        axis.set_xlabel(quantity)
        axis.set_ylabel("validation accuracy")
        axis.set_title(f"validation accuracy vs {quantity}, every trial" + (f"\n({resolution})" if resolution else ""),
                       fontsize=10)
        axis.legend(loc="best", fontsize=8)
        figure.tight_layout()
        name = f"accuracy_vs_{quantity}.png"
        _save(figure, output_dir / name)
        written.append(name)
    plt.close("all")
    return written


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
