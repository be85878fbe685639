"""The RLHF chain's input, built once per session: the chat SFT model (the cluster chain starts from it)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from llm_platform.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "train_jobs" / "configs"


@pytest.fixture(scope="session")
def sft_chat_model(ray_local, tiny_models, tmp_path_factory) -> Future:
    """The future of the chat SFT model's folder: its job starts at once and trains while the fixtures asked for
    after it start (the two-node cluster, the S3 server)."""
    from llm_platform.training.config import SFTConfig
    from llm_platform.training import sft_job as sft

    def train() -> Path:
        out = tmp_path_factory.mktemp("sft-chat")
        sft.main(load_config(SFTConfig, CONFIGS / "local_sft_chat.yaml",
                             [f"model={tiny_models['tiny-s']}", f"output_dir={out}", "optim.max_steps=100",
                              "optim.save_every=0"]))
        return out / "model"

    with ThreadPoolExecutor(1, thread_name_prefix="sft-chat") as pool:
        yield pool.submit(train)
