"""Result rows to summary, CSV and plot: the best is the lowest final loss among trials that ran to the end."""

from __future__ import annotations

import csv

import pytest

from llm_platform.errors import PlatformError
from llm_platform.tuning.results import plot, summarize, write_csv
from llm_platform.tuning.space import TuneSearchConfig


def row(trial, rank, lr, steps, loss, accuracy=None, status="completed"):
    return {"trial": trial, "rank": rank, "alpha": 2 * rank, "learning_rate": lr, "steps": steps, "eval_loss": loss,
            "eval_accuracy": accuracy, "stopped_early": status == "stopped_early", "status": status,
            "adapter": f"/x/{trial}/adapter" if status == "completed" else None}


ROWS = [row("t0", 8, 3e-3, 100, 0.30, 0.90), row("t1", 4, 1e-3, 100, 0.20, 0.95),
        row("t2", 32, 1e-2, 20, 0.10, status="stopped_early"),  # lower loss, but not at the end: not the best
        row("t3", 2, 5e-4, 40, 0.90, status="stopped_early")]
SEARCH = TuneSearchConfig(max_steps=100, eval_every=20, grace_period=20)


def test_summary_picks_the_best_completed_trial_and_counts_compute():
    baseline = {"rank": 8, "alpha": 16, "learning_rate": 3e-3, "steps": 100, "eval_loss": 0.25, "eval_accuracy": 0.97}
    summary = summarize(ROWS, SEARCH, baseline)
    assert summary["best_trial"] == "t1"
    assert summary["best_config"] == {"rank": 4, "alpha": 8, "learning_rate": 1e-3}
    assert (summary["trial_steps_run"], summary["trial_steps_full"]) == (260, 400)
    assert summary["compute_fraction"] == pytest.approx(0.65)
    assert (summary["completed"], summary["stopped_early"], summary["errored"]) == (2, 2, 0)
    assert summary["best_beats_baseline"] == {"eval_loss": True, "eval_accuracy": False}


def test_a_search_where_nothing_finished_is_an_error():
    with pytest.raises(PlatformError, match="no trial ran to the end"):
        summarize([r for r in ROWS if r["status"] != "completed"], SEARCH, None)


def test_csv_and_plot(tmp_path):
    write_csv(ROWS, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert rows[2]["eval_accuracy"] == "" and rows[2]["stopped_early"] == "True" and rows[2]["adapter"] == ""
    plot(ROWS, tmp_path / "search.png", "t1", {"rank": 8, "alpha": 16, "learning_rate": 3e-3, "eval_loss": 0.25})
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
