"""Prompt templates: raw records become (prompt, completion) pairs.

As in FLAN, each task has several phrasings so a fine-tuned model learns the task,
not one wording. Zero-shot, few-shot and instruction styles are all here because
the course compares them (``llmp eval prompting``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SENTIMENT_TEMPLATES = [
    "Review: {text}\nIs this review positive or negative?\nAnswer:",
    "{text}\nWhat is the sentiment of this review, positive or negative?\nAnswer:",
    "Classify the sentiment of the following review as positive or negative.\n{text}\nAnswer:",
    "Read the review and say whether the customer was happy.\nReview: {text}\nSentiment:",
]
NLI_TEMPLATES = {
    "zero_shot": "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
    "instruction": ("Decide whether the second sentence must be true when the first one is true. "
                    "Answer True or False.\nFirst: {sentence1}\nSecond: {sentence2}\nAnswer:"),
}
NLI_ANSWERS = {0: "True", 1: "False"}
SUMMARY_TEMPLATES = [
    "Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
    "Dialogue:\n{dialogue}\n\nWhat was going on in this conversation?\nSummary:",
    "{dialogue}\n\nBriefly summarize that dialogue.\nSummary:",
]


@dataclass(frozen=True)
class PromptPair:
    prompt: str
    completion: str


def sentiment_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    """A review as an instruction; the completion is the label word with a leading space."""
    index = template if template is not None else (rng or random).randrange(len(SENTIMENT_TEMPLATES))
    return PromptPair(SENTIMENT_TEMPLATES[index].format(text=record["text"]), " " + record["label"])


def summary_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    index = template if template is not None else (rng or random).randrange(len(SUMMARY_TEMPLATES))
    return PromptPair(SUMMARY_TEMPLATES[index].format(dialogue=record["dialogue"]), " " + record["summary"])


def nli_pair(record: dict, style: str = "zero_shot", shots: list[dict] | None = None) -> PromptPair:
    """An AX-b record in one prompting style; ``few_shot`` prepends solved ``shots``."""
    if style == "few_shot":
        solved = [NLI_TEMPLATES["zero_shot"].format(**s) + " " + NLI_ANSWERS[s["label"]] for s in shots or []]
        prompt = "\n\n".join(solved + [NLI_TEMPLATES["zero_shot"].format(**record)])
    elif style in NLI_TEMPLATES:
        prompt = NLI_TEMPLATES[style].format(**record)
    else:
        raise ValueError(f"unknown prompting style {style!r}; expected zero_shot, few_shot or instruction")
    return PromptPair(prompt, " " + NLI_ANSWERS[record["label"]])
