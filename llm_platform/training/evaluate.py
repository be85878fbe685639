"""Held-out figures: loss on the completions, and accuracy by ranking the label words.

Accuracy is rank classification: for each example, the label whose tokens the model
finds most likely after the prompt is its answer. This needs no generation and works
the same on an untrained model (chance) and a trained one. Every worker evaluates
its share; with FSDP every worker must run the same number of forward passes, so
short shares are padded with zero-weight repeats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llm_platform.data.templates import PromptPair
from llm_platform.training.data import tokenize_pair
from llm_platform.training.distributed import WorkerContext, all_reduce_sum

IGNORE = -100


def collate(examples: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` that are -100 outside completions."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        attention[row, :n] = 1
        labels[row, :n] = torch.where(torch.tensor(example["completion_mask"]) == 1, ids[row, :n], IGNORE)
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-probability of the labelled tokens, and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning prepends virtual-token positions
    targets = batch["labels"][:, 1:]
    logprobs = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = (targets != IGNORE).float()
    return (logprobs * mask).sum(-1), mask.sum(-1)


def _share(items: list, ctx: WorkerContext, batch_size: int) -> list[list[tuple[object, float]]]:
    """This worker's batches of ``(item, weight)``: equal batch counts on every worker."""
    per_worker = math.ceil(len(items) / ctx.world)
    mine = items[ctx.rank::ctx.world]
    padded = [(item, 1.0) for item in mine] + [(items[0], 0.0)] * (per_worker - len(mine))
    return [padded[i:i + batch_size] for i in range(0, len(padded), batch_size)]


@torch.no_grad()
def eval_loss(model, examples: list[dict], tokenizer, ctx: WorkerContext, batch_size: int = 16) -> float:
    """Mean per-token loss of the tokens that carry loss over all held-out tokenized ``examples`` (each
    ``input_ids`` + ``completion_mask``), on all workers."""
    model.eval()
    total, count = 0.0, 0.0
    for chunk in _share(examples, ctx, batch_size):
        batch = collate([e for e, _ in chunk], tokenizer.pad_token_id, ctx.device)
        logprob, n = sequence_logprobs(model, batch)
        weights = torch.tensor([w for _, w in chunk], device=logprob.device)
        total -= float((logprob * weights).sum())
        count += float((n * weights).sum())
    model.train()
    total, count = all_reduce_sum([total, count], ctx.device)
    return total / max(count, 1.0)


@torch.no_grad()
def choice_accuracy(model, pairs: list[PromptPair], choices: tuple[str, ...], tokenizer, ctx: WorkerContext,
                    max_length: int, batch_size: int = 16) -> float:
    """Share of pairs whose completion is the most likely of ``choices`` (all workers)."""
    model.eval()
    correct, seen = 0.0, 0.0
    for chunk in _share(pairs, ctx, batch_size):
        options = [PromptPair(p.prompt, c) for p, _ in chunk for c in choices]
        batch = [tokenize_pair(o, tokenizer, max_length) for o in options]
        for example in batch:  # score the label tokens only, not the end-of-sequence token
            example["completion_mask"][-1] = 0
        scores, _ = sequence_logprobs(model, collate(batch, tokenizer.pad_token_id, ctx.device))
        picked = scores.view(len(chunk), len(choices)).argmax(-1).tolist()
        for (pair, weight), index in zip(chunk, picked):
            correct += weight * (choices[index] == pair.completion)
            seen += weight
    model.train()
    correct, seen = all_reduce_sum([correct, seen], ctx.device)
    return correct / max(seen, 1.0)
