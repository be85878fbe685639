"""Bring your own data: SFT on a user's JSONL in each of TRL's formats learns it, bad files fail naming the row,
and multi-turn conversations carry loss on the assistant turns only."""

from __future__ import annotations

import json
import os
import random
from functools import partial
from pathlib import Path

import pytest
import torch

from llm_platform.errors import DataError
from llm_platform.training.config import DataSettings
from tests.training.conftest import run_sft, two_at_a_time

# Each person has one favourite food: facts a tiny model can learn in ~100 steps (the words are in the tiny
# tokenizer's vocabulary, so each is a token or two).
FACTS = {"Anna": "pizza", "Ben": "soup", "Chloe": "sushi", "David": "salad", "Emma": "noodles", "Hugo": "burgers"}
QUESTIONS = ["What does {name} like to eat?", "Which food does {name} like?", "What is the favourite food of {name}?"]
SYSTEM = "You answer questions about food."


def _rows(fmt: str, n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, other = rng.sample(sorted(FACTS), 2)
        question = rng.choice(QUESTIONS).format(name=name)
        if fmt == "text":
            rows.append({"text": f"{name} likes {FACTS[name]}. {other} likes {FACTS[other]}."})
        elif fmt == "prompt_completion":
            rows.append({"question": question + "\nAnswer:", "answer": f" {FACTS[name]}"})
        elif fmt == "conversational":
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "completion": [{"role": "assistant", "content": f"{name} likes {FACTS[name]}."}]})
        else:
            rows.append({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"{name} likes {FACTS[name]}."},
                {"role": "user", "content": rng.choice(QUESTIONS).format(name=other)},
                {"role": "assistant", "content": f"{other} likes {FACTS[other]}."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def greedy(model_dir: Path, prompt_ids: list[int], tokens: int = 8) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


CASES = {
    # format: (extra overrides, the prompt whose greedy completion must hold the fact)
    "text": ([], lambda tok: tok("Emma likes").input_ids),
    "prompt_completion": (["data.columns={prompt: question, completion: answer}"],
                          lambda tok: tok("Which food does Emma like?\nAnswer:").input_ids),
    "conversational": ([], lambda tok: tok.apply_chat_template(
        [{"role": "user", "content": "Which food does Emma like?"}], add_generation_prompt=True)["input_ids"]),
    "messages": ([], lambda tok: tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does Ben like to eat?"},
         {"role": "assistant", "content": "Ben likes soup."}, {"role": "user", "content": "Which food does Emma like?"}],
        add_generation_prompt=True)["input_ids"]),
}


@pytest.fixture(scope="module")
def learnt(ray_local, tiny_models, tmp_path_factory):
    """``learnt[fmt]``: the future of SFT on a user JSONL in that format, all four started with the first test
    that asks, two at a time."""
    def learn(fmt: str, root: Path) -> dict:
        data = write_jsonl(root / f"{fmt}.jsonl", _rows(fmt))
        overrides, _ = CASES[fmt]
        return run_sft("local_sft_chat.yaml", tiny_models["tiny-s"], root / "out", f"data.source={data}",
                       f"run_name=sft-{fmt}", "data.task=null", "optim.max_steps=60", "optim.batch_size=8",
                       "optim.save_every=0", "optim.learning_rate=3e-3", *overrides)

    roots = {fmt: tmp_path_factory.mktemp(fmt) for fmt in sorted(CASES)}
    with two_at_a_time({fmt: partial(learn, fmt, root) for fmt, root in roots.items()}) as futures:
        yield {fmt: (roots[fmt] / "out", future) for fmt, future in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(CASES))
def test_sft_learns_a_user_jsonl_in_each_format(fmt, learnt):
    from transformers import AutoTokenizer

    out, future = learnt[fmt]
    summary = future.result()
    print(f"{fmt}: eval_loss {summary['eval_loss_before']:.3f} -> {summary['eval_loss']:.3f}")
    assert summary["eval_loss"] < 0.5 * summary["eval_loss_before"]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    answer = greedy(out / "model", list(CASES[fmt][1](tokenizer)))
    assert "noodles" in answer, answer


def test_malformed_files_fail_naming_file_row_and_column(tiny_models, tmp_path):
    good = _rows("conversational", n=30)
    cases = {
        "missing.jsonl": ([*good[:4], {"prompt": good[4]["prompt"]}, *good[5:]], r"missing\.jsonl, row 5: column 'completion' is missing"),
        "mixed.jsonl": ([*good[:6], {**good[6], "completion": "plain text"}, *good[7:]],
                        r"mixed\.jsonl, row 7: prompt is a list of messages but completion is str"),
        "role.jsonl": ([*good[:2], {**good[2], "prompt": [{"content": "no role"}]}, *good[3:]],
                       r"role\.jsonl, row 3: prompt\[0\] must be a \{role, content\} message"),
        "no_assistant.jsonl": ([{"messages": [{"role": "user", "content": "hi"}]}] * 30,
                               r"no_assistant\.jsonl, row 1: messages has no assistant turn"),
        "columns.jsonl": ([{"question": "q", "reply": "a"}] * 30, r"columns\.jsonl: cannot tell the dataset format"),
    }
    for name, (rows, message) in cases.items():
        path = write_jsonl(tmp_path / name, rows)
        with pytest.raises(DataError, match=message):
            run_sft("local_sft_chat.yaml", tiny_models["tiny-s"], tmp_path / "out", f"data.source={path}", "data.task=null")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in good[:3]) + '{"prompt": "unterminated\n')
    with pytest.raises(DataError, match=r"broken\.jsonl, line 4: not valid JSON"):
        run_sft("local_sft_chat.yaml", tiny_models["tiny-s"], tmp_path / "out", f"data.source={broken}", "data.task=null")
    with pytest.raises(DataError, match=r"maps completion -> 'answer', but it has no such column"):
        run_sft("local_sft_chat.yaml", tiny_models["tiny-s"], tmp_path / "out", f"data.source={tmp_path / 'columns.jsonl'}",
                "data.task=null", "data.columns={prompt: question, completion: answer}")


# The tiny models' template with Hugging Face's {% generation %} markers around each assistant reply and its
# end-of-turn tokens: transformers then computes the assistant mask itself (return_assistant_tokens_mask).
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def expected_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """From the rendered text: 1 for a token whose characters lie inside an assistant reply or the end-of-turn
    text right after it (EOS and newline), 0 elsewhere (system/user turns, role headers, BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for message in messages:
        turn = f"<|{message['role']}|>\n{message['content']}{tokenizer.eos_token}\n"
        start = text.index(turn, cursor)
        if message["role"] == "assistant":
            spans.append((start + len("<|assistant|>\n"), start + len(turn)))
        cursor = start + len(turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= lo and hi <= b for a, b in spans)) for lo, hi in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def test_multi_turn_loss_is_on_assistant_turns_only(tiny_models):
    from transformers import AutoTokenizer

    from llm_platform.training.data import tokenize_all
    from llm_platform.training.evaluate import IGNORE, collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-s"])
    conversations = [row["messages"] for row in _rows("messages", n=5)]
    conversations.append([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"}])  # ends on a user turn: its tokens carry no loss
    examples = tokenize_all([{"messages": m} for m in conversations], tokenizer, 512, "completion", "test")
    marked = AutoTokenizer.from_pretrained(tiny_models["tiny-s"])
    marked.chat_template = MARKED_TEMPLATE  # the {% generation %} path (transformers computes the mask)
    via_markers = tokenize_all([{"messages": m} for m in conversations], marked, 512, "completion", "test")
    labels = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))["labels"]
    for row, (messages, example) in enumerate(zip(conversations, examples)):
        ids, mask = expected_mask(tokenizer, messages)
        assert example["input_ids"] == ids
        assert example["completion_mask"] == mask, [(tokenizer.decode([i]), m, e) for i, m, e in
                                                    zip(ids, mask, example["completion_mask"])]
        assert via_markers[row] == example
        trained = [t for t, label in zip(ids, labels[row].tolist()) if label != IGNORE]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode(trained) == "".join(r + tokenizer.eos_token + "\n" for r in replies)
        assert SYSTEM not in tokenizer.decode(trained) and "<|user|>" not in tokenizer.decode(trained)
    everything = tokenize_all([{"messages": conversations[0]}], tokenizer, 512, "all", "test")[0]
    assert everything["input_ids"] == examples[0]["input_ids"] and set(everything["completion_mask"]) == {1}


def test_formats_and_column_mapping_resolve(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from llm_platform.training.data import load_split, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-s"])
    path = write_jsonl(tmp_path / "qa.jsonl", _rows("prompt_completion", n=50))
    data = DataSettings(source=str(path), columns={"prompt": "question", "completion": "answer"})
    train, where, rows = load_split(data, "train")
    held, _, held_rows = load_split(data, "validation")
    assert where == str(path) and len(train) == 45 and len(held) == 5 and not set(rows) & set(held_rows)
    assert set(train[0]) == {"prompt", "completion"} and train[0]["completion"].startswith(" ")
    tokens = tokenize_example(train[0], tokenizer, 256)
    trained = [t for t, m in zip(tokens["input_ids"], tokens["completion_mask"]) if m]
    assert tokenizer.decode(trained) == train[0]["completion"] + tokenizer.eos_token
    # The built-in tasks are expressed in the same formats.
    sentiment = load_split(DataSettings(), "train")[0][0]
    assert isinstance(sentiment["prompt"], str) and sentiment["completion"] in (" positive", " negative")
    chat = load_split(DataSettings(source="synthetic:preferences"), "train")[0][0]
    assert chat["prompt"][0]["role"] == "user" and chat["completion"][0]["role"] == "assistant"
    # A ShareGPT `conversations` column is converted to messages with TRL's converter.
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "Hi"},
                                                                      {"from": "gpt", "value": "Hello"}]}] * 20)
    assert load_split(DataSettings(source=str(share)), "train")[0][0]["messages"][1] == {"role": "assistant",
                                                                                        "content": "Hello"}
    # The same file through a URI (pyarrow.fs: the path object stores take) reads the same rows.
    assert load_split(DataSettings(source=f"file://{path}", columns=dict(data.columns)), "train")[0] == train


def wandb_offline_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """An offline W&B run's summary (config, state, ...) and history rows, read back by wandb's own reader of
    its transaction log (``wandb leet inspect``: the records ``wandb sync`` would upload)."""
    import subprocess
    import sys

    wandb = [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    summary = json.loads(subprocess.run([*wandb, "--summary", str(run_dir)], capture_output=True, text=True,
                                        check=True, timeout=60, env=env).stdout)
    records = [json.loads(line) for line in subprocess.run([*wandb, str(run_dir)], capture_output=True, text=True,
                                                           check=True, timeout=60, env=env).stdout.splitlines()]
    return summary, [r["history"] for r in records if r["type"] == "history"]


def without_empty(config: dict) -> dict:
    return {k: without_empty(v) if isinstance(v, dict) else v for k, v in config.items() if v != {}}


@pytest.mark.slow
def test_resolved_config_and_tracking(ray_local, tiny_models, tmp_path, monkeypatch):
    import yaml
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.training.conftest import metric_rows

    data = write_jsonl(tmp_path / "text.jsonl", _rows("text", n=60))
    out = tmp_path / "out"
    summary = run_sft("local_sft_chat.yaml", tiny_models["tiny-s"], out, f"data.source={data}", "data.task=null",
                      "optim.max_steps=6", "optim.log_every=2", "optim.save_every=0", "run_name=tracked",
                      "tracking.report_to=[mlflow, tensorboard, wandb]", "tracking.experiment=own-data",
                      "tracking.wandb_mode=offline")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["source"] == str(data) and config["optim"]["max_steps"] == 6
    assert config["model"] == str(tiny_models["tiny-s"]) and config["tracking"]["report_to"] == ["mlflow", "tensorboard",
                                                                                                    "wandb"]
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores behind this opt-in
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("own-data").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert run.data.metrics["final/eval_loss"] == pytest.approx(summary["eval_loss"])
    assert run.data.params["optim.max_steps"] == "6" and run.data.params["data.source"] == str(data)
    logged = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(logged).read_text()) == config

    events = EventAccumulator(str(out / "tensorboard" / "tracked"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert {"learning_rate", "tokens_per_s", "final/eval_loss"} <= set(events.Tags()["scalars"])

    # W&B offline: one run under OUTPUT_DIR/wandb, nothing sent anywhere (wandb sync would upload it).
    (run_dir,) = (out / "wandb").glob("offline-run-*-tracked")
    wandb_run, history = wandb_offline_run(run_dir)
    assert (wandb_run["project"], wandb_run["name"], wandb_run["state"]) == ("own-data", "tracked", "finished")
    wandb_run["config"].pop("_wandb", None)  # W&B's own bookkeeping; it also drops empty sections (data.columns: {})
    assert wandb_run["config"] == without_empty(config)
    logged = {(h["step"]["num"], h["item"]["loss"]) for h in history if "loss" in h["item"]}
    assert sorted(logged) == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    every = [r for r in metric_rows(out) if "step" in r]  # the same figures as metrics.jsonl at each step
    by_step = {h["step"]["num"]: h["item"] for h in history}
    for row in every:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                assert by_step[row["step"]][key] == pytest.approx(value), (row["step"], key)
    assert wandb_run["summary"]["eval_loss"] == pytest.approx(summary["eval_loss"])


def test_a_tracker_whose_library_is_missing_is_refused():
    import importlib.util

    from llm_platform.errors import ConfigError
    from llm_platform.training.config import TrackingSettings
    from llm_platform.training.tracking import check_tracking

    check_tracking(TrackingSettings(report_to=["mlflow", "tensorboard"]))  # both are project dependencies
    if importlib.util.find_spec("wandb") is None:  # W&B is optional: configuring it without it fails up front
        with pytest.raises(ConfigError, match="report_to: wandb needs the 'wandb' package"):
            check_tracking(TrackingSettings(report_to=["tensorboard", "wandb"]))
    else:
        check_tracking(TrackingSettings(report_to=["wandb"]))
