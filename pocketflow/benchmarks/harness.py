"""Run benchmark scenarios and write the results table (Markdown + JSON).

Every scenario runs in its own process (``main.py`` for ours, ``pocketflow.benchmarks.peers`` for
a peer), so one scenario's TensorFlow state never leaks into the next and a crash costs one row.
Rows are written after every scenario; a finished row is kept when the harness runs again (pass
``--force`` to redo it), so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pocketflow.benchmarks.scenarios import ORDER, Scenario
from pocketflow.export import write_atomic

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent.parent
COLUMNS = [("scenario", "scenario"), ("model", "model"), ("method", "method"), ("target", "target"),
           ("baseline_accuracy", "baseline acc"), ("accuracy", "compressed acc"), ("delta", "delta (pts)"),
           ("mac_speedup", "MAC speedup"), ("latency_speedup", "TFLite latency speedup"),
           ("compression", "size compression"), ("shipped_format", "shipped file"), ("seconds", "wall time")]


def command_for(scenario: Scenario, shared: str, output_dir: Path, extra: Sequence[str] = ()) -> List[str]:
    arguments = scenario.arguments(shared) + list(extra)
    if scenario.peer:
        return [sys.executable, "-m", "pocketflow.benchmarks.peers", scenario.method, str(output_dir), "--",
                *arguments]
    return [sys.executable, str(ROOT / "main.py"), "--learner", scenario.method, *arguments,
            "--output-dir", str(output_dir), "--resume"]


def _shipped_accuracy(best: Dict[str, Any]) -> Optional[float]:
    """The measured accuracy of the file that ships (sparse container, int8 file, or float TFLite)."""
    for key in ("artifact_accuracy", "tflite_accuracy", "accuracy"):
        if best.get(key) is not None:
            return float(best[key])
    return None


def row_from_report(report: Dict[str, Any]) -> Dict[str, Any]:
    baseline, best = report.get("baseline") or {}, report.get("best") or {}
    return {
        "baseline_accuracy": baseline.get("accuracy"), "accuracy": _shipped_accuracy(best),
        "mac_speedup": best.get("speedup"), "latency_speedup": best.get("latency_speedup"),
        "compression": best.get("compression"), "shipped_format": best.get("shipped_format"),
        "artifact_bytes": best.get("artifact_bytes", best.get("bytes")), "status": report.get("status"),
        "validation_accuracy": (report.get("search") or {}).get("best_validation_accuracy"),
    }


def _run_once(scenario: Scenario, shared: str, output_dir: Path, extra: Sequence[str], log_file: Path) -> Dict:
    command = command_for(scenario, shared, output_dir, extra)
    started = time.time()
    with open(log_file, "ab") as stream:
        stream.write(("$ " + " ".join(command) + "\n").encode())
        stream.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.time() - started
    result_file = output_dir / ("peer.json" if scenario.peer else "report.json")
    if code != 0 or not result_file.exists():
        return {"status": f"failed (exit {code}; see {log_file})", "seconds": seconds}
    data = json.loads(result_file.read_text())
    row = data if scenario.peer else row_from_report(data)
    row.update(status="ok", seconds=seconds)
    return row


def run_scenario(scenario: Scenario, shared: str, directory: Path) -> Dict[str, Any]:
    """One row: the scenario's measured figures (the mean over repeats, with the spread)."""
    log_file = directory / f"{scenario.name}.log"
    base = {"scenario": scenario.name, "model": scenario.subject, "method": scenario.method,
            "target": scenario.target_text(), "peer": scenario.peer,
            "command": " ".join(command_for(scenario, shared, directory / scenario.name))}
    if scenario.repeat is None:
        row = _run_once(scenario, shared, directory / scenario.name, (), log_file)
        return _with_delta({**base, **row})
    flag, values = scenario.repeat
    runs = [_run_once(scenario, shared, directory / f"{scenario.name}-{flag.lstrip('-')}{value}",
                      (flag, value), log_file) for value in values]
    finished = [r for r in runs if r["status"] == "ok"]
    row = {**base, "status": "ok" if len(finished) == len(runs) else f"{len(runs) - len(finished)} of "
                                                                       f"{len(runs)} runs failed",
           "seconds": sum(r["seconds"] for r in runs), "repeats": {flag: list(values)}, "runs": runs}
    for key in ("baseline_accuracy", "accuracy", "mac_speedup", "latency_speedup", "compression",
                "validation_accuracy"):
        values_found = [r[key] for r in finished if r.get(key) is not None]
        if values_found:
            row[key] = statistics.fmean(values_found)
            row[f"{key}_spread"] = [min(values_found), max(values_found)]
    row["shipped_format"] = finished[0].get("shipped_format") if finished else None
    return _with_delta(row)


def _with_delta(row: Dict[str, Any]) -> Dict[str, Any]:
    if row.get("accuracy") is not None and row.get("baseline_accuracy") is not None:
        row["delta"] = 100.0 * (row["accuracy"] - row["baseline_accuracy"])
    return row


def machine() -> Dict[str, Any]:
    import tensorflow as tf

    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "tensorflow": tf.__version__}


def _cell(key: str, value: Any, row: Dict[str, Any]) -> str:
    if value is None:
        return "-"
    if key in ("baseline_accuracy", "accuracy"):
        text = f"{100 * value:.2f}%"
        spread = row.get(f"{key}_spread")
        return text + (f" ({100 * spread[0]:.2f}-{100 * spread[1]:.2f})" if spread else "")
    if key == "delta":
        return f"{value:+.2f}"
    if key in ("mac_speedup", "latency_speedup", "compression"):
        return f"{value:.2f}x"
    if key == "seconds":
        return f"{value / 60:.1f} min"
    if key == "shipped_format":
        return str(value).split(" (")[0]  # the kind of file; its layout is in report.json
    return str(value)


def write_tables(rows: List[Dict[str, Any]], directory: Path, published: Dict[str, Any], command: str) -> None:
    info = machine()
    write_atomic(directory / "results.json", json.dumps({"machine": info, "command": command, "rows": rows},
                                                        indent=2, default=str).encode())
    dates = sorted({row["date"] for row in rows if row.get("date")}) or [info["date"]]
    when = dates[0] if len(dates) == 1 else f"between {dates[0]} and {dates[-1]}"
    lines = [f"Measured {when} on {info['host']} ({info['cpu_count']} CPUs, {info['processor']}, "
             f"TensorFlow {info['tensorflow']}); the latest command: `{command}` (every row's own command "
             "is in results.json).", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " | status |",
             "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [_cell(key, row.get(key), row) for key, _ in COLUMNS]
        if row.get("peer"):
            cells[2] += " (peer)"
        lines.append("| " + " | ".join(cells) + f" | {row.get('status', '-')} |")
    if published:
        lines += ["", "Published figures (not measured here; for orientation only):", "",
                  "| scenario | published | source |", "|---|---|---|"]
        lines += [f"| {name} | {figure.figure} | {figure.source} |" for name, figure in published.items()]
    lines += ["", "Accuracy is measured on the test split with the shipped file in the TFLite interpreter "
                  "(ours: the sparse container or int8 file where that ships). Latency speedup: baseline float "
                  "TFLite / shipped TFLite, batch 1, one thread, timed in the same run. Size compression: "
                  "baseline float TFLite bytes / shipped file bytes."]
    write_atomic(directory / "results.md", ("\n".join(lines) + "\n").encode())


def _table_order(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def run(scenarios: List[Scenario], shared: str, directory: Path, *, force: bool = False,
        command: str = "", published: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Run ``scenarios`` (finished rows are kept unless ``force``) and write the tables.

    The tables also keep the finished rows of scenarios not selected this time, so a full table
    can be built in several sittings (each row records its own command and date).
    """
    directory.mkdir(parents=True, exist_ok=True)
    saved: List[Dict[str, Any]] = []
    if (directory / "results.json").exists():
        saved = [row for row in json.loads((directory / "results.json").read_text())["rows"]
                 if row.get("status") == "ok"]
    previous = {} if force else {row["scenario"]: row for row in saved}
    selected = {scenario.name for scenario in scenarios}
    others = [row for row in saved if row["scenario"] not in selected]

    def table(rows_now: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return sorted(rows_now + others, key=lambda row: _table_order(row["scenario"]))

    rows: List[Dict[str, Any]] = []
    expected = sum(s.minutes for s in scenarios if s.name not in previous)
    log.info("%d scenarios, about %.0f minutes on 2 cores", len(scenarios), expected)
    for index, scenario in enumerate(scenarios, 1):
        if scenario.name in previous:
            log.info("[%d/%d] %s: kept from the previous run", index, len(scenarios), scenario.name)
            rows.append(previous[scenario.name])
            continue
        log.info("[%d/%d] %s (about %.0f min)", index, len(scenarios), scenario.name, scenario.minutes)
        row = run_scenario(scenario, shared, directory)
        log.info("[%d/%d] %s: %s, accuracy %s, %.1f min", index, len(scenarios), scenario.name, row["status"],
                 _cell("accuracy", row.get("accuracy"), row), row["seconds"] / 60)
        row.setdefault("date", datetime.date.today().isoformat())
        rows.append(row)
        write_tables(table(rows), directory, published or {}, command)
    write_tables(table(rows), directory, published or {}, command)
    return rows
