"""Ray Tune over LoRA rank and learning rate, trials being the SFT job (Ray Train inside Tune).

Optuna proposes (rank, learning rate); alpha follows the rank by a rule (``2r`` by default);
ASHA stops trials whose validation loss lags at its rungs, so most of the budget goes to the
promising ones. The first trial is the fine-tuning job's default LoRA config, so the search is
compared with it under identical conditions. Outputs in ``output_dir``: results.csv (a row per
trial), summary.json (best_config, compute saved, best vs default), search.png, best_adapter/.
An interrupted search resumes when started again with the same output_dir.

    python -m tune_spaces.lora_rank_lr --config tune_spaces/configs/local.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m tune_spaces.lora_rank_lr --config tune_spaces/configs/local.yaml --register-url http://SERVER:8000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from llm_platform.config import FrozenConfig, load_config
from llm_platform.errors import PlatformError

REPO = Path(__file__).resolve().parents[1]
# A trial only waits on its Ray Train worker, which does the work. Tune needs the trial to hold some
# CPU, so it holds a sliver and its worker that much less: N concurrent trials then fit N cores.
TRIAL_CPU = 0.01


class TuneSearchConfig(FrozenConfig):
    """A LoRA rank × learning-rate search (``python -m tune_spaces.lora_rank_lr --config FILE``)."""

    sft_config: str = "train_jobs/configs/local_lora.yaml"
    """The SFT job config each trial starts from (its LoRA rank/alpha/learning rate are the default trial)."""
    sft_overrides: list[str] = []
    """key=value overrides applied to the SFT config of every trial (e.g. model=..., data.eval_limit=64)."""
    ranks: list[int] = [2, 4, 8, 16, 32, 64]
    """LoRA ranks Optuna chooses from."""
    lr_min: float = Field(3e-4, gt=0)
    lr_max: float = Field(1e-2, gt=0)
    """Learning rates are searched log-uniformly in [lr_min, lr_max]."""
    alpha_rule: str = "2r"
    """How alpha follows the rank: ``2r``, ``r`` or ``fixed:N``."""
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    max_steps: int = Field(160, ge=1)
    """Steps of a trial run to completion."""
    eval_every: int = Field(20, ge=1)
    """Steps between validation losses (ASHA's rungs fall on these)."""
    grace_period: int = Field(40, ge=1)
    """Steps every trial gets before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)
    output_dir: str = "artifacts/tune/lora_rank_lr"
    seed: int = 0
    register_url: str | None = None
    register_base: str | None = None
    register_name: str = "tuned-lora"

    @field_validator("alpha_rule")
    @classmethod
    def _rule(cls, rule: str) -> str:
        alpha_for(rule, 8)
        return rule

    @model_validator(mode="after")
    def _check(self) -> "TuneSearchConfig":
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be below lr_max ({self.lr_max})")
        if self.max_steps % self.eval_every:
            raise ValueError("max_steps must be a multiple of eval_every (the last step reports a validation loss)")
        if self.register_url and not self.register_base:
            raise ValueError("register_base: required with register_url")
        return self


def alpha_for(rule: str, rank: int) -> int:
    if rule == "2r":
        return 2 * rank
    if rule == "r":
        return rank
    if rule.startswith("fixed:") and rule[6:].isdigit():
        return int(rule[6:])
    raise ValueError(f"alpha_rule {rule!r}: expected '2r', 'r' or 'fixed:N'")


def trial_config(search: TuneSearchConfig, base, rank: int, lr: float, folder: Path, name: str):
    """The SFT config of one trial: the base with this rank, alpha and learning rate."""
    lora = base.lora.model_copy(update={"r": rank, "alpha": alpha_for(search.alpha_rule, rank)})
    optim = base.optim.model_copy(update={"learning_rate": lr, "max_steps": search.max_steps,
                                          "eval_every": search.eval_every, "log_every": search.eval_every,
                                          "save_every": 0})
    return base.model_copy(update={"lora": lora, "optim": optim, "output_dir": str(folder / name),
                                   "run_name": name, "method": "lora"})


def run_trial(params: dict) -> None:
    """A Tune trial: the SFT job on Ray Train, its reports forwarded to Tune (and so to ASHA)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llm_platform.training.config import SFTConfig
    from llm_platform.training.launch import fit
    from train_jobs.sft import train_loop_per_worker

    search = TuneSearchConfig.model_validate(params["search"])
    base = SFTConfig.model_validate(params["base"])
    name = ray.tune.get_context().get_trial_id()
    folder = Path(params["folder"])
    cfg = trial_config(search, base, params["rank"], params["lr"], folder / "trials", name)
    scaling = cfg.scaling.model_copy(update={"cpus_per_worker": max(cfg.scaling.cpus_per_worker - TRIAL_CPU, 0.01)})
    cfg = cfg.model_copy(update={"scaling": scaling})
    fit(train_loop_per_worker, {"config": cfg.model_dump()}, cfg.scaling, name, str(folder / "ray_train"),
        callbacks=[TuneReportCallback()])


def main(search: TuneSearchConfig) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from llm_platform.training.config import SFTConfig
    from llm_platform.training.outputs import register_adapter
    from llm_platform.tuning.results import collect, plot, write_csv
    from train_jobs.sft import check_inputs, prepare

    base = prepare(load_config(SFTConfig, _path(search.sft_config), search.sft_overrides))
    check_inputs(base)
    folder = Path(search.output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    default = {"rank": base.lora.r, "lr": base.optim.learning_rate}
    space = {"rank": tune.choice(search.ranks), "lr": tune.loguniform(search.lr_min, search.lr_max),
             "search": search.model_dump(), "base": base.model_dump(), "folder": str(folder)}
    algo = ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[default], seed=search.seed),
                              max_concurrent=search.max_concurrent)
    scheduler = ASHAScheduler(time_attr="step", max_t=search.max_steps, grace_period=search.grace_period,
                              reduction_factor=search.reduction_factor)
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # Ray 2.60 leaks the placement group of a Ray Train run whose trial ASHA stopped; with logical
        # CPUs = cores the next trial would wait forever. max_concurrent bounds the real parallelism.
        ray.init(num_cpus=4 * (os.cpu_count() or 1), logging_level="WARNING")
    elif not ray.is_initialized():
        ray.init(logging_level="WARNING")
    experiment = folder / "tune"
    if tune.Tuner.can_restore(str(experiment)):
        print(f"resuming the search in {experiment}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            metric="eval_loss", mode="min", search_alg=algo, scheduler=scheduler, num_samples=search.num_samples),
            run_config=tune.RunConfig(name="tune", storage_path=str(folder), verbose=0,
                                      callbacks=[ProgressLine(search.num_samples)]))
    grid = tuner.fit()
    rows = collect(grid, folder / "trials", search, default)
    write_csv(rows, folder / "results.csv")
    plot(rows, folder / "search.png")
    summary = summarize(rows, search, default)
    best = next(r for r in rows if r["trial"] == summary["best_trial"])
    if (folder / "best_adapter").exists():
        shutil.rmtree(folder / "best_adapter")
    shutil.copytree(Path(best["output"]), folder / "best_adapter")
    if search.register_url:
        card = register_adapter(search.register_url, search.register_name, search.register_base, "lora",
                                str(folder / "best_adapter"))
        summary["registered_as"] = card.get("id")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def summarize(rows: list[dict], search: TuneSearchConfig, default: dict) -> dict:
    completed = [r for r in rows if not r["stopped_early"] and r["output"]]
    if not completed:
        raise PlatformError("no trial ran to completion; raise grace_period or num_samples")
    best = min(completed, key=lambda r: r["eval_loss"])
    baseline = rows[0]  # Optuna evaluates the SFT config's own (rank, lr) first
    run, full = sum(r["steps"] for r in rows), len(rows) * search.max_steps
    return {"best_trial": best["trial"],
            "best_config": {"rank": best["rank"], "learning_rate": best["learning_rate"], "alpha": best["alpha"]},
            "best_eval_loss": best["eval_loss"], "best_eval_accuracy": best["eval_accuracy"],
            "baseline": {"rank": default["rank"], "learning_rate": default["lr"], "eval_loss": baseline["eval_loss"],
                         "eval_accuracy": baseline["eval_accuracy"], "steps": baseline["steps"]},
            "best_beats_baseline": best["eval_loss"] < baseline["eval_loss"],
            "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
            "trial_steps_run": run, "trial_steps_full": full, "compute_fraction": run / full}


class ProgressLine:
    """A line per finished trial: its settings, where it stopped, and the best so far."""

    def __new__(cls, total: int):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self):
                self.done, self.best = 0, None

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                result = trial.last_result or {}
                loss = result.get("eval_loss", float("nan"))
                if self.best is None or loss < self.best[0]:
                    self.best = (loss, trial.config["rank"], trial.config["lr"])
                print(f"trial {self.done}/{total} {trial.trial_id}: rank {trial.config['rank']} lr "
                      f"{trial.config['lr']:.2e} -> step {result.get('step')} eval_loss {loss:.4f} | best so far "
                      f"{self.best[0]:.4f} (rank {self.best[1]}, lr {self.best[2]:.2e})", flush=True)

        return Progress()


def _path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() or path.exists() else REPO / name


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_spaces.lora_rank_lr", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. tune_spaces/configs/local.yaml")
    parser.add_argument("--register-url", help="register the best adapter with this running server")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. num_samples=4")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"register_url={args.register_url}"] if args.register_url else [])
    try:
        summary = main(load_config(TuneSearchConfig, args.config, overrides))
    except PlatformError as exc:
        print(f"lora_rank_lr: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
