"""Reward model on Ray Train: a one-output sequence classifier trained on preference pairs with the
Bradley-Terry loss (TRL's RewardTrainer inside each worker), the RLHF step between SFT and PPO.

Each pair is a user prompt with a chosen and a rejected reply, rendered with the chat template;
the loss is ``-log sigmoid(r(chosen) - r(rejected))``. After training the mean reward over the
training set is stored as ``reward_offset`` (see llm_platform/alignment/reward.py), so rewards
average 0. Outputs in ``output_dir``: metrics.jsonl, summary.json (held-out ``eval_accuracy``:
share of pairs ranked right), model/.

    python -m train_jobs.reward_model --config train_jobs/configs/local_reward.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.reward_model --config train_jobs/configs/gpu_reward.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pydantic import Field

from llm_platform.config import FrozenConfig, load_config
from llm_platform.errors import PlatformError
from llm_platform.training.config import DType, ScalingSettings


class RewardOptim(FrozenConfig):
    learning_rate: float = Field(1e-3, gt=0)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    """Global batch of pairs, split evenly across workers."""
    log_every: int = Field(10, ge=1)
    save_every: int = Field(50, ge=1)
    seed: int = 0


class RewardJobConfig(FrozenConfig):
    """A reward-model run (``python -m train_jobs.reward_model --config FILE``)."""

    model: str
    """Base checkpoint the classifier starts from (usually the SFT model)."""
    dtype: DType = "float32"
    data: str = "synthetic:preferences"
    """Preference pairs with ``prompt``, ``chosen`` and ``rejected`` columns."""
    train_limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(200, ge=1)
    max_length: int = Field(256, ge=16)
    output_dir: str = "artifacts/rlhf/reward"
    storage_path: str | None = None
    run_name: str = "reward"
    optim: RewardOptim = RewardOptim()
    scaling: ScalingSettings = ScalingSettings()


def load_pairs(cfg, split: str):
    from llm_platform.alignment.preferences import load_pairs as load

    return load(cfg.data, split, cfg.train_limit if split == "train" else cfg.eval_limit)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from llm_platform.alignment.preferences import as_conversations
    from llm_platform.alignment.reward import RewardScorer
    from llm_platform.models.loading import DTYPES, load_tokenizer
    from llm_platform.training.outputs import MetricsLog, trainer_metrics_callback, write_summary

    cfg = RewardJobConfig.model_validate(loop_config["config"])
    folder = Path(loop_config["folder"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1, dtype=DTYPES[cfg.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    train, test = load_pairs(cfg, "train"), load_pairs(cfg, "test")
    before = RewardScorer.from_model(model, tokenizer).pair_accuracy(test) if rank == 0 else None

    args = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="llmp-reward-"), max_steps=cfg.optim.max_steps,
        per_device_train_batch_size=cfg.optim.batch_size // world, learning_rate=cfg.optim.learning_rate,
        logging_steps=cfg.optim.log_every, save_strategy="steps", save_steps=cfg.optim.save_every,
        max_length=cfg.max_length, report_to=[], use_cpu=not cfg.scaling.use_gpu, seed=cfg.optim.seed,
        bf16=cfg.dtype == "bfloat16", ddp_backend="nccl" if cfg.scaling.use_gpu else "gloo", disable_tqdm=True)
    checkpoint = ray.train.get_checkpoint()
    log = MetricsLog(folder, resume_step=0 if checkpoint else None) if rank == 0 else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=as_conversations(train), processing_class=tokenizer,
                            callbacks=[RayTrainReportCallback(), trainer_metrics_callback(log)])
    trainer = prepare_trainer(trainer)
    resume = str(Path(checkpoint.path) / RayTrainReportCallback.CHECKPOINT_NAME) if checkpoint else None
    trainer.train(resume_from_checkpoint=resume)
    if rank != 0:
        return
    trained = trainer.model
    scorer = RewardScorer.from_model(trained, tokenizer)
    offset = sum(scorer.score(list(train["prompt"]), list(train["chosen"])) +
                 scorer.score(list(train["prompt"]), list(train["rejected"]))) / (2 * len(train))
    scorer.offset = offset
    trained.config.reward_offset = offset
    trained.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    accuracy, margin = scorer.pair_accuracy(test)
    losses = [r["loss"] for r in log.rows() if "loss" in r]
    write_summary(folder, {"model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world,
                           "eval_accuracy": accuracy, "eval_accuracy_before": before[0], "reward_margin": margin,
                           "reward_offset": offset, "train_loss_first": losses[0], "train_loss": losses[-1],
                           "eval_examples": len(test), "output": str(folder / "model")})


def prepare(cfg: RewardJobConfig) -> RewardJobConfig:
    from llm_platform.models.loading import load_tokenizer
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.training.outputs import absolute

    ensure_tiny_model(cfg.model)
    load_tokenizer(cfg.model)
    if cfg.optim.batch_size % cfg.scaling.num_workers:
        raise PlatformError("optim.batch_size must be a multiple of scaling.num_workers")
    for split in ("train", "test"):
        load_pairs(cfg.model_copy(update={"data": absolute(cfg.data)}), split)
    return cfg.model_copy(update={"model": absolute(cfg.model), "data": absolute(cfg.data),
                                  "output_dir": absolute(cfg.output_dir, create=True)})


def main(cfg: RewardJobConfig) -> dict:
    from llm_platform.training.launch import fit, storage_for
    from llm_platform.training.outputs import local_dir, publish

    cfg = prepare(cfg)
    folder = local_dir(cfg.output_dir, cfg.run_name)
    fit(train_loop_per_worker, {"config": cfg.model_dump(), "folder": str(folder)}, cfg.scaling, cfg.run_name,
        storage_for(cfg.storage_path, folder))
    publish(folder, cfg.output_dir)
    return json.loads((folder / "summary.json").read_text())


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.reward_model", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_jobs/configs/local_reward.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.max_steps=50")
    args = parser.parse_args(argv)
    try:
        summary = main(load_config(RewardJobConfig, args.config, args.overrides))
    except PlatformError as exc:
        print(f"reward_model: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
