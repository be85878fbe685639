"""One dtype vocabulary: torch's names and the short ones, in configs and on the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_platform.config import load_config
from llm_platform.dtypes import normalize_dtype, short_dtype, torch_dtype
from llm_platform.engine import EngineConfig
from llm_platform.errors import ConfigError
from llm_platform.training.config import SFTConfig

QLORA = Path(__file__).resolve().parents[1] / "train_jobs" / "configs" / "local_qlora.yaml"


@pytest.mark.parametrize("names, canonical", [(("float32", "fp32", "FP32", "torch.float32"), "float32"),
                                              (("bfloat16", "bf16", "torch.bfloat16"), "bfloat16"),
                                              (("float16", "fp16", "half"), "float16")])
def test_both_spellings_normalise(names, canonical):
    for name in names:
        assert normalize_dtype(name) == canonical
    assert torch_dtype(names[-1]) == getattr(torch, canonical)
    assert normalize_dtype(getattr(torch, canonical)) == canonical


def test_unknown_and_out_of_place_dtypes_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        normalize_dtype("fp8")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):  # not a floating-point dtype
        normalize_dtype("int8")
    assert short_dtype("nf4") == "4bit" and short_dtype("bfloat16") == "bf16"


def test_configs_take_either_spelling():
    cfg = load_config(SFTConfig, QLORA, ["dtype=bf16", "quant.compute_dtype=fp16"])
    assert (cfg.dtype, cfg.quant.compute_dtype) == ("bfloat16", "float16")
    assert EngineConfig(model="m", dtype="fp32").dtype == "float32"
    with pytest.raises(ConfigError, match=r"dtype: unknown dtype 'fp8'"):
        load_config(SFTConfig, QLORA, ["dtype=fp8"])


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_platform.cli", "plan", "--params", "7e9", *args],
                          capture_output=True, text=True, timeout=120)


def test_plan_takes_torch_dtype_names():
    torch_names, short = plan("--dtype", "float32", "--method", "full"), plan("--dtype", "fp32", "--method", "full")
    assert torch_names.returncode == 0, torch_names.stderr
    assert torch_names.stdout == short.stdout
    rows = [line.split() for line in torch_names.stdout.splitlines() if line.startswith("full")]
    assert rows == [["full", "fp32", "7B", "28", "28", "56", "-", "-", "112", "104"]]
    assert [line.split()[1] for line in plan("--dtype", "bfloat16").stdout.splitlines()
            if line.split()[:1] in (["inference"], ["full"], ["lora"])] == ["bf16"] * 3
    bad = plan("--dtype", "fp8")
    assert bad.returncode == 2 and "argument --dtype: unknown dtype 'fp8'" in bad.stderr
