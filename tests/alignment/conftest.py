"""The RLHF chain's inputs, built once per session: the chat SFT model, then the reward model on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_platform.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "train_jobs" / "configs"


@pytest.fixture(scope="session")
def sft_chat_model(ray_local, tiny_models, tmp_path_factory) -> Path:
    from llm_platform.training.config import SFTConfig
    from llm_platform.training import sft_job as sft

    out = tmp_path_factory.mktemp("sft-chat")
    sft.main(load_config(SFTConfig, CONFIGS / "local_sft_chat.yaml",
                         [f"model={tiny_models['tiny-s']}", f"output_dir={out}", "optim.max_steps=100",
                          "optim.save_every=0"]))
    return out / "model"


@pytest.fixture(scope="session")
def reward_run(ray_local, sft_chat_model, tmp_path_factory) -> tuple[Path, dict]:
    from llm_platform.alignment import reward_job as reward_model

    out = tmp_path_factory.mktemp("reward")
    summary = reward_model.main(load_config(reward_model.RewardJobConfig, CONFIGS / "local_reward.yaml",
                                            [f"model={sft_chat_model}", f"output_dir={out}"]))
    return out, summary


@pytest.fixture(scope="session")
def rlhf_inputs(sft_chat_model, reward_run) -> tuple[Path, Path]:
    return sft_chat_model, reward_run[0] / "model"
