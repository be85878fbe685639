"""Supervised fine-tuning on Ray Train: full, LoRA, QLoRA (4-bit NF4 base) or prompt tuning.

Data in TRL's formats (``text``, ``prompt``/``completion``, ``messages``; ``data.columns`` maps other
names) or a built-in task; N workers train with FSDP sharding (full, LoRA) or DDP (QLoRA, prompt
tuning); checkpoints go to the run's storage and a failed worker restarts the group from the last
one. Outputs in ``output_dir``: config.yaml, metrics.jsonl, summary.json, adapter/ (PEFT) or model/,
and the trackers' files (``tracking.report_to``).

Locally (starts a Ray cluster on this machine):
    python -m train_jobs.sft --config train_jobs/configs/local_lora.yaml [key=value ...]
On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m train_jobs.sft --config train_jobs/configs/gpu_qlora.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from llm_platform import console
from llm_platform.config import load_config
from llm_platform.errors import PlatformError
from llm_platform.training.config import SFTConfig, training_settings
from llm_platform.training.outputs import local_dir, publish, register_adapter


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs."""
    from llm_platform.training.distributed import ray_train_context
    from llm_platform.training.loop import train_sft

    cfg = SFTConfig.model_validate(loop_config["config"])
    train_sft(cfg, ray_train_context(), local_dir(cfg.output_dir, cfg.run_name))


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
    from llm_platform.models.loading import load_tokenizer
    from llm_platform.training.data import load_split, task_labels, tokenize_all
    from llm_platform.training.methods import peft_config

    tokenizer = load_tokenizer(cfg.model)
    for split in ("train", "validation", "test") if task_labels(cfg.data) else ("train", "validation"):
        examples, where, rows = load_split(cfg.data, split)
        if not examples:
            raise PlatformError(f"data.source {cfg.data.source}: the {split} split is empty")
        tokenize_all(examples[:8], tokenizer, cfg.data.max_length, cfg.data.loss_on, where, rows)
    if cfg.is_adapter:
        peft_config(cfg)


def check_resumable(cfg: SFTConfig, storage: str) -> None:
    """A run name already in storage resumes (Ray Train restores its last checkpoint), but only with the
    same training settings: resuming a different run from it would silently mix the two."""
    from llm_platform.training.checkpoint import latest_progress

    progress = latest_progress(storage, cfg.run_name)
    if progress is None:
        return
    changed = sorted(k for k, v in training_settings(cfg).items() if progress["settings"].get(k) != v)
    if changed:
        raise PlatformError(f"run {cfg.run_name!r} in {storage} has a checkpoint from other settings "
                            f"(changed: {', '.join(changed)}); choose another run_name to start afresh, or "
                            f"delete {storage}/{cfg.run_name}")
    print(f"resuming run {cfg.run_name!r} from its checkpoint at step {progress['step']}", flush=True)


def main(cfg: SFTConfig) -> dict:
    from llm_platform.training.launch import fit, storage_for

    from llm_platform.training.tracking import check_tracking, save_config

    cfg = prepare(cfg)
    check_inputs(cfg)
    check_tracking(cfg.tracking)
    folder = local_dir(cfg.output_dir, cfg.run_name)
    save_config(folder, cfg.model_dump(mode="json"))
    storage = storage_for(cfg.storage_path, folder)
    check_resumable(cfg, storage)
    fit(train_loop_per_worker, {"config": cfg.model_dump()}, cfg.scaling, cfg.run_name,
        storage)
    summary = json.loads((folder / "summary.json").read_text())
    if cfg.register_url:
        kind = "soft_prompt" if cfg.method == "prompt_tuning" else "lora"
        card = register_adapter(cfg.register_url, cfg.register_name or cfg.run_name, cfg.register_base, kind,
                                summary["output"])
        summary["registered_as"] = card.get("id")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    publish(folder, cfg.output_dir)
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_jobs.sft", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. train_jobs/configs/local_lora.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. optim.max_steps=50")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show the Ray workers' and vLLM's own output too (LLMP_LOG_LEVEL=INFO); by default the "
                             "console shows progress lines and the workers' output stays in Ray's session logs")
    args = parser.parse_args(argv)
    console.setup(verbose=args.verbose)
    try:
        summary = main(load_config(SFTConfig, args.config, args.overrides))
    except PlatformError as exc:
        print(f"sft: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
