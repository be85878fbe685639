import json
from collections import Counter
from pathlib import Path

import pytest

from llm_platform.data import synthetic, templates
from llm_platform.data.loader import COLUMNS, load_records, synthetic_split, write_synthetic
from llm_platform.errors import DataError


@pytest.mark.parametrize("name", sorted(synthetic.GENERATORS))
def test_generators_are_deterministic_and_have_their_columns(name):
    first, second = synthetic.GENERATORS[name](50, 3), synthetic.GENERATORS[name](50, 3)
    assert first == second
    assert synthetic.GENERATORS[name](50, 4) != first
    assert all(set(COLUMNS[name]) <= set(row) for row in first)


@pytest.mark.parametrize("name", sorted(synthetic.GENERATORS))
def test_held_out_splits_never_repeat_training_rows(name):
    def content(row):
        return json.dumps({k: v for k, v in row.items() if k not in ("idx", "id")}, sort_keys=True)

    train = {content(r) for r in synthetic_split(name, "train")}
    assert len(train) > 400
    for split in ("validation", "test"):
        rows = synthetic_split(name, split)
        assert len(rows) > 20
        assert not any(content(r) in train for r in rows)


def test_sentiment_is_balanced_and_follows_its_polarity_words():
    rows = synthetic.sentiment(400)
    assert Counter(r["label"] for r in rows) == {"positive": 200, "negative": 200}
    for row in rows:
        words = set(row["text"].lower().replace(".", " ").replace(",", " ").split())
        assert words & set(synthetic.POSITIVE if row["label"] == "positive" else synthetic.NEGATIVE)
        assert not words & set(synthetic.NEGATIVE if row["label"] == "positive" else synthetic.POSITIVE)


def test_preferences_follow_the_politeness_rule():
    for row in synthetic.preferences(200):
        assert any(row["chosen"].startswith(o) for o in synthetic.POLITE_OPENERS)
        assert any(row["rejected"].startswith(c) for c in synthetic.CURT_ANSWERS)


def test_nli_uses_the_axb_schema_and_its_labels():
    rows = synthetic.nli_axb(100)
    assert {tuple(sorted(r)) for r in rows} == {("idx", "label", "sentence1", "sentence2")}
    assert Counter(r["label"] for r in rows) == {0: 50, 1: 50}
    entailed = [r for r in rows if r["label"] == 0]
    assert all(r["sentence1"].startswith(r["sentence2"][:-1]) for r in entailed)


def test_dialogue_summaries_restate_the_dialogue():
    for row in synthetic.dialogsum(30):
        names_in_summary = [n for n in synthetic.NAMES if n in row["summary"]]
        assert names_in_summary and all(n in row["dialogue"] or row["topic"] != "shopping"
                                        for n in names_in_summary)


def test_loader_reads_synthetic_jsonl_and_parquet_alike(tmp_path: Path):
    builtin = load_records("synthetic:sentiment", "validation", columns=COLUMNS["sentiment"])
    write_synthetic(tmp_path / "jsonl")
    write_synthetic(tmp_path / "parquet", fmt="parquet")
    from_folder = load_records(str(tmp_path / "jsonl" / "sentiment"), "validation")
    from_file = load_records(str(tmp_path / "parquet" / "sentiment" / "validation.parquet"))
    assert builtin.to_list() == from_folder.to_list() == from_file.to_list()
    assert len(load_records("synthetic:nli_axb", "test", limit=7)) == 7


def test_loader_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(DataError, match="unknown synthetic dataset 'sentimnt'"):
        load_records("synthetic:sentimnt")
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="lacks column"):
        load_records("synthetic:sentiment", columns=("sentence1",))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="cannot read"):
        load_records(str(broken))


def test_hub_names_go_to_the_hub_and_fail_clearly_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline mode fails at once, as the closed network here would after its retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load hub dataset 'super_glue'.*axb"):
        load_records("super_glue", "test", subset="axb")


def test_templates_cover_every_phrasing():
    row = {"text": "The lamp is great.", "label": "positive"}
    prompts = {templates.sentiment_pair(row, template=i).prompt for i in range(len(templates.SENTIMENT_TEMPLATES))}
    assert len(prompts) == len(templates.SENTIMENT_TEMPLATES)
    assert all(row["text"] in p for p in prompts)
    shots = synthetic.nli_axb(3)
    few = templates.nli_pair(shots[0], "few_shot", shots=shots[1:])
    assert few.prompt.count("Answer:") == 3 and few.completion in (" True", " False")
    with pytest.raises(ValueError, match="unknown prompting style"):
        templates.nli_pair(shots[0], "two_shot")
