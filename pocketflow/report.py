"""The run report: report.json (machine-readable, keys only ever added) and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from pocketflow.export import write_atomic
from pocketflow.runs import shipped_file  # noqa: F401  (part of this module's API)


def _latency_details(best: Dict[str, Any]) -> str:
    """The two timings behind the latency ratio, and the prediction a latency target planned with."""
    text = ""
    comparison, prediction = best.get("latency_comparison"), best.get("latency_prediction")
    if comparison:
        text += (f" (baseline {comparison['baseline_ms']:.3f} ms, shipped {comparison['shipped_ms']:.3f} ms, "
                 f"timed in turn)")
    if prediction:
        text += f"; predicted from this machine's width costs: {prediction['latency_speedup']:.2f}x"
    return text


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(directory: Path, report: Dict[str, Any]) -> None:
    report = _clean(report)
    write_atomic(directory / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(directory / "report.md", render_markdown(report).encode())


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _number(value: Optional[float], digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}{unit}"
    return f"{value:.{digits}f}{unit}"


def _pareto_lines(pareto: Dict[str, Any]) -> List[str]:
    """The Pareto table: one row per non-dominated model, cheapest first, and the pick."""
    lines = ["", f"## Pareto front ({pareto.get('models')} models, validation accuracy vs {pareto.get('cost')})", "",
             "Choose by budget: the table is cheapest first; `python -m hpo.pareto RUN_DIR --pick-size-kb KB` "
             "(or `--pick-latency-ms MS`) picks the most accurate model that fits. The validation split "
             "chooses (accuracy; equal accuracies: the lower validation loss); test accuracy is only reported.",
             "", "| trial | test accuracy | validation accuracy | validation loss | MACs | KB | TFLite latency (ms) "
             "| TFLite file |", "|---|---|---|---|---|---|---|---|"]
    for row in pareto.get("rows", []):
        size = row.get("bytes")
        lines.append(f"| {row.get('trial')} | {_percent(row.get('accuracy'))} | "
                     f"{_percent(row.get('validation_accuracy'))} | {_number(row.get('validation_loss'), 4)} | "
                     f"{_number(row.get('macs'))} | "
                     f"{_number(size / 1024 if size else None, 1)} | {_number(row.get('tflite_latency_ms'), 3)} | "
                     f"`{row.get('tflite_path')}` |")
    chosen = pareto.get("pick") or {}
    if chosen.get("trial") is not None:
        lines += ["", f"Picked: trial {chosen['trial']} ({chosen.get('why')})."]
    elif chosen.get("why"):
        lines += ["", f"Pick: {chosen['why']}."]
    for dropped in pareto.get("dropped_after_finetuning", []):
        lines.append(f"- trial {dropped['trial']} was dropped: after fine-tuning, trial {dropped['dominated_by']} "
                     f"dominates it")
    return lines


def render_markdown(report: Dict[str, Any]) -> str:
    baseline = report.get("baseline") or {}
    best = report.get("best")
    lines: List[str] = [
        f"# PocketFlow-TF2 run: {report.get('learner')} on {report.get('net')} / {report.get('dataset')}",
        "",
        f"- status: **{report.get('status')}**" + (f" ({report['reason']})" if report.get("reason") else ""),
        f"- target: {report.get('target') or 'none'}",
        f"- workers: {report.get('world_size', 1)}; started {report.get('started')}, "
        f"took {_number(report.get('seconds'), 0, ' s')}",
        "",
        "Accuracy is top-1 on the test split (never used to choose anything). MACs are multiply-accumulates "
        "of Conv/Depthwise/Separable/Dense layers for one image. Bytes are file sizes: the float TFLite file "
        "for the baseline, the shipped file for the result. Latency: batch 1, median, in "
        f"{(report.get('environment') or {}).get('tflite_runtime', 'the TFLite interpreter')}.",
        "",
        "| | accuracy | TFLite accuracy | MACs | params | bytes | TFLite latency (ms) |",
        "|---|---|---|---|---|---|---|",
        f"| baseline | {_percent(baseline.get('accuracy'))} | {_percent(baseline.get('tflite_accuracy'))} | "
        f"{_number(baseline.get('macs'))} | {_number(baseline.get('params'))} | {_number(baseline.get('bytes'))} | "
        f"{_number(baseline.get('tflite_latency_ms'), 3)} |",
    ]
    if best:
        lines.append(
            f"| result | {_percent(best.get('accuracy'))} | {_percent(best.get('tflite_accuracy'))} | "
            f"{_number(best.get('macs'))} | {_number(best.get('params'))} | {_number(best.get('bytes'))} | "
            f"{_number(best.get('tflite_latency_ms'), 3)} |")
        lines += [
            "",
            f"- MAC speedup: **{_number(best.get('speedup'))}x**; measured TFLite latency ratio: "
            f"{_number(best.get('latency_speedup'))}x"
            + _latency_details(best),
            f"- compression (float TFLite bytes of the baseline / bytes of the shipped file): "
            f"**{_number(best.get('compression'))}x** ({best.get('shipped_format', 'float TFLite')})",
            f"- accuracy change: {_number(100 * best['accuracy_delta'] if best.get('accuracy_delta') is not None else None)} points",
            f"- model: `{best.get('model_path')}`",
            f"- TFLite: `{best.get('tflite_path')}`",
        ]
        if best.get("artifact_path"):
            lines.append(f"- shipped artifact: `{best['artifact_path']}`")
        for mode, measured in (best.get("exports") or {}).items():
            lines.append(f"- export {mode}: {_number(measured.get('bytes'))} bytes, accuracy "
                         f"{_percent(measured.get('accuracy'))}, latency {_number(measured.get('latency_ms'), 3)} ms "
                         f"(input {measured.get('input_dtype')})")
        if best.get("delegation"):
            lines += ["", "Delegation (what the runtime's default delegate, XNNPACK on CPU, runs; the rest runs on "
                          "the slower reference kernels):", ""]
            lines += [f"- `{path}`: {measured['summary']}" for path, measured in best["delegation"].items()]
        if best.get("hyperparameters"):
            lines += ["", "Chosen hyperparameters:", "", "```", json.dumps(best["hyperparameters"], indent=2), "```"]
    else:
        lines += ["", "No result: " + str(report.get("reason", "no candidate met the target"))]
    search = report.get("search") or {}
    if search.get("best_validation_accuracy") is not None:
        line = (f"Search: best validation accuracy {_percent(search['best_validation_accuracy'])} "
                f"(trial #{search.get('best_trial')})")
        if search.get("reference_validation_accuracy") is not None:
            line += f"; the uniform reference trial reached {_percent(search['reference_validation_accuracy'])}"
        if search.get("baseline_validation_accuracy") is not None:
            line += f"; the uncompressed baseline scores {_percent(search['baseline_validation_accuracy'])} there"
        if search.get("median_trial_seconds") is not None:
            line += f"; a trial took {search['median_trial_seconds']:.1f} s (median)"
        if search.get("validation_images"):
            line += (f". The validation split has {search['validation_images']:,} images, so one image is "
                     f"{100 / search['validation_images']:.2g} points: smaller differences are ties")
        lines += ["", line + f". Every trial: `{search.get('trials_csv', 'trials.csv')}`; study "
                              f"'{search.get('study_name')}' in `{search.get('storage')}`."]
        lines += [item for name in search.get("plots") or [] for item in ("", f"![{name}]({name})")]
    for section in (best or {}).get("report_sections") or []:  # what the learner adds (Learner.describe)
        lines += ["", section["title"] + ":", ""] + [f"- {line}" for line in section["lines"]]
    if report.get("distillation"):
        distillation = dict(report["distillation"])
        teacher = distillation.pop("teacher", None)
        source = "the baseline" if teacher is None else (
            f"`{teacher['path']}` (validation accuracy {teacher['validation_accuracy']:.2%}, baseline "
            f"{teacher['baseline_validation_accuracy']:.2%})")
        settings = f": {distillation}" if distillation else " (each front model's temperature and weight: pareto.csv)"
        lines += ["", f"Fine-tuning distilled from {source}{settings}"]
    if report.get("pareto"):
        lines += _pareto_lines(report["pareto"])
    trials = report.get("trials") or {}
    if trials:
        lines += ["", f"Trials: {trials.get('completed', 0)} completed, {trials.get('failed', 0)} failed, "
                      f"{trials.get('pruned', 0)} pruned."]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
