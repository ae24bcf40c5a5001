"""What the search leaves beside the report: the summary, the plots and their place in report.md."""

from __future__ import annotations

import optuna

from hpo import results
from pocketflow.report import render_markdown


def _study() -> optuna.Study:
    """Trial 0 is the reference; trial 2 is the best feasible one; trial 3 is more accurate but misses."""
    study = optuna.create_study(direction="maximize")
    for number, (value, feasible) in enumerate([(0.90, True), (0.88, True), (0.93, True), (0.97, False)]):
        trial = study.ask()
        trial.suggest_float("keep", 0.1, 1.0)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("speedup", 2.0 + number * 0.01 if feasible else 1.5)
        trial.set_user_attr("seconds", 1.0 + number)
        if number == 0:
            trial.set_user_attr("reference", True)
        study.tell(trial, value)
    study.set_user_attr(results.BASELINE_ACCURACY_ATTRIBUTE, 0.95)  # as the search records it
    return study


def test_summary_names_the_best_feasible_trial_and_the_validation_resolution(tmp_path):
    study = _study()
    plots = results.write_plots(study, tmp_path, {"speedup": 2.0}, validation_images=144)
    assert plots == ["search_history.png", "accuracy_vs_speedup.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in plots)
    summary = results.summary(study, {"speedup": 2.0}, "sqlite:///x", validation_images=144, plots=plots)
    assert summary["best_trial"] == 2 and summary["best_validation_accuracy"] == 0.93  # not the infeasible 0.97
    assert summary["reference_validation_accuracy"] == 0.90 and summary["feasible_trials"] == 3
    assert summary["median_trial_seconds"] == 2.5 and summary["baseline_validation_accuracy"] == 0.95
    text = render_markdown({"best": {"accuracy": 0.9}, "search": summary})
    assert "(trial #2)" in text and "one image is 0.69 points" in text
    assert "the uncompressed baseline scores 95.00% there" in text
    assert "![search_history.png](search_history.png)" in text
    assert "![accuracy_vs_speedup.png](accuracy_vs_speedup.png)" in text
