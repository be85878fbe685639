"""A finished search as rows (one per trial), a CSV, a picture and a summary.

``steps`` is how far a trial got by its last report: the steps it trained, give or take the few a
stopped trial's workers ran between that report and their end. ``compute_fraction`` compares the
steps all trials ran with what they would have run without early stopping (trials × max_steps).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from llm_platform.errors import PlatformError
from llm_platform.tuning.space import TuneSearchConfig, alpha_for

COLUMNS = ["trial", "rank", "alpha", "learning_rate", "steps", "eval_loss", "eval_accuracy", "stopped_early",
           "status", "adapter"]


def trial_rows(grid, search: TuneSearchConfig) -> list[dict]:
    """A row per trial of a Tune ``ResultGrid``, in trial order. ``eval_loss`` is the last validation
    loss the trial reported (at the end, or where ASHA stopped it); accuracy and the adapter exist
    only for trials that ran to the end."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        steps = history["step"].max() if history is not None and "step" in history else 0
        steps = 0 if math.isnan(steps) else int(steps)
        status = "error" if result.error else "completed" if steps >= search.max_steps else "stopped_early"
        rank = result.config["rank"]
        rows.append({"trial": Path(result.path).name, "rank": rank, "alpha": alpha_for(search.alpha_rule, rank),
                     "learning_rate": result.config["lr"], "steps": steps,
                     "eval_loss": metrics.get("eval_loss"), "eval_accuracy": metrics.get("eval_accuracy"),
                     "stopped_early": status == "stopped_early", "status": status,
                     "adapter": metrics.get("adapter") if status == "completed" else None})
    return sorted(rows, key=lambda r: r["trial"])


def summarize(rows: list[dict], search: TuneSearchConfig, baseline: dict | None) -> dict:
    """Best config (lowest final validation loss of the trials that ran to the end), the compute the
    early stopping saved, and the best against the SFT config's own LoRA settings (``baseline``:
    that run's summary.json, trained with the same step budget)."""
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        raise PlatformError("no trial ran to the end: raise grace_period or num_samples")
    best = min(completed, key=lambda r: (r["eval_loss"], r["trial"]))
    run, full = sum(r["steps"] for r in rows), len(rows) * search.max_steps
    summary = {"best_trial": best["trial"],
               "best_config": {"rank": best["rank"], "alpha": best["alpha"], "learning_rate": best["learning_rate"]},
               "best_eval_loss": best["eval_loss"], "best_eval_accuracy": best["eval_accuracy"],
               "trials": len(rows), "completed": len(completed),
               "stopped_early": sum(r["status"] == "stopped_early" for r in rows),
               "errored": sum(r["status"] == "error" for r in rows),
               "trial_steps_run": run, "trial_steps_full": full, "compute_fraction": run / full,
               "search": {"max_steps": search.max_steps, "eval_every": search.eval_every,
                          "grace_period": search.grace_period, "reduction_factor": search.reduction_factor,
                          "num_samples": search.num_samples, "max_concurrent": search.max_concurrent,
                          "alpha_rule": search.alpha_rule}}
    if baseline:
        summary["baseline"] = baseline
        summary["best_beats_baseline"] = {
            "eval_loss": best["eval_loss"] < baseline["eval_loss"],
            "eval_accuracy": (None if best["eval_accuracy"] is None or baseline.get("eval_accuracy") is None
                              else best["eval_accuracy"] > baseline["eval_accuracy"])}
    return summary


def write_csv(rows: list[dict], path: Path) -> None:
    """results.csv; figures a trial does not have (accuracy of a stopped trial) are left empty."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if row[k] is None else row[k] for k in COLUMNS} for row in rows)


def plot(rows: list[dict], path: Path, best_trial: str | None = None, baseline: dict | None = None) -> None:
    """Rank (log scale) × learning rate, coloured by validation loss: circles ran to the end, crosses were
    stopped early (labelled with the step), the best is ringed, the baseline is a diamond."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    scored = [r for r in rows if r["eval_loss"] is not None]
    losses = [r["eval_loss"] for r in scored] + ([baseline["eval_loss"]] if baseline else [])
    norm = LogNorm(vmin=min(losses), vmax=max(losses)) if losses and min(losses) > 0 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = None
    for status, marker, label in (("completed", "o", "ran to the end"), ("stopped_early", "X", "stopped early")):
        subset = [r for r in scored if r["status"] == status]
        if subset:
            points = ax.scatter([r["rank"] for r in subset], [r["learning_rate"] for r in subset], marker=marker,
                                c=[r["eval_loss"] for r in subset], cmap="viridis_r", norm=norm, s=90,
                                edgecolors="black", linewidths=0.5, label=label)
    for r in scored:
        if r["status"] == "stopped_early":
            ax.annotate(str(r["steps"]), (r["rank"], r["learning_rate"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=7)
        if r["trial"] == best_trial:
            ax.scatter([r["rank"]], [r["learning_rate"]], s=320, facecolors="none", edgecolors="red",
                       linewidths=1.5, label="best")
    if baseline:
        ax.scatter([baseline["rank"]], [baseline["learning_rate"]], marker="D", c=[baseline["eval_loss"]],
                   cmap="viridis_r", norm=norm, s=90, edgecolors="red", linewidths=1.0,
                   label=f"baseline (alpha {baseline['alpha']})")
    if points is not None:
        fig.colorbar(points, ax=ax, label="validation loss (at the end, or where stopped)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("learning rate")
    ax.set_title("LoRA rank × learning rate (ASHA + Optuna)")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
