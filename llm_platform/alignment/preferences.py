"""Preference pairs (``prompt``, ``chosen``, ``rejected``) for the reward model and DPO, and how a
policy's preference for the chosen reply is measured."""

from __future__ import annotations

import torch

from llm_platform.data.loader import load_records
from llm_platform.data.templates import PromptPair

COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(source: str, split: str, limit: int | None = None):
    return load_records(source, split, limit=limit, columns=COLUMNS)


def as_conversations(records):
    """TRL's conversational preference format: the chat template renders prompt + reply."""
    return records.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]})


@torch.no_grad()
def reply_logprobs(model, tokenizer, prompts: list[str], replies: list[str], batch_size: int = 32) -> torch.Tensor:
    """Summed log-probability of each reply (and its end token) after its chat-rendered prompt."""
    from llm_platform.training.data import tokenize_pair
    from llm_platform.training.evaluate import collate, sequence_logprobs

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        examples = []
        for prompt, reply in zip(prompts[i:i + batch_size], replies[i:i + batch_size]):
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
            examples.append(tokenize_pair(PromptPair(rendered, reply), tokenizer, 512))
        logprob, _ = sequence_logprobs(model, collate(examples, tokenizer.pad_token_id, device))
        out.append(logprob.cpu())
    return torch.cat(out)


def preference_margins(model, tokenizer, records) -> torch.Tensor:
    """log p(chosen) - log p(rejected) per pair."""
    prompts = list(records["prompt"])
    return (reply_logprobs(model, tokenizer, prompts, list(records["chosen"])) -
            reply_logprobs(model, tokenizer, prompts, list(records["rejected"])))
