"""The ``llmp`` command as users run it: a real subprocess of the installed entry point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LLMP = str(Path(sys.executable).with_name("llmp"))


def llmp(*args, cwd=None, timeout=600):
    return subprocess.run([LLMP, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_build_tiny_writes_three_loadable_sizes(tmp_path: Path, tiny_models):
    run = llmp("models", "build-tiny", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("tiny-")]
    assert [line.split(":")[0] for line in lines] == ["tiny-s", "tiny-m", "tiny-l"]
    counts = [int(line.split("(")[1].split()[0].replace(",", "")) for line in lines]
    assert counts == sorted(counts) and len(set(counts)) == 3
    # Same bytes as the session's build: the CLI and the library build the same thing.
    for name in ("tiny-s", "tiny-m", "tiny-l"):
        assert (tmp_path / name / "model.safetensors").read_bytes() == \
            (tiny_models[name] / "model.safetensors").read_bytes()


def test_data_write(tmp_path: Path):
    run = llmp("data", "write", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "nli_axb" / "test.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]) == {"idx", "sentence1", "sentence2", "label"}


def test_generate_with_a_lora_changes_the_output(tiny_models, adapters):
    base = llmp("generate", "--model", tiny_models["tiny-s"], "--engine", "transformers", "--prompt", "Hello",
                "--max-tokens", "12")
    tuned = llmp("generate", "--model", tiny_models["tiny-s"], "--engine", "transformers", "--prompt", "Hello",
                 "--max-tokens", "12", "--adapter", f"lora:{adapters['tiny-s']['lora']}")
    assert base.returncode == tuned.returncode == 0, base.stderr + tuned.stderr
    assert base.stdout.strip() and base.stdout != tuned.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/nowhere/tiny-s"], "model path /nowhere/tiny-s does not exist"),
    (["--temperature", "3"], "temperature: must be between 0 and 2"),
    (["--adapter", "lora:{mlora}"], "the base needs"),
    (["--adapter", "soft_prompt:{lora}"], "is a lora adapter, not soft_prompt"),
])
def test_bad_input_gives_one_clear_line_not_a_traceback(args, message, tiny_models, adapters):
    args = [a.format(mlora=adapters["tiny-m"]["lora"], lora=adapters["tiny-s"]["lora"]) for a in args]
    if "--model" not in args:
        args = ["--model", tiny_models["tiny-s"], *args]
    run = llmp("generate", "--engine", "transformers", "--prompt", "Hi", *args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_demo_config_typo_is_named():
    run = llmp("demo", "max_token=3")
    assert run.returncode == 2 and "max_token: unknown key (did you mean 'max_tokens'?)" in run.stderr


@pytest.mark.slow
def test_demo_prints_the_size_latency_table(tmp_path: Path, tiny_models):
    models = tmp_path / "models"
    shutil.copytree(tiny_models["tiny-s"].parent, models)
    run = llmp("demo", f"models_dir={models}", f"out={tmp_path / 'demo'}", "engines=[transformers]", "max_tokens=8",
               "rlhf=false")
    assert run.returncode == 0, run.stderr
    assert "ms_per_token" in run.stdout
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [row["model"] for row in summary["rows"]] == ["tiny-s", "tiny-m", "tiny-l"]
    assert all(row["greedy_agrees"] for row in summary["rows"])
