"""Which command makes a missing input: errors that name a missing model say how to make it.

The local configs chain into each other (the RLHF chain: chat SFT -> reward model -> PPO), so a
path one of them reads is another one's output. ``LOCAL_OUTPUTS`` is that table, kept equal to the
configs' ``output_dir`` by tests/test_prerequisites.py.
"""

from __future__ import annotations

from pathlib import Path

# Path a local config writes (relative to the project root) -> (what it is, the command that makes it).
LOCAL_OUTPUTS: dict[str, tuple[str, str]] = {
    "artifacts/rlhf/sft/model": (
        "the chat SFT model (step 1 of the RLHF chain)",
        "python -m train_jobs.sft --config train_jobs/configs/local_sft_chat.yaml"),
    "artifacts/rlhf/reward/model": (
        "the reward model (step 2 of the RLHF chain)",
        "python -m train_jobs.reward_model --config train_jobs/configs/local_reward.yaml "
        "model=artifacts/rlhf/sft/model"),
    "artifacts/rlhf/ppo/adapter": (
        "the PPO policy adapter (step 3 of the RLHF chain)",
        "python -m train_jobs.rlhf --config train_jobs/configs/local_rlhf.yaml"),
    "artifacts/rlhf/dpo/adapter": (
        "the DPO adapter", "python -m train_jobs.dpo --config train_jobs/configs/local_dpo.yaml"),
    "artifacts/sft/lora/adapter": (
        "the LoRA adapter", "python -m train_jobs.sft --config train_jobs/configs/local_lora.yaml"),
    "artifacts/sft/qlora/adapter": (
        "the QLoRA adapter", "python -m train_jobs.sft --config train_jobs/configs/local_qlora.yaml"),
    "artifacts/sft/prompt_tuning/adapter": (
        "the soft prompt", "python -m train_jobs.sft --config train_jobs/configs/local_prompt_tuning.yaml"),
    "artifacts/sft/full/model": (
        "the fully fine-tuned model", "python -m train_jobs.sft --config train_jobs/configs/local_full.yaml"),
}
TINY = ("tiny-s", "tiny-m", "tiny-l")


def how_to_make(path: str | Path) -> str | None:
    """A sentence saying which command makes ``path``, if it is a local config's output or a tiny model."""
    path = Path(path).expanduser()
    if path.name in TINY:
        return f"build the tiny models with `llmp models build-tiny --out {path.parent}`"
    parts = path.resolve().parts if not path.is_absolute() else path.parts
    for produced, (what, command) in LOCAL_OUTPUTS.items():
        key = Path(produced).parts
        if parts[-len(key):] == key:
            return f"it is {what}: make it with `{command}` (from the project root)"
    return None


def missing(kind: str, path: str | Path, otherwise: str) -> str:
    """The message for a missing ``kind`` (e.g. "model path") at ``path``."""
    return f"{kind} {path} does not exist: {how_to_make(path) or otherwise}"
