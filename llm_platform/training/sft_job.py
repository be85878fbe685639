"""Supervised fine-tuning on Ray Train: full, LoRA, QLoRA (4-bit NF4 base) or prompt tuning.

Data in TRL's formats (``text``, ``prompt``/``completion``, ``messages``; ``data.columns`` maps other
names) or a built-in task; N workers train with FSDP sharding (full, LoRA) or DDP (QLoRA, prompt
tuning); checkpoints go to the run's storage and a failed worker restarts the group from the last
one. Outputs in ``output_dir``: config.yaml, metrics.jsonl, summary.json, adapter/ (PEFT) or model/,
and the trackers' files (``tracking.report_to``).

The job (``JOB``), run by the skeleton in ``llm_platform.training.job``. Locally (starts a Ray cluster on
this machine):
    python -m train_jobs.sft --config train_jobs/configs/local_lora.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.sft --config train_jobs/configs/gpu_qlora.yaml
"""

from __future__ import annotations

from pathlib import Path

from llm_platform.errors import PlatformError
from llm_platform.training.config import SFTConfig, training_settings
from llm_platform.training.job import Job, run


def train(cfg: SFTConfig, folder: Path | None) -> None:
    """What each Ray Train worker runs."""
    from llm_platform.training.distributed import ray_train_context
    from llm_platform.training.loop import train_sft

    train_sft(cfg, ray_train_context(), folder)


def prepare(cfg: SFTConfig) -> SFTConfig:
    """Absolute local paths (workers run elsewhere), the tiny models built if a config names them."""
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.training.outputs import absolute

    ensure_tiny_model(cfg.model)
    data = cfg.data.model_copy(update={"source": absolute(cfg.data.source)})
    return cfg.model_copy(update={"model": absolute(cfg.model), "output_dir": absolute(cfg.output_dir, create=True),
                                  "data": data})


def check_inputs(cfg: SFTConfig) -> None:
    """Fail in seconds, before any worker starts, on a wrong model path or dataset: every row is checked, and
    the first rows of each split are tokenized (a chat template that refuses them fails here)."""
    from llm_platform.models.loading import load_model_config, load_tokenizer
    from llm_platform.training.data import load_split, task_labels, tokenize_all
    from llm_platform.training.methods import peft_config

    load_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)  # code it ships is allowed
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    for split in ("train", "validation", "test") if task_labels(cfg.data) else ("train", "validation"):
        examples, where, rows = load_split(cfg.data, split)
        if not examples:
            raise PlatformError(f"data.source {cfg.data.source}: the {split} split is empty")
        tokenize_all(examples[:8], tokenizer, cfg.data.max_length, cfg.data.loss_on, where, rows)
    if cfg.is_adapter:
        peft_config(cfg)


def adapter_kind(cfg: SFTConfig) -> str:
    return "soft_prompt" if cfg.method == "prompt_tuning" else "lora"


JOB = Job(name="sft", config=SFTConfig, train=train, example_config="train_jobs/configs/local_lora.yaml",
          prepare=prepare, check_inputs=check_inputs, settings=training_settings, adapter_kind=adapter_kind)


def main(cfg: SFTConfig) -> dict:
    return run(JOB, cfg)
