"""TRL's preference trainers (RewardTrainer, DPOTrainer) inside Ray Train workers.

The Hugging Face Trainer (and so TRL) cannot FSDP-shard on CPU: accelerate enables FSDP only for GPU
devices. These jobs therefore run DDP, every worker a full replica: Ray Train starts the process
group, accelerate joins it (MULTI_CPU on gloo, MULTI_GPU on NCCL). Ray Train's
``RayTrainReportCallback`` turns each Trainer checkpoint into a Ray Train checkpoint, so a worker
group restarted after a failure resumes from the last one; rank 0 writes ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from llm_platform import console
from llm_platform.errors import PlatformError
from llm_platform.training.config import OptimSettings, ScalingSettings
from llm_platform.training.outputs import MetricsLog



def trainer_arguments(optim: OptimSettings, scaling: ScalingSettings, dtype: str, output_dir: str,
                      gradient_checkpointing: bool) -> dict[str, Any]:
    """``TrainingArguments`` shared by the reward and DPO jobs (TRL's config classes take them all).
    Accumulation and activation checkpointing are the Trainer's own (``gradient_accumulation_steps``,
    ``gradient_checkpointing``, non-reentrant): ``optim.batch_size`` stays the effective global batch."""
    # The global batch is split evenly across workers, and each worker's share into micro-batches.
    micro = optim.batch_size // scaling.num_workers // optim.gradient_accumulation_steps
    return {
        "output_dir": output_dir, "max_steps": optim.max_steps, "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": optim.gradient_accumulation_steps,
        "per_device_eval_batch_size": micro, "learning_rate": optim.learning_rate,
        "weight_decay": optim.weight_decay, "warmup_steps": optim.warmup_ratio, "lr_scheduler_type": "linear",
        "max_grad_norm": optim.max_grad_norm, "seed": optim.seed, "logging_steps": optim.log_every,
        "save_strategy": "steps", "save_steps": optim.save_every or optim.max_steps,
        "eval_strategy": "steps" if optim.eval_every else "no", "eval_steps": optim.eval_every or None,
        "gradient_checkpointing": gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if gradient_checkpointing else None,
        "bf16": dtype == "bfloat16", "fp16": dtype == "float16",
        "use_cpu": not scaling.use_gpu, "ddp_backend": "nccl" if scaling.use_gpu else "gloo",
        "ddp_find_unused_parameters": False,
        "report_to": [], "disable_tqdm": True}


def settings_callback(settings: dict):
    """Stores the run's training settings in each Trainer checkpoint (before Ray Train copies it), so a
    rerun under the same name can tell whether the checkpoint it would resume from is from the same run."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from llm_platform.training.checkpoint import SETTINGS  # the run's training settings, in each Trainer checkpoint

    class SettingsCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            last = get_last_checkpoint(args.output_dir)
            if last and state.is_world_process_zero:
                (Path(last) / SETTINGS).write_text(json.dumps(settings, sort_keys=True))

    return SettingsCallback()


def metrics_callback(log: MetricsLog | None):
    """Every logged row to Ray Train (all ranks) and, on rank 0, to metrics.jsonl with a progress line."""
    import ray.train
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            row = {"step": state.global_step, **{k: float(v) for k, v in (logs or {}).items()
                                                 if isinstance(v, (int, float)) and not k.startswith("train_")}}
            if "loss" not in row and "eval_loss" not in row:  # the end-of-training summary
                return
            ray.train.report(row)
            if log is None:
                return
            log.write(row)
            shown = [k for k in ("loss", "eval_loss", "accuracy", "eval_accuracy", "margin", "rewards/margins",
                                 "eval_rewards/margins") if k in row]
            console.progress(f"step {state.global_step:>5}/{state.max_steps} | " +
                             " | ".join(f"{k} {row[k]:.4f}" for k in shown))

    return MetricsCallback()


def train_in_worker(trainer, folder: Path, is_main: bool, cfg=None,
                    job: str = "train") -> tuple[MetricsLog | None, float]:
    """Train, resuming from the run's last Ray Train checkpoint if there is one; rank 0 logs to
    ``folder/metrics.jsonl`` (after a restart, the rows up to the resumed step are kept). Returns the
    log (None on other ranks) and the training seconds."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our callback prints one line per logged step
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as restored:  # downloaded if remote
        resume = Path(restored) / RayTrainReportCallback.CHECKPOINT_NAME if restored else None
        step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else None
        if not is_main:
            log = None
        elif cfg is not None:  # metrics.jsonl and the configured trackers (config.tracking)
            from llm_platform.training.tracking import tracker

            log = tracker(cfg, folder, job, resume_step=step)
        else:
            log = MetricsLog(folder, resume_step=step)
        if resume:
            console.progress(f"resuming from the checkpoint at step {step}")
            if log is not None:
                log.write({"step": step, "event": "resumed"})
        trainer.add_callback(metrics_callback(log))
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return log, time.perf_counter() - start


def losses(log: MetricsLog) -> tuple[float, float]:
    """First and last logged training loss."""
    values = [row["loss"] for row in log.rows() if "loss" in row]
    return values[0], values[-1]


def check_chat_template(tokenizer, model: str) -> None:
    """Pairs are rendered as chat turns: a tokenizer without a chat template cannot render them."""
    if not getattr(tokenizer, "chat_template", None):
        raise PlatformError(f"model {model}: its tokenizer has no chat template; preference pairs are rendered as "
                            f"chat turns (use an instruct/chat model, or the tiny models, which have one)")


def prepare(cfg):
    """A reward or DPO job config with absolute local paths (workers run elsewhere), the tiny models
    built if the config names them."""
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.training.outputs import absolute

    ensure_tiny_model(cfg.model)
    data = cfg.data.model_copy(update={"source": absolute(cfg.data.source)})
    return cfg.model_copy(update={"model": absolute(cfg.model), "output_dir": absolute(cfg.output_dir, create=True),
                                  "data": data})


def check_inputs(cfg) -> None:
    """Fail in seconds, before any worker starts, on a wrong model path or dataset."""
    from llm_platform.alignment.preferences import load_pairs
    from llm_platform.models.loading import load_model_config, load_tokenizer

    load_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)  # code it ships is allowed
    check_chat_template(load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code), cfg.model)
    for split in ("train", cfg.data.eval_split):
        if not len(load_pairs(cfg.data, split)):
            raise PlatformError(f"data.source {cfg.data.source}: the {split} split is empty")
