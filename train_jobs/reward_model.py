"""Reward model on Ray Train: the RLHF step between SFT and PPO.

A one-output sequence classifier (the base model with a fresh score head) learns from preference
pairs with the Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``: TRL's RewardTrainer in
each Ray Train worker (DDP with several workers). Each pair is a user prompt and two replies,
rendered with the chat template. Bradley-Terry fixes rewards only up to a constant, so the mean
training-set reward is stored as ``reward_offset`` in model/config.json and subtracted by
``llm_platform.alignment.reward.RewardScorer`` (what PPO's reward actor uses): rewards average 0.

Outputs in ``output_dir``: metrics.jsonl, summary.json (held-out ``eval_accuracy``: share of pairs
with reward(chosen) > reward(rejected), before and after training), model/ (+ tokenizer).

Locally (starts a Ray cluster on this machine):
    python -m train_jobs.reward_model --config train_jobs/configs/local_reward.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.reward_model --config train_jobs/configs/gpu_reward.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pydantic import model_validator

from llm_platform.alignment.preference_training import check_scaling
from llm_platform.alignment.preferences import PreferenceData
from llm_platform import console
from llm_platform.config import FrozenConfig, load_config
from llm_platform.errors import PlatformError
from llm_platform.training.config import DType, LoraSettings, OptimSettings, ScalingSettings, TrackingSettings


class RewardJobConfig(FrozenConfig):
    """A reward-model run (``python -m train_jobs.reward_model --config FILE``)."""

    model: str
    """Checkpoint the classifier starts from (a local folder or a hub id): the SFT model, or a base."""
    dtype: DType = "float32"
    """Dtype of the weights (float32 on CPU; bfloat16 on GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for large models, more compute."""
    data: PreferenceData = PreferenceData()
    lora: LoraSettings | None = None
    """Train low-rank adapters (and the score head) instead of every weight, for models too large to
    train whole; they are merged into model/ at the end, so model/ is a plain classifier either way."""
    output_dir: str = "artifacts/rlhf/reward"
    """Where metrics.jsonl, summary.json and model/ go: a folder or an s3://, gs:// URI."""
    storage_path: str | None = None
    """Ray Train checkpoints and run state (folder or URI); defaults to OUTPUT_DIR/ray."""
    run_name: str = "reward"
    """Name of the run under storage_path; a rerun with the same name resumes from its last checkpoint."""
    optim: OptimSettings = OptimSettings(learning_rate=1e-3, warmup_ratio=0.0, max_steps=60)
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="after")
    def _check(self) -> "RewardJobConfig":
        check_scaling(self.optim, self.scaling)
        return self

    def training_settings(self) -> dict:
        """What a checkpoint depends on (not where outputs go or how many workers)."""
        return self.model_dump(mode="json", include={"model", "dtype", "data", "lora", "optim"})


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: RewardTrainer; then rank 0 centres, saves and evaluates."""
    import ray.train
    import ray.train.torch
    from peft import LoraConfig, TaskType
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from llm_platform.alignment.preference_training import (losses, settings_callback, trainer_arguments,
                                                            train_in_worker)
    from llm_platform.alignment.preferences import as_conversations, load_pairs
    from llm_platform.alignment.reward import OFFSET_KEY, RewardScorer, ranking
    from llm_platform.models.loading import DTYPES, load_tokenizer, resolve_model
    from llm_platform.training.outputs import write_summary

    cfg = RewardJobConfig.model_validate(loop_config["config"])
    folder = Path(loop_config["folder"])
    context = ray.train.get_context()
    rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
    set_seed(cfg.optim.seed)  # the fresh score head starts the same in every run
    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(cfg.model), num_labels=1,
                                                               dtype=DTYPES[cfg.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier finds each sequence's end by its padding
    model.to(device)
    train, held_out = load_pairs(cfg.data, "train"), load_pairs(cfg.data, cfg.data.eval_split)
    before = RewardScorer.from_model(model, tokenizer).pair_accuracy(held_out) if rank == 0 else None

    lora = cfg.lora and LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                   lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with tempfile.TemporaryDirectory(prefix="llmp-reward-") as scratch:
        args = RewardConfig(**trainer_arguments(cfg.optim, cfg.scaling, cfg.dtype, scratch, cfg.gradient_checkpointing),
                            max_length=cfg.data.max_length)
        trainer = RewardTrainer(model=model, args=args, train_dataset=as_conversations(train),
                                eval_dataset=as_conversations(held_out) if cfg.optim.eval_every else None,
                                processing_class=tokenizer, peft_config=lora,
                                callbacks=[settings_callback(cfg.training_settings()), RayTrainReportCallback()])
        log, train_seconds = train_in_worker(trainer, folder, rank == 0, cfg, "reward_model")
    if rank != 0:
        return

    out = folder / "model"
    trained = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    trained.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Centre on the saved model, loaded as PPO's reward actor will load it.
    scorer = RewardScorer(str(out), str(device), dtype=cfg.dtype)
    chosen, rejected = scorer.score_pairs(train)
    offset = sum(chosen + rejected) / (2 * len(train))
    trained.config.update({OFFSET_KEY: offset})
    trained.config.save_pretrained(out)
    scorer.offset = offset
    held_chosen, held_rejected = scorer.score_pairs(held_out)
    accuracy, margin = ranking(held_chosen, held_rejected)
    first_loss, last_loss = losses(log)
    write_summary(folder, {
        "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world,
        "eval_accuracy": accuracy, "eval_accuracy_before": before[0], "eval_examples": len(held_out),
        "reward_margin": margin, "reward_margin_before": before[1], "reward_offset": offset,
        "reward_mean_train": sum(chosen + rejected) / (2 * len(train)) - offset,
        "reward_mean_eval": sum(held_chosen + held_rejected) / (2 * len(held_out)),
        "train_loss_first": first_loss, "train_loss": last_loss, "train_seconds": train_seconds,
        "output": str(out)})
    log.finish()


def main(cfg: RewardJobConfig) -> dict:
    from llm_platform.alignment.preference_training import check_inputs, check_resumable, prepare
    from llm_platform.training.launch import fit, storage_for
    from llm_platform.training.outputs import local_dir, publish
    from llm_platform.training.tracking import start_job

    cfg = prepare(cfg)
    check_inputs(cfg)
    folder = local_dir(cfg.output_dir, cfg.run_name)
    start_job(cfg, folder)
    storage = storage_for(cfg.storage_path, folder)
    check_resumable(storage, cfg.run_name, cfg.training_settings())
    fit(train_loop_per_worker, {"config": cfg.model_dump(), "folder": str(folder)}, cfg.scaling, cfg.run_name,
        storage)
    summary = json.loads((folder / "summary.json").read_text())
    publish(folder, cfg.output_dir)
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.reward_model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_jobs/configs/local_reward.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.max_steps=50")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the Ray workers' and vLLM's own output too (LLMP_LOG_LEVEL=INFO); by default the "
                             "console shows progress lines and the workers' output stays in Ray's session logs")
    args = parser.parse_args(argv)
    console.setup(verbose=args.verbose)
    try:
        summary = main(load_config(RewardJobConfig, args.config, args.overrides))
    except PlatformError as exc:
        print(f"reward_model: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
