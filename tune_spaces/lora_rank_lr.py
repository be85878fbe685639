"""Ray Tune over LoRA rank and learning rate, each trial being the SFT job on Ray Train.

Why: the rank and the learning rate are the two LoRA settings that matter most and interact (alpha
follows the rank by ``alpha_rule``, so the update's scale stays put or shrinks as the rank grows).
Optuna proposes (rank, learning rate) pairs, random at first and then from its TPE model of the
results; ASHA compares the trials' validation losses at its rungs (grace_period × reduction_factor^k
steps) and stops the ones that lag, so most of the compute goes to the promising ones. Each trial is a
Tune function that builds and fits the SFT job's TorchTrainer (Ray Train V2), whose reports Ray's
``TuneReportCallback`` forwards to Tune. The SFT config's own LoRA settings are trained once with the
same step budget as the baseline to compare the best with.

Outputs in ``output_dir``: results.csv (a row per trial), summary.json (best_config, compute saved,
best vs baseline), search.png, best_adapter/ (PEFT), trials/<trial>/ (each trial's SFT outputs),
baseline/ and tune/ (Tune's experiment state). An interrupted search (Ctrl-C, a lost driver) resumes
where it stopped when started again with the same output_dir and settings (``Tuner.restore``).

Locally (starts a Ray cluster on this machine):
    python -m tune_spaces.lora_rank_lr --config tune_spaces/configs/local.yaml [key=value ...]
On a cluster, registering the best adapter with a running server:
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m tune_spaces.lora_rank_lr --config tune_spaces/configs/local.yaml --register-url http://SERVER:8000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from llm_platform.config import load_config
from llm_platform.errors import PlatformError
from llm_platform.tuning.space import TuneSearchConfig

REPO = Path(__file__).resolve().parents[1]


def run_trial(params: dict, search: dict, base: dict, folder: str, storage: str) -> None:
    """One trial: the SFT job with this rank and learning rate on Ray Train, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llm_platform.training.config import SFTConfig
    from llm_platform.training.launch import fit
    from llm_platform.tuning.space import trial_config
    from llm_platform.tuning.trials import trial_loop_per_worker, worker_share

    name = ray.tune.get_context().get_trial_id()
    cfg = trial_config(TuneSearchConfig.model_validate(search), SFTConfig.model_validate(base), params["rank"],
                       params["lr"], Path(folder) / "trials" / name, name)
    scaling = worker_share(cfg.scaling)
    fit(trial_loop_per_worker, {"config": cfg.model_copy(update={"scaling": scaling}).model_dump()}, scaling,
        name, f"{storage}/train", callbacks=[TuneReportCallback()])
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    ray.tune.report({"step": summary["steps"], "eval_loss": summary["eval_loss"],
                     "eval_accuracy": summary.get("eval_accuracy"), "adapter": summary["output"]})


def build_tuner(search: TuneSearchConfig, base, folder: Path, storage: str):
    """A new Tuner, or the interrupted one restored from ``storage/run_name``."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from llm_platform.tuning.space import search_space
    from llm_platform.tuning.trials import (TRIAL_RESOURCES, ReleaseStoppedRuns, SearchProgress,
                                            trial_dirname)

    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search.model_dump(),
                                                         base=base.model_dump(), folder=str(folder),
                                                         storage=storage), TRIAL_RESOURCES)
    experiment = f"{storage}/{search.run_name}"
    if tune.Tuner.can_restore(experiment):
        check_same_settings(search, base, folder)
        print(f"resuming the search in {experiment}", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    (folder / "settings.json").write_text(json.dumps(_settings(search, base), indent=2, sort_keys=True) + "\n")
    sampler = optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.random_trials)
    return tune.Tuner(
        trainable, param_space=search_space(search),
        tune_config=tune.TuneConfig(
            metric="eval_loss", mode="min", num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent, search_alg=OptunaSearch(sampler=sampler),
            scheduler=ASHAScheduler(time_attr="step", max_t=search.max_steps, grace_period=search.grace_period,
                                    reduction_factor=search.reduction_factor),
            trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=search.run_name, storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=search.trial_retries),
                                  # The experiment state (which trials ended, and how) reaches storage every
                                  # 10 s, not Tune's default 300 s: a search interrupted after a few trials
                                  # resumes without running them again.
                                  sync_config=tune.SyncConfig(sync_period=10),
                                  callbacks=[SearchProgress(search), ReleaseStoppedRuns()]))


def check_same_settings(search: TuneSearchConfig, base, folder: Path) -> None:
    """Resuming with other settings would mix two searches in one result table."""
    path = folder / "settings.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    now = _settings(search, base)
    changed = sorted(f"{part}.{key}" for part in now for key in now[part]
                     if before.get(part, {}).get(key) != now[part][key])
    if changed:
        raise PlatformError(f"{folder} holds a search with other settings (changed: {', '.join(changed)}); "
                            f"choose another output_dir to start afresh, or delete {folder}")


def run_baseline(search: TuneSearchConfig, base, folder: Path) -> dict:
    """The SFT config's own LoRA settings with the trials' step budget, run by the SFT job itself."""
    from llm_platform.tuning.space import budgeted
    from train_jobs import sft

    out = folder / "baseline"
    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
    else:
        print(f"baseline: rank {base.lora.r} alpha {base.lora.alpha} lr {base.optim.learning_rate:.2e}, "
              f"{search.max_steps} steps", flush=True)
        summary = sft.main(budgeted(search, base, out, "baseline"))
    return {"rank": base.lora.r, "alpha": base.lora.alpha, "learning_rate": base.optim.learning_rate,
            "steps": summary["steps"], "eval_loss": summary["eval_loss"],
            "eval_accuracy": summary.get("eval_accuracy"), "adapter": summary["output"]}


def main(search: TuneSearchConfig) -> dict:
    from llm_platform.report import format_table
    from llm_platform.training.config import SFTConfig
    from llm_platform.training.launch import storage_for
    from llm_platform.training.outputs import register_adapter
    from llm_platform.tuning.results import plot, summarize, trial_rows, write_csv
    from llm_platform.tuning.space import trial_config
    from llm_platform.cluster import connect
    from train_jobs.sft import check_inputs, prepare

    base = prepare(load_config(SFTConfig, _repo_path(search.sft_config), search.sft_overrides))
    if base.method not in ("lora", "qlora"):
        raise PlatformError(f"sft_config: method {base.method!r}; the search tunes LoRA (lora or qlora)")
    check_inputs(base)
    folder = Path(search.output_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for rank in (search.ranks[0], search.ranks[-1]):  # fail now, not in a trial, on a rank the config refuses
        trial_config(search, base, rank, search.lr_max, folder, "check")
    storage = storage_for(search.storage_path, folder) if search.storage_path else str(folder)
    # The trials' step lines stay in the workers' logs: they would drown the search's own progress.
    connect(log_to_driver=False, relay_progress=False)

    started = time.perf_counter()
    print(f"searching LoRA rank {search.ranks} x learning rate [{search.lr_min:.1e}, {search.lr_max:.1e}] on "
          f"{Path(base.model).name}: {search.num_samples} trials of up to {search.max_steps} steps, "
          f"{search.max_concurrent} at a time, ASHA rungs from step {search.grace_period}", flush=True)
    grid = build_tuner(search, base, folder, storage).fit()
    if grid.num_terminated + grid.num_errors < search.num_samples:
        raise PlatformError(f"the search stopped with {grid.num_terminated + grid.num_errors} of "
                            f"{search.num_samples} trials finished; run the same command again to resume it")
    search_seconds = time.perf_counter() - started
    rows = trial_rows(grid, search)
    baseline = run_baseline(search, base, folder) if search.baseline else None
    summary = summarize(rows, search, baseline)
    best = next(r for r in rows if r["trial"] == summary["best_trial"])
    shutil.rmtree(folder / "best_adapter", ignore_errors=True)
    shutil.copytree(best["adapter"], folder / "best_adapter")
    summary.update(best_adapter=str(folder / "best_adapter"), search_seconds=round(search_seconds, 1),
                   wall_seconds=round(time.perf_counter() - started, 1))
    if search.register_url:
        card = register_adapter(search.register_url, search.register_name,
                                search.register_base or Path(base.model).name, "lora", summary["best_adapter"])
        summary["registered_as"] = card.get("id")
    write_csv(rows, folder / "results.csv")
    plot(rows, folder / "search.png", summary["best_trial"], baseline)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(format_table([{k: "-" if v is None else v for k, v in r.items() if k != "adapter"} for r in rows]),
          flush=True)
    return summary


def _settings(search: TuneSearchConfig, base) -> dict:
    return {"search": search.settings(), "sft": base.model_dump()}


def _repo_path(name: str) -> Path:
    path = Path(name).expanduser()
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
