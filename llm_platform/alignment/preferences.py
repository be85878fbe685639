"""Preference pairs (``prompt``, ``chosen``, ``rejected``) for the reward model and DPO: where they come
from, how a pair becomes tokens, and how a policy's preference for the chosen reply is measured.

A pair is a conversation: the prompt is the user turn (or TRL's list of messages, for multi-turn hub
sets such as ``trl-lib/hh-rlhf-helpful-base``) and each reply the assistant turn, rendered with the
tokenizer's chat template. TRL's trainers tokenize them that way, and the functions here follow the
same rules, so held-out figures, the reward scorer and training all see identical tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from llm_platform.alignment.config import PreferenceData
from llm_platform.data.loader import load_records

COLUMNS = ("prompt", "chosen", "rejected")
Turns = str | list[dict]
"""A user prompt or an assistant reply: plain text, or a list of ``{"role", "content"}`` messages."""


def load_pairs(data: PreferenceData, split: str) -> datasets.Dataset:
    """The pairs of ``split`` (``train``, or the held-out split) with their limit applied."""
    limit = data.train_limit if split == "train" else data.eval_limit
    return load_records(data.source, split, subset=data.subset, limit=limit, columns=COLUMNS)


def user_turns(prompt: Turns) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def assistant_turns(reply: Turns) -> list[dict]:
    return [{"role": "assistant", "content": reply}] if isinstance(reply, str) else list(reply)


def as_conversations(records: datasets.Dataset) -> datasets.Dataset:
    """TRL's conversational preference format (explicit prompt); already conversational sets pass through."""
    if not isinstance(records[0]["prompt"], str):
        return records.select_columns(list(COLUMNS))
    return datasets.Dataset.from_dict({"prompt": [user_turns(p) for p in records["prompt"]],
                                       "chosen": [assistant_turns(r) for r in records["chosen"]],
                                       "rejected": [assistant_turns(r) for r in records["rejected"]]})


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, as TRL tokenizes a conversation."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def reply_tokens(tokenizer, prompt: Turns, reply: Turns) -> tuple[list[int], list[int]]:
    """``(prompt_ids, reply_ids)`` as TRL's DPOTrainer splits them: the rendered prompt (with the
    assistant header) and the rendered prompt + reply, cut where the two token sequences diverge."""
    prompt_ids = chat_ids(tokenizer, user_turns(prompt), add_generation_prompt=True)
    full_ids = chat_ids(tokenizer, user_turns(prompt) + assistant_turns(reply))
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                  min(len(prompt_ids), len(full_ids)))
    return full_ids[:shared], full_ids[shared:]


@torch.no_grad()
def reply_logprobs(model, tokenizer, prompts: Sequence[Turns], replies: Sequence[Turns], max_length: int = 512,
                   batch_size: int = 32) -> torch.Tensor:
    """Summed log-probability of each reply's tokens after its prompt (one value per pair)."""
    from llm_platform.training.evaluate import collate, sequence_logprobs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        examples = []
        for prompt, reply in zip(prompts[i:i + batch_size], replies[i:i + batch_size]):
            prompt_ids, ids = reply_tokens(tokenizer, prompt, reply)
            examples.append({"input_ids": (prompt_ids + ids)[:max_length],
                             "completion_mask": ([0] * len(prompt_ids) + [1] * len(ids))[:max_length]})
        logprob, _ = sequence_logprobs(model, collate(examples, tokenizer.pad_token_id, device))
        out.append(logprob.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def preference_margins(model, tokenizer, records: datasets.Dataset, max_length: int = 512) -> torch.Tensor:
    """``log p(chosen | prompt) - log p(rejected | prompt)`` per pair."""
    prompts = list(records["prompt"])
    return (reply_logprobs(model, tokenizer, prompts, list(records["chosen"]), max_length) -
            reply_logprobs(model, tokenizer, prompts, list(records["rejected"]), max_length))
