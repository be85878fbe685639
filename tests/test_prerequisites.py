"""Errors that name a missing input say which command makes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_platform.errors import ModelNotFoundError, PlatformError
from llm_platform.models.loading import resolve_model
from llm_platform.prerequisites import LOCAL_OUTPUTS, how_to_make

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_jobs" / "configs"


def produced_by(config: Path) -> str:
    """The folder inside output_dir that a local job config's run leaves its weights in."""
    data = yaml.safe_load(config.read_text())
    model_out = data.get("method") == "full" or config.name == "local_reward.yaml"
    return f"{data['output_dir']}/{'model' if model_out else 'adapter'}"


def test_the_table_matches_the_local_configs():
    configs = sorted(CONFIGS.glob("local_*.yaml"))
    assert len(configs) == len(LOCAL_OUTPUTS)
    for config in configs:
        path = produced_by(config)
        assert path in LOCAL_OUTPUTS, f"{config.name} writes {path}, which prerequisites.LOCAL_OUTPUTS lacks"
        assert f"--config train_jobs/configs/{config.name}" in LOCAL_OUTPUTS[path][1]
    # the modules named exist
    for _, command in LOCAL_OUTPUTS.values():
        module = command.split()[2]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), command


def test_rlhf_on_a_fresh_clone_names_the_chat_sft_job(tmp_path):
    """The local RLHF config reads the chat SFT model: the error says to run that job, not to build tiny models."""
    run = subprocess.run([sys.executable, "-m", "train_jobs.rlhf", "--config", str(CONFIGS / "local_rlhf.yaml")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2, run.stderr[-2000:]
    assert ("model path artifacts/rlhf/sft/model does not exist: it is the chat SFT model"
            in run.stderr), run.stderr[-2000:]
    assert "`python -m train_jobs.sft --config train_jobs/configs/local_sft_chat.yaml`" in run.stderr
    assert "build-tiny" not in run.stderr


def test_rlhf_names_the_reward_job_when_only_the_reward_model_is_missing(tiny_models, tmp_path, monkeypatch):
    from llm_platform.alignment.config import RLHFConfig
    from llm_platform.config import load_config
    from llm_platform.alignment import rlhf_job as rlhf

    monkeypatch.chdir(tmp_path)
    cfg = load_config(RLHFConfig, CONFIGS / "local_rlhf.yaml", [f"policy_model={tiny_models['tiny-s']}"])
    with pytest.raises(PlatformError) as err:
        rlhf.prepare(cfg)
    assert "reward_model artifacts/rlhf/reward/model does not exist: it is the reward model" in str(err.value)
    assert "python -m train_jobs.reward_model --config train_jobs/configs/local_reward.yaml " \
           "model=artifacts/rlhf/sft/model" in str(err.value)


def test_missing_model_messages(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"build the tiny models with `llmp models build-tiny --out "):
        resolve_model(str(tmp_path / "models" / "tiny-m"))
    with pytest.raises(ModelNotFoundError, match="it is the LoRA adapter: make it with `python -m train_jobs.sft "
                                                 "--config train_jobs/configs/local_lora.yaml`"):
        resolve_model(str(tmp_path / "artifacts" / "sft" / "lora" / "adapter"))
    with pytest.raises(ModelNotFoundError, match="does not exist: give a checkpoint folder or a hub id"):
        resolve_model(str(tmp_path / "elsewhere"))
    assert how_to_make("some/other/place") is None
