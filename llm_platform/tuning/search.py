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
import sys
import tempfile
import time
from pathlib import Path

from llm_platform.config import load_config
from llm_platform.errors import PlatformError
from llm_platform.training.outputs import JobOutputs
from llm_platform.tuning.space import TuneSearchConfig

REPO = Path(__file__).resolve().parents[2]
"""Where ``sft_config`` paths such as ``train_jobs/configs/local_lora.yaml`` are found when not in the cwd."""


def run_trial(params: dict, search: dict, base: dict, output_dir: str, storage: str) -> None:
    """One trial: the SFT job with this rank and learning rate on Ray Train, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llm_platform.training.config import SFTConfig
    from llm_platform.training.job import run
    from llm_platform.tuning.space import trial_config
    from llm_platform.tuning.trials import TRIAL_JOB, worker_share

    name = ray.tune.get_context().get_trial_id()
    cfg = trial_config(TuneSearchConfig.model_validate(search), SFTConfig.model_validate(base), params["rank"],
                       params["lr"], f"{output_dir}/trials/{name}", name)
    cfg = cfg.model_copy(update={"scaling": worker_share(cfg.scaling), "storage_path": f"{storage}/train"})
    summary = run(TRIAL_JOB, cfg, callbacks=[TuneReportCallback()], prepared=True)
    ray.tune.report({"step": summary["steps"], "eval_loss": summary["eval_loss"],
                     "eval_accuracy": summary.get("eval_accuracy"), "adapter": summary["output"]})


def build_tuner(search: TuneSearchConfig, base, outputs: JobOutputs, storage: str):
    """A new Tuner, or the interrupted one restored from ``storage/run_name``."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from llm_platform.tuning.space import search_space
    from llm_platform.tuning.trials import (TRIAL_RESOURCES, ReleaseStoppedRuns, SearchProgress,
                                            trial_dirname)

    trainable = tune.with_resources(tune.with_parameters(run_trial, search=search.model_dump(),
                                                         base=base.model_dump(), output_dir=outputs.output_dir,
                                                         storage=storage), TRIAL_RESOURCES)
    experiment = f"{storage}/{search.run_name}"
    if tune.Tuner.can_restore(experiment):
        check_same_settings(search, base, outputs)
        print(f"resuming the search in {experiment}", flush=True)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    outputs.write_json("settings.json", _settings(search, base))
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


def check_same_settings(search: TuneSearchConfig, base, outputs: JobOutputs) -> None:
    """Resuming with other settings would mix two searches in one result table."""
    before = json.loads(outputs.read_text("settings.json") or "{}")
    now = _settings(search, base)
    changed = sorted(f"{part}.{key}" for part in now for key in now[part]
                     if before.get(part, {}).get(key) != now[part][key])
    if changed:
        raise PlatformError(f"{outputs.output_dir} holds a search with other settings (changed: "
                            f"{', '.join(changed)}); choose another output_dir to start afresh, or delete it")


def run_baseline(search: TuneSearchConfig, base, outputs: JobOutputs) -> dict:
    """The SFT config's own LoRA settings with the trials' step budget, run by the SFT job itself."""
    from llm_platform.training import sft_job
    from llm_platform.tuning.space import budgeted

    done = outputs.read_text("baseline/summary.json")
    if done:
        summary = json.loads(done)
    else:
        print(f"baseline: rank {base.lora.r} alpha {base.lora.alpha} lr {base.optim.learning_rate:.2e}, "
              f"{search.max_steps} steps", flush=True)
        summary = sft_job.main(budgeted(search, base, outputs.location("baseline"), "baseline"))
    return {"rank": base.lora.r, "alpha": base.lora.alpha, "learning_rate": base.optim.learning_rate,
            "steps": summary["steps"], "eval_loss": summary["eval_loss"],
            "eval_accuracy": summary.get("eval_accuracy"), "adapter": summary["output"]}


def main(search: TuneSearchConfig) -> dict:
    """Run (or resume) the search; write its outputs to ``search.output_dir`` (a folder or a URI)."""
    from llm_platform.cluster import connect
    from llm_platform.report import format_table
    from llm_platform.training.config import SFTConfig
    from llm_platform.training.outputs import register_adapter
    from llm_platform.training.sft_job import check_inputs, prepare
    from llm_platform.tuning.results import plot, summarize, trial_rows, write_csv
    from llm_platform.tuning.space import trial_config

    base = prepare(load_config(SFTConfig, _repo_path(search.sft_config), search.sft_overrides))
    if base.method not in ("lora", "qlora"):
        raise PlatformError(f"sft_config: method {base.method!r}; the search tunes LoRA (lora or qlora)")
    check_inputs(base)
    outputs = JobOutputs.create(search.output_dir)
    for rank in (search.ranks[0], search.ranks[-1]):  # fail now, not in a trial, on a rank the config refuses
        trial_config(search, base, rank, search.lr_max, outputs.location("check"), "check")
    storage = search.storage_path or outputs.output_dir
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    # The trials' step lines stay in the workers' logs: they would drown the search's own progress.
    connect(log_to_driver=False, relay_progress=False)

    started = time.perf_counter()
    print(f"searching LoRA rank {search.ranks} x learning rate [{search.lr_min:.1e}, {search.lr_max:.1e}] on "
          f"{Path(base.model).name}: {search.num_samples} trials of up to {search.max_steps} steps, "
          f"{search.max_concurrent} at a time, ASHA rungs from step {search.grace_period}", flush=True)
    try:
        grid = build_tuner(search, base, outputs, storage).fit()
        if grid.num_terminated + grid.num_errors < search.num_samples:
            raise PlatformError(f"the search stopped with {grid.num_terminated + grid.num_errors} of "
                                f"{search.num_samples} trials finished; run the same command again to resume it")
        search_seconds = time.perf_counter() - started
        rows = trial_rows(grid, search)
        baseline = run_baseline(search, base, outputs) if search.baseline else None
        summary = summarize(rows, search, baseline)
        best = next(r for r in rows if r["trial"] == summary["best_trial"])
        # The trials' adapters are in output_dir (published by each trial's rank 0, wherever it ran).
        summary.update(best_adapter=outputs.copy_within(best["adapter"], "best_adapter"),
                       search_seconds=round(search_seconds, 1), wall_seconds=round(time.perf_counter() - started, 1))
        if search.register_url:
            card = register_adapter(search.register_url, search.register_name,
                                    search.register_base or Path(base.model).name, "lora", summary["best_adapter"])
            summary["registered_as"] = card.get("id")
        with tempfile.TemporaryDirectory(prefix="llmp-tune-") as tmp:
            write_csv(rows, Path(tmp) / "results.csv")
            plot(rows, Path(tmp) / "search.png", summary["best_trial"], baseline)
            outputs.upload(Path(tmp) / "results.csv", "results.csv")
            outputs.upload(Path(tmp) / "search.png", "search.png")
        outputs.write_json("summary.json", summary)
    finally:
        outputs.finish()
    print(format_table([{k: "-" if v is None else v for k, v in r.items() if k != "adapter"} for r in rows]),
          flush=True)
    return summary


def _settings(search: TuneSearchConfig, base) -> dict:
    return {"search": search.settings(), "sft": base.model_dump()}


def _repo_path(name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() or path.exists() else REPO / name


def cli(doc: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_spaces.lora_rank_lr", description=doc.splitlines()[0])
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

