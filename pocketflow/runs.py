"""``pocketflow show RUN`` and ``pocketflow compare RUN...``: a finished run's figures, read from its
report.json (no TensorFlow is imported, nothing is measured again)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from pocketflow.errors import UserError


def load_report(run_dir: str) -> Dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UserError(f"'{run_dir}' holds no report.json; pass a run directory (the --output-dir of a run)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}); was the run killed while writing it?") from None


def shipped_file(best: Dict[str, Any]) -> Dict[str, Any]:
    """What ships: the learner's own file where it has one (sparse container, packed low-bit or
    codebook file), else the TFLite file (the Keras model with --export none); its path (relative
    to the run directory, or absolute), bytes, and accuracy as measured on that file."""
    accuracy = next((best[key] for key in ("artifact_accuracy", "tflite_accuracy", "accuracy")
                     if best.get(key) is not None), None)
    return {"path": best.get("artifact_path") or best.get("tflite_path") or best.get("model_path"),
            "bytes": best.get("artifact_bytes", best.get("bytes")),
            "accuracy": None if accuracy is None else float(accuracy)}


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """The last lines of a run: the baseline, the result, and the file to deploy with its figures."""
    baseline, best = report.get("baseline") or {}, report.get("best") or {}
    run_directory = os.path.dirname(report["config_path"])
    out = [f"run directory: {run_directory}"]
    if baseline:
        out.append(f"baseline: test accuracy {100 * baseline['accuracy']:.2f}%, {baseline['macs']:,} MACs, "
                   f"{baseline['params']:,} params")
    if best:
        def ratio(key: str, text: str) -> str:  # nothing for the baseline itself (full-prec)
            return f" ({best[key]:.2f}x {text})" if best.get(key) and f"{best[key]:.2f}" != "1.00" else ""

        line = f"result:   test accuracy {100 * best['accuracy']:.2f}%, {best['macs']:,} MACs" + ratio("speedup", "fewer")
        if best.get("tflite_latency_ms"):
            line += f", TFLite {best['tflite_latency_ms']:.3f} ms" + ratio("latency_speedup", "faster")
        out.append(line)
        out += _stage_lines(best.get("stages") or [])
        shipped = shipped_file(best)
        if shipped["path"]:
            details = [f"{shipped['bytes'] / 1024:.1f} KB"] if shipped["bytes"] else []
            if best.get("compression") and f"{best['compression']:.2f}" != "1.00":
                details.append(f"{best['compression']:.2f}x smaller than the baseline's")
            if shipped["accuracy"] is not None:
                details.append(f"test accuracy {100 * shipped['accuracy']:.2f}% measured on this file")
            path = (report.get("ship") or {}).get("file") or shipped["path"]
            out.append(f"ship:     {os.path.join(run_directory, path)} ({'; '.join(details)})")
    pareto = report.get("pareto") or {}
    if pareto:
        chosen = (pareto.get("pick") or {}).get("trial")
        out.append(f"pareto:   {pareto.get('models')} non-dominated models in pareto.csv and pareto.png"
                   + (f"; result = trial {chosen}" if chosen is not None else ""))
    return out


def _stage_lines(stages: List[Dict[str, Any]]) -> List[str]:
    """A chain's stages, each with its own file's test accuracy and size (report.json ``best.stages``)."""
    return [f"stage {number}:  {stage.get('learner')}, {stage_summary(stage)}" for number, stage in enumerate(stages, 1)]


def stage_summary(stage: Dict[str, Any], detailed: bool = False) -> str:
    """One chain stage's record in words: its epochs, its file's test accuracy and size; ``detailed``
    (report.md) adds the int8 method shipped, the MACs and the file's latency."""
    parts = [f"{stage.get('finetune_epochs', 0):g} epochs"]
    if detailed and stage.get("shipped_method"):
        parts.append(f"shipped {stage['shipped_method']}")
    if detailed and stage.get("macs"):
        parts.append(f"{stage['macs']:,} MACs")
    accuracy = stage.get("tflite_accuracy", stage.get("artifact_accuracy"))  # a container: measured in Keras
    if accuracy is not None:
        kind = stage.get("shipped_format", "float TFLite")
        kind = kind if detailed else kind.split(" (")[0]  # "codebook file (bit-packed ...)"
        parts.append(f"{kind} test accuracy {100 * accuracy:.2f}%")
    size = stage.get("artifact_bytes") or stage.get("bytes")
    if size:
        parts.append(f"{size / 1024:.1f} KB")
    if detailed and stage.get("tflite_latency_ms"):
        parts.append(f"{stage['tflite_latency_ms']:.3f} ms")
    return ", ".join(parts)


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _ratio(value: Optional[float]) -> str:
    return "-" if not value else f"{value:.2f}x"


def _target(report: Dict[str, Any]) -> str:
    return ", ".join(f"{kind} {value:g}" for kind, value in (report.get("target") or {}).items()) or "none"


def show(run_dir: str) -> List[str]:
    """The key figures of one run, in the words of the run's own last lines."""
    report = load_report(run_dir)
    trials = report.get("trials") or {}
    lines = [f"learner:  {report.get('learner')} on {report.get('net')} ({report.get('dataset')}), target "
             f"{_target(report)}; status {report.get('status')}"
             + (f" ({report['reason']})" if report.get("reason") else ""),
             f"trials:   {trials.get('completed', 0)} completed, {trials.get('failed', 0)} failed"]
    search = report.get("search") or {}
    if search.get("best_validation_accuracy") is not None:
        lines.append(f"search:   best validation accuracy {_percent(search['best_validation_accuracy'])} (trial "
                     f"#{search.get('best_trial')}), reference {_percent(search.get('reference_validation_accuracy'))}"
                     + (f", {search['median_trial_seconds']:.1f} s per trial (median)"
                        if search.get("median_trial_seconds") is not None else ""))
    return lines + summary_lines(report)


def compare(run_dirs: List[str]) -> List[str]:
    """One row per run: what a reader compares first (accuracy change, speedup, size, latency)."""
    header = ["run", "learner", "target", "status", "test accuracy", "change (pts)", "MAC speedup",
              "latency ratio", "compression", "shipped KB"]
    rows = [header]
    for run_dir in run_dirs:
        report = load_report(run_dir)
        best = report.get("best") or {}
        delta = best.get("accuracy_delta")
        shipped = shipped_file(best)
        rows.append([run_dir, str(report.get("learner")), _target(report), str(report.get("status")),
                     _percent(shipped["accuracy"]), "-" if delta is None else f"{100 * delta:+.2f}", _ratio(best.get("speedup")),
                     _ratio(best.get("latency_speedup")), _ratio(best.get("compression")),
                     "-" if shipped["bytes"] is None else f"{shipped['bytes'] / 1024:.1f}"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
