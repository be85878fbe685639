"""`llmp eval ...` and `llmp plan` as users run them: the installed entry point, in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm_platform.config import load_config
from llm_platform.evaluation import COMMANDS, generation, latency, local_config, prompting

LLMP = str(Path(sys.executable).with_name("llmp"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def llmp(*args, cwd=None):
    return subprocess.run([LLMP, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_local_configs_are_valid():
    configs = {name: load_config(module.Config, local_config(name))
               for name, module in zip(COMMANDS, (latency, prompting, generation))}
    assert list(configs["latency"].models) == ["tiny-s", "tiny-m", "tiny-l"]
    assert configs["latency"].sampling.temperature == 0.8 and configs["latency"].engine.kind == "vllm"
    assert [m.name for m in configs["prompting"].models] == ["tiny-s", "tiny-m", "tiny-l"]
    assert set(configs["generation"].variants) == {"lora", "full"}


def test_plan_prints_the_course_figures(tmp_path):
    run = llmp("plan", "--params", "7e9", "--dtype", "fp32", "--json", tmp_path / "plan.json",
               "--plot", tmp_path / "plan.png")
    assert run.returncode == 0, run.stderr
    lines = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.split()[1:2] == ["fp32"]}
    assert lines["inference"][3] == "28" and lines["full"][-2] == "112"
    rows = {r["method"]: r for r in json.loads((tmp_path / "plan.json").read_text())["rows"]}
    assert rows["full"]["total"] == 112e9 and rows["inference"]["weights"] == 28e9
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("args, message", [
    (["--params", "7e9", "--method", "full", "--dtype", "int8"], "full runs on fp32, fp16, bf16"),
    (["--params", "7e9", "--dtype", "fp8"], "argument --dtype: unknown dtype 'fp8'"),
    (["--method", "lora"], "give --params (e.g. 7e9) or --model"),
])
def test_plan_refuses_bad_input_in_one_line(args, message):
    run = llmp("plan", *args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_eval_latency_writes_table_json_and_plot(tiny_models, tmp_path):
    config = tmp_path / "latency.yaml"
    config.write_text(yaml.safe_dump({"models": {n: str(tiny_models[n]) for n in ("tiny-s", "tiny-l")},
                                      "engine": {"kind": "transformers", "max_model_len": 512},
                                      "sampling": {"max_tokens": 8}}))
    run = llmp("eval", "latency", "--config", config, "sampling.seed=3", "--json", tmp_path / "l.json",
               "--plot", tmp_path / "l.png")
    assert run.returncode == 0, run.stderr
    assert "ms_per_token" in run.stdout and "latency: 100%" in run.stderr
    summary = json.loads((tmp_path / "l.json").read_text())
    assert {(r["model"], r["prompt"]) for r in summary["rows"]} == {
        (m, p) for m in ("tiny-s", "tiny-l")
        for p in ("simple_qa", "multi_step_reasoning", "real_time_interaction", "average")}
    assert summary["sampling"]["seed"] == 3
    assert (tmp_path / "l.png").read_bytes().startswith(PNG_SIGNATURE)


def test_eval_errors_name_the_problem(tiny_models, tmp_path):
    run = llmp("eval", "prompting", "styles=[chain_of_thought]", cwd=tmp_path)
    assert run.returncode == 2 and "styles.0: Input should be 'zero_shot'" in run.stderr
    config = tmp_path / "generation.yaml"
    config.write_text(yaml.safe_dump({"base": str(tiny_models["tiny-s"]), "variants": {"lora": "/nowhere/lora"}}))
    run = llmp("eval", "generation", "--config", config)
    assert run.returncode == 2 and "variant 'lora': /nowhere/lora does not exist" in run.stderr
    assert "Traceback" not in run.stderr
