"""DPO on Ray Train: a LoRA adapter learns the preference pairs directly, without a reward model or RL.

Direct Preference Optimization raises the policy's log-probability of the chosen reply over the
rejected one, relative to a reference policy, with loss ``-log sigmoid(beta * (dc - dr))`` where
``d = log pi(reply) - log ref(reply)``. TRL's DPOTrainer runs in each Ray Train worker (DDP with
several workers); the policy is a LoRA on ``model`` and the reference is the same model with the
adapter off, so no second copy is held.

Reported on held-out pairs (summary.json): the policy's chosen-over-rejected log-probability margin
before and after training, the implicit reward margin ``beta * (dc - dr)`` against the reference,
and ``eval_accuracy``, the share of pairs where that margin is positive. Outputs in ``output_dir``:
metrics.jsonl, summary.json, adapter/ (PEFT LoRA, servable with ``POST /v1/adapters``).

Locally (starts a Ray cluster on this machine):
    python -m train_jobs.dpo --config train_jobs/configs/local_dpo.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.dpo --config train_jobs/configs/gpu_dpo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from llm_platform.alignment.preference_training import check_scaling
from llm_platform.alignment.preferences import PreferenceData
from llm_platform import console
from llm_platform.config import FrozenConfig, load_config
from llm_platform.errors import PlatformError
from llm_platform.training.config import DType, LoraSettings, OptimSettings, ScalingSettings, TrackingSettings


class DPOJobConfig(FrozenConfig):
    """A DPO run (``python -m train_jobs.dpo --config FILE``)."""

    model: str
    """The policy's base (usually the SFT model); with the adapter off it is also the reference."""
    dtype: DType = "float32"
    """Dtype of the weights (float32 on CPU; bfloat16 on GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for large models, more compute."""
    data: PreferenceData = PreferenceData()
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL constraint towards the reference (higher: stay closer)."""
    lora: LoraSettings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                   "down_proj"])
    output_dir: str = "artifacts/rlhf/dpo"
    """Where metrics.jsonl, summary.json and adapter/ go: a folder or an s3://, gs:// URI."""
    storage_path: str | None = None
    """Ray Train checkpoints and run state (folder or URI); defaults to OUTPUT_DIR/ray."""
    run_name: str = "dpo"
    """Name of the run under storage_path; a rerun with the same name resumes from its last checkpoint."""
    optim: OptimSettings = OptimSettings(learning_rate=1e-3, warmup_ratio=0.0, max_steps=40)
    scaling: ScalingSettings = ScalingSettings()
    tracking: TrackingSettings = TrackingSettings()

    @model_validator(mode="after")
    def _check(self) -> "DPOJobConfig":
        check_scaling(self.optim, self.scaling)
        return self

    def training_settings(self) -> dict:
        """What a checkpoint depends on (not where outputs go or how many workers)."""
        return self.model_dump(mode="json", include={"model", "dtype", "data", "beta", "lora", "optim"})


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: DPOTrainer on a LoRA policy; then rank 0 evaluates and saves."""
    import ray.train
    import ray.train.torch
    from peft import LoraConfig, TaskType
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from llm_platform.alignment.preference_training import (losses, settings_callback, trainer_arguments,
                                                            train_in_worker)
    from llm_platform.alignment.preferences import as_conversations, load_pairs, preference_margins
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.training.outputs import write_summary

    cfg = DPOJobConfig.model_validate(loop_config["config"])
    folder = Path(loop_config["folder"])
    context = ray.train.get_context()
    rank, world, device = context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()
    set_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, cfg.dtype, str(device))
    train, held_out = load_pairs(cfg.data, "train"), load_pairs(cfg.data, cfg.data.eval_split)
    before = preference_margins(model, tokenizer, held_out, cfg.data.max_length) if rank == 0 else None

    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules))
    with tempfile.TemporaryDirectory(prefix="llmp-dpo-") as scratch:
        args = DPOConfig(**trainer_arguments(cfg.optim, cfg.scaling, cfg.dtype, scratch, cfg.gradient_checkpointing),
                         beta=cfg.beta, max_length=cfg.data.max_length)
        trainer = DPOTrainer(model=model, args=args, train_dataset=as_conversations(train),
                             eval_dataset=as_conversations(held_out) if cfg.optim.eval_every else None,
                             processing_class=tokenizer, peft_config=lora,
                             callbacks=[settings_callback(cfg.training_settings()), RayTrainReportCallback()])
        log, train_seconds = train_in_worker(trainer, folder, rank == 0, cfg, "dpo")
    if rank != 0:
        return

    policy = trainer.model
    after = preference_margins(policy, tokenizer, held_out, cfg.data.max_length)
    with policy.disable_adapter():
        reference = preference_margins(policy, tokenizer, held_out, cfg.data.max_length)
    policy.save_pretrained(folder / "adapter")
    implicit = cfg.beta * (after - reference)  # DPO's implicit reward of chosen minus rejected
    first_loss, last_loss = losses(log)
    write_summary(folder, {
        "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": world, "beta": cfg.beta,
        "margin_before": float(before.mean()), "margin_after": float(after.mean()),
        "margin_reference": float(reference.mean()), "implicit_reward_margin": float(implicit.mean()),
        "eval_accuracy": float((implicit > 0).float().mean()), "eval_examples": len(held_out),
        "train_loss_first": first_loss, "train_loss": last_loss, "train_seconds": train_seconds,
        "output": str(folder / "adapter")})
    log.finish()


def main(cfg: DPOJobConfig) -> dict:
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
    parser = argparse.ArgumentParser(prog="python -m train_jobs.dpo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_jobs/configs/local_dpo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. beta=0.2")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the Ray workers' and vLLM's own output too (LLMP_LOG_LEVEL=INFO); by default the "
                             "console shows progress lines and the workers' output stays in Ray's session logs")
    args = parser.parse_args(argv)
    console.setup(verbose=args.verbose)
    try:
        summary = main(load_config(DPOJobConfig, args.config, args.overrides))
    except PlatformError as exc:
        print(f"dpo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
