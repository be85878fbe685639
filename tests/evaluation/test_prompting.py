"""`llmp eval prompting`: accuracies per model and style, checked against a computation done here."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_platform.config import load_config
from llm_platform.data.templates import nli_pair
from llm_platform.errors import AdapterError, ConfigError
from llm_platform.evaluation import prompting
from llm_platform.evaluation.scoring import LabelScorer

LIMIT = 16


@pytest.fixture(scope="module")
def setup(tiny_models, adapters):
    cfg = prompting.Config(models=[
        {"name": "tiny-s", "path": str(tiny_models["tiny-s"])},
        {"name": "tiny-s+lora", "path": str(tiny_models["tiny-s"]), "adapter": str(adapters["tiny-s"]["lora"])},
        {"name": "tiny-m", "path": str(tiny_models["tiny-m"])}], limit=LIMIT)
    scorers = {m.name: LabelScorer(m.path, m.adapter) for m in cfg.models}
    return cfg, scorers, prompting.run(cfg, scorer_for=lambda m: scorers[m.name])


def independent_accuracy(model_dir, records, style, shots) -> float:
    """Rank classification written out again: the joined text is tokenized, and the answer's
    log-probability is read off the last tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for record in records:
        prompt = nli_pair(record, style, shots).prompt
        scores = []
        for answer in (" True", " False"):
            ids = tokenizer(prompt + answer, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - len(tokenizer(prompt)["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            scores.append(sum(logprobs[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1 - n, ids.shape[1] - 1)))
        right += int(scores.index(max(scores)) == record["label"])
    return right / len(records)


def test_every_model_and_style_is_scored(setup):
    cfg, _, summary = setup
    rows = {(r["model"], r["style"]): r for r in summary["rows"]}
    assert set(rows) == {(m.name, s) for m in cfg.models for s in ("zero_shot", "few_shot", "instruction")}
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["examples"] == LIMIT and row["seconds"] > 0
        assert (row["accuracy"] * LIMIT) == pytest.approx(round(row["accuracy"] * LIMIT))
    assert 0.5 <= summary["majority_baseline"] <= 1
    # Longer prompts cost more: three solved examples make few-shot the slowest style.
    assert rows[("tiny-m", "few_shot")]["seconds"] > rows[("tiny-m", "zero_shot")]["seconds"]
    assert "majority-label baseline" in prompting.table(summary)


@pytest.mark.parametrize("model, style", [("tiny-s", "zero_shot"), ("tiny-m", "few_shot")])
def test_accuracy_equals_an_independent_computation(setup, tiny_models, model, style):
    cfg, _, summary = setup
    examples, shots = prompting.load_examples(cfg)
    (row,) = [r for r in summary["rows"] if r["model"] == model and r["style"] == style]
    assert row["accuracy"] == independent_accuracy(tiny_models[model], examples, style, shots)


def test_an_adapter_changes_the_scores(setup):
    cfg, scorers, _ = setup
    examples, shots = prompting.load_examples(cfg)
    prompt = nli_pair(examples[0], "instruction").prompt
    base, tuned = (scorers[name].candidate_logprobs(prompt, prompting.CANDIDATES) for name in ("tiny-s", "tiny-s+lora"))
    assert base != pytest.approx(tuned)


def test_few_shot_examples_are_balanced_and_never_scored(setup):
    cfg, _, _ = setup
    examples, shots = prompting.load_examples(cfg)
    assert [s["label"] for s in shots] == [0, 1, 0]
    same_split = cfg.model_copy(update={"shots_split": cfg.split})
    examples, shots = prompting.load_examples(same_split)
    pairs = {(r["sentence1"], r["sentence2"]) for r in examples}
    assert not pairs & {(s["sentence1"], s["sentence2"]) for s in shots}


def test_bad_input_is_named(tiny_models, adapters):
    with pytest.raises(ConfigError, match=r"styles\.0: Input should be 'zero_shot', 'few_shot' or 'instruction'"):
        load_config(prompting.Config, overrides=["models=[{name: a, path: x}]", "styles=[chain_of_thought]"])
    wrong_base = prompting.Config(models=[{"name": "m", "path": str(tiny_models["tiny-m"]),
                                           "adapter": str(adapters["tiny-s"]["lora"])}])
    with pytest.raises(AdapterError, match="the base needs"):
        prompting.run(wrong_base)
