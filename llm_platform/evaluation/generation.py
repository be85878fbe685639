"""`llmp eval generation`: ROUGE and BLEU of a base model and its fine-tunes, and what they forgot.

The course fine-tunes a model for dialogue summarization, fully and with LoRA, and compares
ROUGE against the base; then notes that full fine-tuning forgets other tasks more than PEFT,
which leaves the base weights alone. This command measures both: summaries of the same
dialogues by the base and by every variant (greedy, so the figures repeat), scored with
ROUGE-1/2/L and BLEU; and accuracy on a second task (sentiment, by rank classification) for the
base and every variant, where "forgetting" is the accuracy lost against the base.

Variants are folders written by fine-tuning jobs (train_jobs.sft): a PEFT adapter (``adapter/``)
applied on the base, or a full model (``model/``); the kind is read from what the folder holds.

    llmp eval generation --config llm_platform/evaluation/configs/generation_local.yaml \\
        variants.lora=artifacts/sft-lora variants.full=artifacts/sft-full [--json F] [--plot F]
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from llm_platform.config import FrozenConfig
from llm_platform.data.loader import load_records
from llm_platform.data.templates import SENTIMENT_TEMPLATES, SUMMARY_TEMPLATES, sentiment_pair, summary_pair
from llm_platform.engine import Engine, SamplingParams, build_engine
from llm_platform.evaluation import EvaluationError
from llm_platform.evaluation.metrics import ROUGE_TYPES, accuracy, bleu, rouge
from llm_platform.evaluation.models import (EngineSettings, Variant, build_tiny_if_asked, find_variant,
                                            set_torch_threads)
from llm_platform.evaluation.output import grouped_bars, progress, pyplot, save
from llm_platform.models.checkpoints import resolve_model
from llm_platform.report import format_table

if TYPE_CHECKING:  # scoring imports torch and transformers (seconds): _scorer does, after the config is checked
    from llm_platform.evaluation.scoring import LabelScorer

BASE = "base"
SENTIMENT_LABELS = ("positive", "negative")


class SecondTask(FrozenConfig):
    """The task forgetting is measured on: reviews labelled positive or negative."""

    dataset: str = "synthetic:sentiment"
    """A source with ``text`` and ``label`` (positive/negative)."""
    split: str = "test"
    limit: int | None = Field(100, gt=0)
    template: int = Field(0, ge=0, lt=len(SENTIMENT_TEMPLATES))
    """Which sentiment prompt template to ask with (llm_platform.data.templates)."""


class Config(FrozenConfig):
    base: str
    """The base model: checkpoint folder or hub id."""
    variants: dict[str, str] = {}
    """Fine-tuned variants by name: a PEFT adapter folder, a full model folder, or a job's output_dir."""
    build_tiny_models: str | None = None
    """If set, build the tiny models into this folder first when they are missing."""
    engine: EngineSettings = EngineSettings()
    dataset: str = "synthetic:dialogsum"
    """A source with ``dialogue`` and ``summary``: synthetic:dialogsum, a file, or knkarthick/dialogsum (network)."""
    split: str = "test"
    limit: int | None = Field(40, gt=0)
    """Dialogues summarized (null: all)."""
    template: int = Field(0, ge=0, lt=len(SUMMARY_TEMPLATES))
    """Which summary prompt template to ask with."""
    max_tokens: int = Field(48, gt=0)
    """Longest summary, in tokens (generation also stops at a newline)."""
    second_task: SecondTask = SecondTask()
    device: str = "cpu"
    """Device of the scoring model for the second task."""
    torch_threads: int | None = Field(1, gt=0)
    """CPU threads for the models run in this process (null: torch's default); see models.set_torch_threads."""

    @field_validator("variants")
    @classmethod
    def _not_named_base(cls, variants: dict[str, str]) -> dict[str, str]:
        if BASE in variants:
            raise ValueError(f"{BASE!r} names the base model's row; give the variant another name")
        return variants


def run(cfg: Config) -> dict:
    return asyncio.run(evaluate(cfg))


async def evaluate(cfg: Config, engine_for: Callable[[str], Engine] | None = None) -> dict:
    """Summaries and second-task accuracy for the base and each variant. ``engine_for(model path)``
    lends engines the caller keeps; without it they are built here, one at a time."""
    build_tiny_if_asked(cfg.build_tiny_models)
    set_torch_threads(cfg.torch_threads)
    resolve_model(cfg.base)
    variants = [find_variant(name, path, cfg.base) for name, path in cfg.variants.items()]
    dialogues = load_records(cfg.dataset, cfg.split, limit=cfg.limit, columns=("dialogue", "summary"))
    prompts = [summary_pair(r, template=cfg.template).prompt for r in dialogues]
    references = list(dialogues["summary"])
    predictions = await summarize(cfg, variants, prompts, engine_for)
    second = second_task_accuracy(cfg, variants)
    rows = []
    for name in [BASE, *(v.name for v in variants)]:
        kind = next((v.kind for v in variants if v.name == name), BASE)
        rows.append({"model": name, "kind": kind, **rouge(predictions[name], references),
                     "bleu": bleu(predictions[name], references), "second_task_accuracy": second[name],
                     "forgetting": second[BASE] - second[name]})
    return {"rows": rows, "predictions": predictions, "references": references, "dataset": cfg.dataset,
            "second_task": cfg.second_task.dataset}


async def summarize(cfg: Config, variants: list[Variant], prompts: list[str],
                    engine_for: Callable[[str], Engine] | None) -> dict[str, list[str]]:
    """Greedy summaries per model. The base and its adapters share one engine; each full model gets
    its own, started after the previous one is shut down (one engine in memory at a time)."""
    params = SamplingParams(temperature=0, max_tokens=cfg.max_tokens, stop=("\n",))
    jobs = {cfg.base: [(BASE, None)] + [(v.name, v.adapter) for v in variants if v.adapter]}
    jobs.update({v.path: [(v.name, None)] for v in variants if v.kind == "model"})
    predictions: dict[str, list[str]] = {}
    with progress(sum(map(len, jobs.values())) * len(prompts), "summaries", unit="gen") as bar:
        for model, runs in jobs.items():
            engine = engine_for(model) if engine_for else build_engine(cfg.engine.for_model(model))
            try:
                for name, adapter in runs:
                    bar.set_postfix_str(name)
                    predictions[name] = await _generate_all(engine, prompts, params, adapter, bar)
            finally:
                if engine_for is None:
                    engine.shutdown()
    return predictions


async def _generate_all(engine: Engine, prompts: list[str], params: SamplingParams, adapter, bar) -> list[str]:
    """All prompts at once: vLLM batches them; the transformers engine takes them in turn."""
    async def one(prompt: str) -> str:
        result = await engine.generate(prompt, params, adapter)
        bar.update()
        return result.choices[0].text.strip()

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def second_task_accuracy(cfg: Config, variants: list[Variant]) -> dict[str, float]:
    """Rank-classification accuracy on the second task, for the base and each variant; each scoring
    model is loaded in turn and dropped before the next."""
    task = cfg.second_task
    records = load_records(task.dataset, task.split, limit=task.limit, columns=("text", "label"))
    unknown = {r["label"] for r in records} - set(SENTIMENT_LABELS)
    if unknown:
        raise EvaluationError(f"second task {task.dataset}: labels must be {SENTIMENT_LABELS}, found {sorted(unknown)}")
    candidates = [" " + label for label in SENTIMENT_LABELS]
    labels = [SENTIMENT_LABELS.index(r["label"]) for r in records]
    prompts = [sentiment_pair(r, template=task.template).prompt for r in records]
    scores = {}
    with progress((1 + len(variants)) * len(prompts), "second task", unit="ex") as bar:
        for variant in [None, *variants]:
            bar.set_postfix_str(variant.name if variant else BASE)
            scorer = _scorer(cfg, variant)
            predictions = []
            for prompt in prompts:
                predictions.append(scorer.classify(prompt, candidates))
                bar.update()
            scores[variant.name if variant else BASE] = accuracy(predictions, labels)
    return scores


def _scorer(cfg: Config, variant: Variant | None) -> LabelScorer:
    from llm_platform.evaluation.scoring import LabelScorer

    if variant is None:
        return LabelScorer(cfg.base, device=cfg.device)
    if variant.adapter:
        return LabelScorer(cfg.base, adapter=variant.path, device=cfg.device)
    return LabelScorer(variant.path, device=cfg.device)


def table(summary: dict) -> str:
    text = format_table(summary["rows"], ["model", "kind", "rouge1", "rouge2", "rougeL", "bleu",
                                          "second_task_accuracy", "forgetting"])
    return (f"Summaries of {summary['dataset']} (ROUGE F 0-1, BLEU 0-100, greedy) and accuracy on "
            f"{summary['second_task']} before and after fine-tuning (forgetting = accuracy lost)\n{text}")


def plot(summary: dict, path: str) -> None:
    """ROUGE per model, and second-task accuracy per model."""
    plt = pyplot()
    rows = summary["rows"]
    models = [r["model"] for r in rows]
    fig, (ax_rouge, ax_task) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    grouped_bars(ax_rouge, models, {kind: [r[kind] for r in rows] for kind in ROUGE_TYPES}, "ROUGE F")
    grouped_bars(ax_task, models, {"second task": [r["second_task_accuracy"] for r in rows]}, "accuracy")
    ax_task.set_ylim(0, 1)
    fig.suptitle(f"Base vs fine-tuned: summaries of {summary['dataset']}, forgetting on {summary['second_task']}")
    save(fig, path)
