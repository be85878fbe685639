"""`llmp eval prompting`: zero-shot, few-shot and instruction prompts on an NLI set, per model.

The course compares how the same model does on the same examples when only the prompt changes:
a bare question (zero-shot), the question after a few solved examples (few-shot), and an explicit
instruction. Each example is an AX-b pair (``sentence1``, ``sentence2``, ``label`` 0 =
entailment); the model's answer is whichever of " True" / " False" it finds more likely after the
prompt (rank classification, see scoring.py). Time per style shows the price of longer prompts.

    llmp eval prompting --config llm_platform/evaluation/configs/prompting_local.yaml [--json F] [--plot F]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from llm_platform.config import FrozenConfig
from llm_platform.data.loader import load_records
from llm_platform.data.templates import NLI_ANSWERS, nli_pair
from llm_platform.evaluation import EvaluationError
from llm_platform.evaluation.metrics import accuracy
from llm_platform.evaluation.models import build_tiny_if_asked, set_torch_threads
from llm_platform.evaluation.output import grouped_bars, progress, pyplot, save
from llm_platform.report import format_table

if TYPE_CHECKING:  # scoring imports torch and transformers (seconds): run() does, after the config is checked
    from llm_platform.evaluation.scoring import LabelScorer

Style = Literal["zero_shot", "few_shot", "instruction"]
CANDIDATES = [" " + NLI_ANSWERS[label] for label in sorted(NLI_ANSWERS)]  # index == AX-b label


class ScoredModel(FrozenConfig):
    """One row group of the table: a model, optionally with a PEFT adapter (LoRA or soft prompt)."""

    name: str
    path: str
    """Checkpoint folder or hub id."""
    adapter: str | None = None
    """PEFT adapter folder applied on top of ``path``."""


class Config(FrozenConfig):
    models: list[ScoredModel] = Field(min_length=1)
    build_tiny_models: str | None = None
    """If set, build the tiny models into this folder first when they are missing."""
    dataset: str = "synthetic:nli_axb"
    """An AX-b-schema source: synthetic:nli_axb, a file or folder, or super_glue (subset axb, network)."""
    subset: str | None = None
    split: str = "test"
    limit: int | None = Field(100, gt=0)
    """Examples scored per style (null: all)."""
    styles: tuple[Style, ...] = Field(("zero_shot", "few_shot", "instruction"), min_length=1)
    shots: int = Field(3, ge=1)
    """Solved examples shown in the few-shot prompt."""
    shots_split: str = "train"
    """Split the solved examples come from; if it is ``split``, they are set aside and not scored."""
    device: str = "cpu"
    torch_threads: int | None = Field(1, gt=0)
    """CPU threads for the models run in this process (null: torch's default); see models.set_torch_threads."""


def run(cfg: Config, scorer_for: Callable[[ScoredModel], LabelScorer] | None = None) -> dict:
    """Score every style on every model; ``scorer_for`` lends scorers the caller has loaded."""
    from llm_platform.evaluation.scoring import LabelScorer

    build_tiny_if_asked(cfg.build_tiny_models)
    set_torch_threads(cfg.torch_threads)
    check_models(cfg.models)
    examples, shots = load_examples(cfg)
    labels = [r["label"] for r in examples]
    rows = []
    with progress(len(cfg.models) * len(cfg.styles) * len(examples), "prompting", unit="ex") as bar:
        for model in cfg.models:
            scorer = scorer_for(model) if scorer_for else LabelScorer(model.path, model.adapter, cfg.device)
            scorer.classify(nli_pair(shots[0], "few_shot", shots).prompt, CANDIDATES)  # first calls pay set-up costs
            for style in cfg.styles:
                bar.set_postfix_str(f"{model.name} {style}")
                start = time.perf_counter()
                predictions = []
                for record in examples:
                    predictions.append(scorer.classify(nli_pair(record, style, shots).prompt, CANDIDATES))
                    bar.update()
                seconds = time.perf_counter() - start
                rows.append({"model": model.name, "style": style, "accuracy": accuracy(predictions, labels),
                             "examples": len(examples), "seconds": seconds,
                             "ms_per_example": 1000 * seconds / len(examples)})
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    return {"rows": rows, "majority_baseline": majority, "dataset": cfg.dataset, "split": cfg.split,
            "shots": cfg.shots}


def check_models(models: list[ScoredModel]) -> None:
    """Fail on a mistyped model or an adapter that does not fit, before minutes of scoring."""
    from llm_platform.engine.adapters import inspect_adapter
    from llm_platform.models.loading import load_model_config

    for model in models:
        config = load_model_config(model.path)
        if model.adapter is not None:
            inspect_adapter(model.adapter, config)


def load_examples(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The scored examples and the few-shot examples, never overlapping."""
    columns = ("sentence1", "sentence2", "label")
    examples = list(load_records(cfg.dataset, cfg.split, cfg.subset, columns=columns))
    if cfg.shots_split == cfg.split:
        pool, examples = examples[:4 * cfg.shots], examples[4 * cfg.shots:]
    else:
        pool = list(load_records(cfg.dataset, cfg.shots_split, cfg.subset, columns=columns))
    examples = examples[:cfg.limit]
    if not examples:
        raise EvaluationError(f"{cfg.dataset} ({cfg.split}) has no examples left to score")
    return examples, balanced_shots(pool, cfg.shots)


def balanced_shots(pool: list[dict], k: int) -> list[dict]:
    """The first ``k`` examples of ``pool`` alternating between the labels, so the shots do not
    teach the model to always answer one way."""
    by_label = {label: [r for r in pool if r["label"] == label] for label in sorted(NLI_ANSWERS)}
    shots = [by_label[i % 2][i // 2] for i in range(k) if i // 2 < len(by_label[i % 2])]
    if len(shots) < k:
        raise EvaluationError(f"need {k} few-shot examples with both labels; the shot split has too few")
    return shots


def table(summary: dict) -> str:
    text = format_table(summary["rows"], ["model", "style", "accuracy", "examples", "seconds", "ms_per_example"])
    return (f"Prompting styles on {summary['dataset']} ({summary['split']}, {summary['shots']} shots for few_shot; "
            f"rank classification of True/False)\n{text}\n\n"
            f"majority-label baseline: {summary['majority_baseline']:.3f}")


def plot(summary: dict, path: str) -> None:
    """Accuracy and time per example, by model, one bar per style."""
    plt = pyplot()
    rows = summary["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    styles = list(dict.fromkeys(r["style"] for r in rows))
    at = {(r["model"], r["style"]): r for r in rows}
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    grouped_bars(ax_acc, models, {s: [at[(m, s)]["accuracy"] for m in models] for s in styles}, "accuracy")
    ax_acc.axhline(summary["majority_baseline"], color="grey", linestyle="--", linewidth=1)
    grouped_bars(ax_time, models, {s: [at[(m, s)]["ms_per_example"] for m in models] for s in styles},
                 "ms per example")
    fig.suptitle(f"Prompting styles on {summary['dataset']} (dashed: majority-label baseline)")
    save(fig, path)
