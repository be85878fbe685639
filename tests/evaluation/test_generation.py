"""`llmp eval generation`: ROUGE/BLEU for a base and its fine-tunes, checked against rouge-score and
sacrebleu called here, and accuracy on a second task before and after each fine-tune."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llm_platform.data.loader import load_records
from llm_platform.errors import ConfigError
from llm_platform.evaluation import EvaluationError, generation

LIMIT, SECOND_TASK_LIMIT = 16, 40


def config(tiny_models, variants: dict, kind: str = "transformers") -> generation.Config:
    return generation.Config(base=str(tiny_models["tiny-s"]), variants={k: str(v) for k, v in variants.items()},
                             engine={"kind": kind, "max_model_len": 512}, limit=LIMIT, max_tokens=24,
                             second_task={"limit": SECOND_TASK_LIMIT})


@pytest.fixture(scope="module")
def evaluated(tiny_models, summary_variants) -> dict:
    """Engines built by the command itself: the transformers engine loads in a second."""
    return generation.run(config(tiny_models, summary_variants))


def test_rouge_and_bleu_equal_an_independent_computation(evaluated):
    references = list(load_records("synthetic:dialogsum", "test", limit=LIMIT)["summary"])
    assert evaluated["references"] == references
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = {r["model"]: r for r in evaluated["rows"]}
    for model in ("base", "lora", "full"):
        predictions = evaluated["predictions"][model]
        assert len(predictions) == LIMIT
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
        for kind in ("rouge1", "rouge2", "rougeL"):
            assert rows[model][kind] == pytest.approx(sum(s[kind].fmeasure for s in scores) / LIMIT)
        assert rows[model]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)


def test_fine_tuning_on_summaries_raises_rouge(evaluated):
    rows = {r["model"]: r for r in evaluated["rows"]}
    assert (rows["lora"]["kind"], rows["full"]["kind"]) == ("lora", "model")
    assert rows["lora"]["rouge1"] > rows["base"]["rouge1"] + 0.1
    assert rows["full"]["rouge1"] > rows["base"]["rouge1"] + 0.1


def test_forgetting_is_measured_on_the_second_task(evaluated):
    rows = {r["model"]: r for r in evaluated["rows"]}
    for row in rows.values():
        accuracy = row["second_task_accuracy"]
        assert 0 <= accuracy <= 1
        assert accuracy * SECOND_TASK_LIMIT == pytest.approx(round(accuracy * SECOND_TASK_LIMIT))
        assert row["forgetting"] == pytest.approx(rows["base"]["second_task_accuracy"] - accuracy)
    assert rows["base"]["forgetting"] == 0
    assert "forgetting" in generation.table(evaluated)


def test_a_missing_variant_is_named_before_any_work(tiny_models, summary_variants, tmp_path):
    missing = config(tiny_models, {"lora": summary_variants["lora"], "full": tmp_path / "nowhere"})
    with pytest.raises(EvaluationError, match=r"variant 'full': .*nowhere does not exist"):
        generation.run(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="holds neither a PEFT adapter"):
        generation.run(config(tiny_models, {"x": tmp_path / "empty"}))
    with pytest.raises(ConfigError, match="names the base model's row"):
        from llm_platform.config import build_config
        build_config(generation.Config, {"base": "m", "variants": {"base": "p"}})


@pytest.mark.slow
def test_vllm_gives_the_same_summaries(tiny_models, summary_variants, engines, loop, evaluated):
    """The base and the LoRA through the session's vLLM engine: greedy output, so the same summaries."""
    cfg = config(tiny_models, {"lora": summary_variants["lora"]}, kind="vllm")
    engine = engines("tiny-s", "vllm")
    summary = loop.run(generation.evaluate(cfg, engine_for=lambda model: engine))
    for model in ("base", "lora"):
        assert summary["predictions"][model] == evaluated["predictions"][model]
