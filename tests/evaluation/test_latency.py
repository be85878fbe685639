"""`llmp eval latency` on the tiny models: every size x prompt timed, and time per token grows with size."""

import json

import pytest

from llm_platform.data.prompts import COURSE_PROMPTS
from llm_platform.evaluation import latency
from llm_platform.models.tiny import TINY_NAMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def config(tiny_models, **overrides) -> latency.Config:
    return latency.Config(models={name: str(path) for name, path in tiny_models.items()},
                          sampling={"max_tokens": 24}, **overrides)


@pytest.fixture(scope="module")
def measured(tiny_models, engines, loop) -> dict:
    lent = {size: engines(size, "transformers") for size in TINY_NAMES}
    return loop.run(latency.evaluate(config(tiny_models, repeats=2), engine_for=lent.__getitem__))


def test_every_size_and_prompt_is_timed(measured):
    rows = {(r["model"], r["prompt"]): r for r in measured["rows"]}
    assert set(rows) == {(m, p) for m in TINY_NAMES for p in [*COURSE_PROMPTS, "average"]}
    for row in rows.values():
        assert 1 <= row["tokens"] <= 24 and row["seconds"] > 0 and 0 < row["ttft_ms"] < 1000 * row["seconds"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
    # The course's settings are the defaults; only max_tokens was changed here.
    assert measured["sampling"] == {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.5,
                                    "max_tokens": 24, "seed": 0}
    averages = [rows[(m, "average")] for m in TINY_NAMES]
    assert [a["params"] for a in averages] == sorted(a["params"] for a in averages)
    for model, average in zip(TINY_NAMES, averages):
        mine = [rows[(model, p)] for p in COURSE_PROMPTS]
        assert average["tokens"] == pytest.approx(sum(r["tokens"] for r in mine) / len(mine))


def test_time_per_token_grows_with_parameter_count(measured):
    average = {r["model"]: r for r in measured["rows"] if r["prompt"] == "average"}
    assert average["tiny-s"]["ms_per_token"] < average["tiny-l"]["ms_per_token"]
    assert "tiny-l has 47x the parameters of tiny-s" in latency.table(measured)


def test_seeds_make_sampled_runs_repeat(engines, loop):
    """Repeat i is sampled with seed + i: the same run twice samples the same tokens."""
    engine = engines("tiny-s", "transformers")
    sampling = latency.Sampling(max_tokens=24)
    runs = [loop.run(engine.generate(COURSE_PROMPTS["simple_qa"], sampling.params(repeat)))
            for repeat in (0, 0, 1)]
    tokens = [run.choices[0].token_ids for run in runs]
    assert tokens[0] == tokens[1] != tokens[2]


def test_json_and_plot(measured, tmp_path):
    from llm_platform.report import write_json

    write_json(tmp_path / "latency.json", measured)
    assert json.loads((tmp_path / "latency.json").read_text())["rows"] == measured["rows"]
    latency.plot(measured, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_model_without_a_path_needs_an_endpoint():
    with pytest.raises(ValueError, match="need a path"):
        latency.Config(models={"tiny-s": None})
    assert latency.Config(models={"tiny-s": None}, endpoint="http://127.0.0.1:8000").models == {"tiny-s": None}
