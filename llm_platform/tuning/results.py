"""A finished search as rows (one per trial), a CSV and a picture."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ["trial", "rank", "alpha", "learning_rate", "steps", "eval_loss", "eval_accuracy", "stopped_early", "output"]


def collect(grid, trials_dir: Path, search, default: dict) -> list[dict]:
    """Rows in trial order; accuracy and the adapter exist only for trials that ran to the end."""
    from tune_spaces.lora_rank_lr import alpha_for

    rows = []
    for result in grid:
        history = result.metrics_dataframe
        trial = result.path.rstrip("/").split("/")[-1]
        trial_id = (result.metrics or {}).get("trial_id") or trial
        steps = int(history["step"].max()) if history is not None and "step" in history else 0
        losses = history["eval_loss"].dropna() if history is not None and "eval_loss" in history else []
        summary_path = trials_dir / trial_id / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        rank = result.config["rank"]
        rows.append({"trial": trial_id, "rank": rank, "alpha": alpha_for(search.alpha_rule, rank),
                     "learning_rate": result.config["lr"], "steps": steps,
                     "eval_loss": summary.get("eval_loss", float(losses.iloc[-1]) if len(losses) else float("nan")),
                     "eval_accuracy": summary.get("eval_accuracy", float("nan")),
                     "stopped_early": steps < search.max_steps,
                     "output": summary.get("output", "")})
    # The default config was the first point evaluated; keep it first, the rest by trial id.
    rows.sort(key=lambda r: (not (r["rank"] == default["rank"] and abs(r["learning_rate"] - default["lr"]) < 1e-12),
                             r["trial"]))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    """Rank (log scale) × learning rate, coloured by validation loss; stopped trials as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    losses = [r["eval_loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early (ASHA)")):
        subset = [r for r in rows if r["stopped_early"] == stopped]
        if subset:
            points = ax.scatter([r["rank"] for r in subset], [r["learning_rate"] for r in subset], marker=marker,
                                c=[r["eval_loss"] for r in subset], cmap="viridis_r", vmin=lo, vmax=hi, s=80,
                                label=label)
    fig.colorbar(points, ax=ax, label="validation loss")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("learning rate")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
