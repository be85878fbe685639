"""DPO on Ray Train: a LoRA adapter on the SFT model learns the preference pairs directly, with TRL's
DPOTrainer in each worker; the reference is the same model with the adapter off (no second copy).

Reported on held-out pairs: the policy's chosen-over-rejected log-probability margin before and
after, and the share of pairs with a positive implicit reward margin (``eval_accuracy``).
Outputs in ``output_dir``: metrics.jsonl, summary.json, adapter/.

    python -m train_jobs.dpo --config train_jobs/configs/local_dpo.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.dpo --config train_jobs/configs/gpu_dpo.yaml
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
from llm_platform.training.config import DType, LoraSettings, ScalingSettings
from train_jobs.reward_model import RewardOptim, load_pairs


class DPOJobConfig(FrozenConfig):
    """A DPO run (``python -m train_jobs.dpo --config FILE``)."""

    model: str
    """The SFT model the adapter is trained on (and, with the adapter off, the reference)."""
    dtype: DType = "float32"
    data: str = "synthetic:preferences"
    train_limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(200, ge=1)
    max_length: int = Field(256, ge=16)
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint towards the reference."""
    lora: LoraSettings = LoraSettings(r=8, alpha=16, dropout=0.0)
    output_dir: str = "artifacts/rlhf/dpo"
    storage_path: str | None = None
    run_name: str = "dpo"
    optim: RewardOptim = RewardOptim(learning_rate=5e-4)
    scaling: ScalingSettings = ScalingSettings()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    from peft import LoraConfig, TaskType
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from trl import DPOConfig, DPOTrainer

    from llm_platform.alignment.preferences import as_conversations, preference_margins
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.training.outputs import MetricsLog, trainer_metrics_callback, write_summary

    cfg = DPOJobConfig.model_validate(loop_config["config"])
    folder = Path(loop_config["folder"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, cfg.dtype).train()
    train, test = load_pairs(cfg, "train"), load_pairs(cfg, "test")
    before = preference_margins(model, tokenizer, test) if rank == 0 else None

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="llmp-dpo-"), max_steps=cfg.optim.max_steps, beta=cfg.beta,
        per_device_train_batch_size=cfg.optim.batch_size // world, learning_rate=cfg.optim.learning_rate,
        logging_steps=cfg.optim.log_every, save_strategy="steps", save_steps=cfg.optim.save_every,
        max_length=cfg.max_length, report_to=[], use_cpu=not cfg.scaling.use_gpu, seed=cfg.optim.seed,
        bf16=cfg.dtype == "bfloat16", ddp_backend="nccl" if cfg.scaling.use_gpu else "gloo", disable_tqdm=True)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    checkpoint = ray.train.get_checkpoint()
    log = MetricsLog(folder, resume_step=0 if checkpoint else None) if rank == 0 else None
    trainer = DPOTrainer(model=model, args=args, train_dataset=as_conversations(train), processing_class=tokenizer,
                         peft_config=lora, callbacks=[RayTrainReportCallback(), trainer_metrics_callback(log)])
    trainer = prepare_trainer(trainer)
    resume = str(Path(checkpoint.path) / RayTrainReportCallback.CHECKPOINT_NAME) if checkpoint else None
    trainer.train(resume_from_checkpoint=resume)
    if rank != 0:
        return
    policy = trainer.model
    after = preference_margins(policy, tokenizer, test)
    with policy.disable_adapter():
        reference = preference_margins(policy, tokenizer, test)
    policy.save_pretrained(folder / "adapter")
    losses = [r["loss"] for r in log.rows() if "loss" in r]
    write_summary(folder, {
        "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world, "beta": cfg.beta,
        "margin_before": float(before.mean()), "margin_after": float(after.mean()),
        "eval_accuracy": float(((after - reference) > 0).float().mean()),
        "train_loss_first": losses[0], "train_loss": losses[-1], "eval_examples": len(test),
        "output": str(folder / "adapter")})


def main(cfg: DPOJobConfig) -> dict:
    from llm_platform.models.loading import load_tokenizer
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.training.launch import fit, storage_for
    from llm_platform.training.outputs import absolute, local_dir, publish

    ensure_tiny_model(cfg.model)
    load_tokenizer(cfg.model)
    load_pairs(cfg, "test")
    cfg = cfg.model_copy(update={"model": absolute(cfg.model), "data": absolute(cfg.data),
                                 "output_dir": absolute(cfg.output_dir, create=True)})
    folder = local_dir(cfg.output_dir, cfg.run_name)
    fit(train_loop_per_worker, {"config": cfg.model_dump(), "folder": str(folder)}, cfg.scaling, cfg.run_name,
        storage_for(cfg.storage_path, folder))
    publish(folder, cfg.output_dir)
    return json.loads((folder / "summary.json").read_text())


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_jobs/configs/local_dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. beta=0.2")
    args = parser.parse_args(argv)
    try:
        summary = main(load_config(DPOJobConfig, args.config, args.overrides))
    except PlatformError as exc:
        print(f"dpo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
