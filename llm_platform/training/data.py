"""Records to training examples: instruction templates, then token ids with a completion mask.

Each training record gets one of its task's phrasings at random (FLAN-style), so the
model learns the task rather than one wording. Held-out records cycle through the
phrasings deterministically, so every evaluation sees the same prompts. Only the
completion's tokens (and the end-of-sequence token) carry loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llm_platform.data.loader import COLUMNS, load_records
from llm_platform.data.templates import SENTIMENT_TEMPLATES, SUMMARY_TEMPLATES, PromptPair, sentiment_pair, summary_pair
from llm_platform.training.config import DataSettings


@dataclass(frozen=True)
class Task:
    columns: tuple[str, ...]
    to_pair: callable
    phrasings: int
    labels: tuple[str, ...] = ()
    """Completions of a labelled task: held-out accuracy ranks these."""
    chat: bool = False
    """Prompts are user turns, rendered with the model's chat template (the reply is the completion)."""


def chat_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    """A preference pair's prompt and its preferred reply: instruction tuning before RLHF."""
    return PromptPair(record["prompt"], record["chosen"])



def unfiltered_chat_pair(record: dict, template: int | None = None, rng: random.Random | None = None) -> PromptPair:
    """Either reply of a preference pair: demonstrations nobody filtered, polite or curt. SFT on these
    gives a policy that RLHF can still improve, which is the course's point of the reward model."""
    index = template if template is not None else (rng or random).randrange(2)
    return PromptPair(record["prompt"], (record["chosen"], record["rejected"])[index % 2])


TASKS = {
    "sentiment": Task(COLUMNS["sentiment"], sentiment_pair, len(SENTIMENT_TEMPLATES), (" positive", " negative")),
    "dialogsum": Task(COLUMNS["dialogsum"], summary_pair, len(SUMMARY_TEMPLATES)),
    "chat": Task(("prompt", "chosen"), chat_pair, 1, chat=True),
    "chat_unfiltered": Task(("prompt", "chosen", "rejected"), unfiltered_chat_pair, 2, chat=True),
}
EVAL_SPLIT = {"train": "train", "eval": "validation", "test": "test"}


def load_pairs(data: DataSettings, split: str, seed: int = 0, tokenizer=None) -> list[PromptPair]:
    """Prompt/completion pairs of ``split`` (train, validation or test); chat tasks need the ``tokenizer``."""
    task = TASKS[data.task]
    limit = data.train_limit if split == "train" else data.eval_limit
    records = load_records(data.source, split, subset=data.subset, limit=limit, columns=task.columns)
    rng = random.Random(seed)
    if split == "train":
        pairs = [task.to_pair(record, rng=rng) for record in records]
    else:
        pairs = [task.to_pair(record, template=i % task.phrasings) for i, record in enumerate(records)]
    if task.chat and tokenizer is not None:
        pairs = [PromptPair(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                                          add_generation_prompt=True), p.completion) for p in pairs]
    return pairs


def tokenize_pair(pair: PromptPair, tokenizer, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` of prompt + completion + EOS and a ``completion_mask`` of the tokens that carry loss."""
    # A chat-template prompt already starts with the BOS token; do not add a second one.
    prompt = tokenizer(pair.prompt, add_special_tokens=not pair.prompt.startswith(tokenizer.bos_token or "\0")).input_ids
    completion = tokenizer(pair.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt + completion)[-max_length:]  # keep the completion when truncating: it is what is learnt
    mask = ([0] * len(prompt) + [1] * len(completion))[-max_length:]
    return {"input_ids": ids, "completion_mask": mask}
