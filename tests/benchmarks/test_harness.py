"""The benchmark harness: every scenario is a valid run, rows carry measured figures, reruns resume."""

from __future__ import annotations

import json

import pytest

from learners import LEARNERS
from pocketflow.benchmarks import harness
from pocketflow.benchmarks.peers import PEERS
from pocketflow.benchmarks.scenarios import ORDER, SCENARIOS, select
from pocketflow.cli import build_parser, merged_config_dict
from pocketflow.config import build_run_config


@pytest.mark.parametrize("name", ORDER)
def test_every_scenario_is_a_valid_run(name):
    scenario = SCENARIOS.get(name)
    assert scenario.method in (PEERS.names() if scenario.peer else LEARNERS.names())
    data, source = merged_config_dict(build_parser().parse_args(
        ["--learner", "full-prec" if scenario.peer else scenario.method, *scenario.arguments("/shared")]))
    config = build_run_config(data, LEARNERS.names(), source)
    if not scenario.peer:
        LEARNERS.get(scenario.method).check_target(config.target)
    else:
        assert config.train.finetune_epochs is not None or scenario.method == "tflite-ptq"


@pytest.mark.parametrize("name", ["resnet20-channel-2x", "resnet56-channel-int8-9x-3ep", "resnet20-torch-pruning-2x"])
def test_the_shared_resnets_come_from_their_recipe_files_pointed_at_the_shared_data(name):
    """configs/resnet{20,56}_cifar10.yaml hold the model, data and normalization every ResNet row uses; the
    scenario points the paths at the --shared-data folder (flags override the file)."""
    scenario = SCENARIOS.get(name)
    arguments = scenario.arguments("/elsewhere/data")
    assert "--config" in arguments and "--set" not in arguments[:arguments.index("--data-dir") + 2]
    data, source = merged_config_dict(build_parser().parse_args(["--learner", "channel", *arguments]))
    config = build_run_config(data, LEARNERS.names(), source)
    assert config.model == f"/elsewhere/data/pretrained/{scenario.subject}_cifar10.h5"
    assert config.data.name == "cifar10" and config.data.dir == "/elsewhere/data/cifar10"
    assert config.data.mean == (0.485, 0.456, 0.406) and config.data.std == (0.229, 0.224, 0.225)


def test_other_shared_files_in_a_scenario_are_found_in_the_shared_folder():
    arguments = SCENARIOS.get("resnet20-channel-3x-5ep-teacher56").arguments("/elsewhere/data")
    data, source = merged_config_dict(build_parser().parse_args(["--learner", "channel", *arguments]))
    config = build_run_config(data, LEARNERS.names(), source)
    assert config.distillation.teacher == "/elsewhere/data/pretrained/resnet56_cifar10.h5"


def test_quick_selection_needs_no_shared_data():
    quick = select([], quick=True, shared_available=False)
    assert quick and all(not s.needs_shared() and s.quick for s in quick)
    assert {"tfmot-prune", "tflite-ptq"} <= {s.method for s in quick if s.peer}
    assert len(select([], quick=False, shared_available=True)) > len(quick)


def test_row_from_report_uses_the_shipped_file():
    report = {"status": "completed", "baseline": {"accuracy": 0.9},
              "best": {"accuracy": 0.88, "tflite_accuracy": 0.87, "artifact_accuracy": 0.86, "speedup": 1.0,
                       "compression": 4.0, "latency_speedup": 1.1, "shipped_format": "container"},
              "search": {"median_trial_seconds": 12.34}}
    row = harness.row_from_report(report)
    assert row["accuracy"] == 0.86 and row["compression"] == 4.0 and row["trial_seconds"] == 12.34
    assert harness._cell("trial_seconds", 12.34, row) == "12.3 s"
    assert harness._with_delta({**row})["delta"] == pytest.approx(-4.0)


def test_peer_scenario_end_to_end_and_resume(tmp_path, caplog):
    scenario = SCENARIOS.get("digits-tflite-ptq-int8")
    rows = harness.run([scenario], "/nonexistent", tmp_path, command="test")
    row = rows[0]
    assert row["status"] == "ok", (tmp_path / f"{scenario.name}.log").read_text()[-2000:]
    assert 0.9 <= row["accuracy"] <= 1.0 and abs(row["delta"]) < 2
    assert row["compression"] > 3.0  # int8 weights: about 4x smaller than float
    assert (tmp_path / scenario.name / "tflite_ptq_int8.tflite").stat().st_size == row["artifact_bytes"]
    table = (tmp_path / "results.md").read_text()
    assert "digits-tflite-ptq-int8" in table and "tflite-ptq (peer)" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["scenario"] == scenario.name and saved["machine"]["cpu_count"]
    caplog.set_level("INFO")
    again = harness.run([scenario], "/nonexistent", tmp_path, command="test")
    assert again[0]["seconds"] == row["seconds"]  # kept, not run again
    assert "kept from the previous run" in caplog.text


def test_rows_of_other_scenarios_stay_in_the_table(tmp_path, monkeypatch):
    """A table built in several sittings: a later run of one scenario keeps the others' rows."""
    def fake(scenario, shared, directory):
        return {"scenario": scenario.name, "status": "ok", "seconds": 1.0, "accuracy": 0.5}

    monkeypatch.setattr(harness, "run_scenario", fake)
    first, second = SCENARIOS.get(ORDER[1]), SCENARIOS.get(ORDER[0])
    harness.run([first], "/nonexistent", tmp_path, command="first")
    harness.run([second], "/nonexistent", tmp_path, command="second")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["scenario"] for row in saved["rows"]] == [second.name, first.name]  # the scenarios' order
    assert saved["command"] == "second" and all(row["date"] for row in saved["rows"])
    harness.run([second], "/nonexistent", tmp_path, command="again", force=True)
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 2


def test_readme_table_is_generated_from_the_committed_results():
    """README's results table is the rendering of docs/benchmarks/results.json, not a hand-kept copy."""
    from pocketflow.benchmarks.scenarios import published_figures

    results = json.loads((harness.ROOT / "docs" / "benchmarks" / "results.json").read_text())
    table = harness.render_table(results, published_figures())
    readme = (harness.ROOT / "README.md").read_text()
    assert harness.readme_block(readme, table) == readme, "run: python scripts/benchmark.py --table"
    assert (harness.ROOT / "docs" / "benchmarks" / "results.md").read_text() == table
    scenarios = [row["scenario"] for row in results["rows"]]
    assert len(scenarios) == len(set(scenarios)), "one scenario, one figure"
    assert all(row.get("runtime") and row.get("date") for row in results["rows"])


def test_rows_record_commit_and_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "run_scenario",
                        lambda scenario, shared, directory: {"scenario": scenario.name, "status": "ok",
                                                             "seconds": 1.0, "runtime": "LiteRT (ai-edge-litert 9)"})
    harness.run([SCENARIOS.get(ORDER[0])], "/nonexistent", tmp_path / "runs", command="c", results_dir=tmp_path)
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["commit"] == harness.git_commit() and row["commit"]
    assert "| LiteRT 9 |" in (tmp_path / "results.md").read_text()
