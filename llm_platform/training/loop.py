"""The SFT step loop that runs in every worker (or in a plain process, for comparison).

Every worker sees the same global order of examples; step ``k`` takes the next
``batch_size`` of them and worker ``r`` trains on every ``world``-th one. The loss is
normalised by the number of completion tokens in the *global* batch, so one worker
and N workers compute the same gradient and their losses agree.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from llm_platform import console
from llm_platform.data.templates import PromptPair
from llm_platform.models.loading import DTYPES, load_tokenizer
from llm_platform.training import checkpoint
from llm_platform.training.config import SFTConfig, training_settings
from llm_platform.training.devices import sft_placement
from llm_platform.training.data import load_split, task_labels, tokenize_all
from llm_platform.training.distributed import (WorkerContext, all_gather, all_reduce_sum, gradient_sync,
                                               held_parameter_bytes, shard, unwrap)
from llm_platform.training.evaluate import IGNORE, choice_accuracy, collate, eval_loss, sequence_logprobs
from llm_platform.training.methods import build_model, trainable_parameters
from llm_platform.training.outputs import write_summary
from llm_platform.training.tracking import RunTracker


def global_order(n_examples: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for ``steps`` global batches: reshuffled each epoch, same on every worker."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        indices = list(range(n_examples))
        random.Random(seed + epoch).shuffle(indices)
        order += indices
        epoch += 1
    return order


def train_sft(cfg: SFTConfig, ctx: WorkerContext, folder: Path | None) -> dict:
    """Train per ``cfg``; rank 0 writes metrics.jsonl, summary.json and the weights into ``folder`` (its
    ``output`` names the weights' subfolder; None on the other ranks)."""
    torch.manual_seed(cfg.optim.seed)
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    labels = task_labels(cfg.data)
    train_set = load_tokenized(cfg, tokenizer, "train")
    val_set = load_tokenized(cfg, tokenizer, "validation")
    # Accuracy ranks a labelled task's label words after each test prompt.
    test_pairs = [PromptPair(e["prompt"], e["completion"]) for e in load_split(cfg.data, "test")[0]] if labels else []

    model = build_model(cfg, str(sft_placement(cfg).check(ctx.device)))
    total_bytes = held_parameter_bytes(model)
    model = shard(model, cfg.sharding, ctx.device, DTYPES[cfg.dtype])
    held = all_gather(held_parameter_bytes(model))
    held_line = (f"[rank {ctx.rank}] holds {held[ctx.rank]:,} of {total_bytes:,} parameter bytes "
                 f"({cfg.sharding}, {ctx.world} worker(s))")
    if ctx.world > 1:  # on the console only where there is something to see: how the shards split
        console.progress(held_line)
    else:
        print(held_line, flush=True)

    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.optim.learning_rate,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.optim.warmup_ratio * cfg.optim.max_steps),
                                                cfg.optim.max_steps)
    start, before = 0, {}
    if ctx.checkpoint_dir:
        progress = checkpoint.load(ctx.checkpoint_dir, model, optimizer, scheduler, cfg.is_adapter)
        start, before = progress["step"], progress["before"]
        console.progress(f"[rank {ctx.rank}] resumed from the checkpoint at step {start}")
    else:
        before = _evaluate(cfg, model, tokenizer, val_set, test_pairs, labels, ctx)
    log = RunTracker(folder, cfg.tracking, cfg.run_name, "sft", cfg.model_dump(mode="json"),
                     resume_step=start if ctx.checkpoint_dir else None) if ctx.is_main else None
    if log and ctx.checkpoint_dir:
        log.write({"step": start, "event": "resumed"})

    loop_start = time.perf_counter()
    order = global_order(len(train_set), cfg.optim.max_steps, cfg.optim.batch_size, cfg.optim.seed)
    window = {"loss": 0.0, "loss_tokens": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter()}
    for step in range(start + 1, cfg.optim.max_steps + 1):
        batch_ids = order[(step - 1) * cfg.optim.batch_size: step * cfg.optim.batch_size][ctx.rank::ctx.world]
        micro = micro_batches([train_set[i] for i in batch_ids], cfg.optim.gradient_accumulation_steps,
                              tokenizer.pad_token_id, ctx.device)
        loss_sum, loss_tokens, tokens = train_step(cfg, model, optimizer, scheduler, micro, ctx)
        window["loss"] += loss_sum
        window["loss_tokens"] += loss_tokens
        window["tokens"] += tokens
        window["steps"] += 1
        evaluate_now = cfg.optim.eval_every and step % cfg.optim.eval_every == 0
        save_now = (cfg.optim.save_every and step % cfg.optim.save_every == 0) or step == cfg.optim.max_steps
        if step % cfg.optim.log_every and not evaluate_now and not save_now:
            continue
        row = _window_row(step, cfg, window, scheduler)
        if evaluate_now:
            row["eval_loss"] = eval_loss(model, val_set, tokenizer, ctx)
        if ctx.is_main:
            log.write(row)
            console.progress(_progress_line(row, cfg.optim.max_steps))
        _report(cfg, ctx, model, optimizer, scheduler, row, before, save_now)
        window = {"loss": 0.0, "loss_tokens": 0.0, "tokens": 0.0, "steps": 0, "t0": time.perf_counter()}

    train_seconds = time.perf_counter() - loop_start
    after = _evaluate(cfg, model, tokenizer, val_set, test_pairs, labels, ctx)
    state = checkpoint.full_state_dict(model, cfg.is_adapter)
    if not ctx.is_main:
        return {}
    _save_weights(cfg, unwrap(model), state, tokenizer, folder)
    rows = log.rows()
    losses = [r["loss"] for r in rows if "loss" in r]
    summary = {"method": cfg.method, "model": cfg.model, "steps": cfg.optim.max_steps, "num_workers": ctx.world,
               "sharding": cfg.sharding, "train_loss": losses[-1], "train_loss_first": losses[0],
               "eval_loss": after["eval_loss"], "eval_loss_before": before["eval_loss"],
               "param_bytes_by_rank": held, "param_bytes_total": total_bytes,
               "resumed_from_step": start or None, "train_seconds": train_seconds,
               "steps_per_s": (cfg.optim.max_steps - start) / max(train_seconds, 1e-9),
               "output": "model" if cfg.method == "full" else "adapter"}
    if "eval_accuracy" in after:
        summary.update(eval_accuracy=after["eval_accuracy"], eval_accuracy_before=before["eval_accuracy"],
                       eval_examples=len(test_pairs))
    write_summary(folder, summary)
    log.finish(summary)
    return summary


def micro_batches(examples: list[dict], parts: int, pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    """This worker's share of a step, as ``parts`` padded micro-batches of equal size (every worker runs
    the same number of forward passes, as FSDP needs)."""
    size = len(examples) // parts
    return [collate(examples[i * size:(i + 1) * size], pad_id, device) for i in range(parts)]


def train_step(cfg, model, optimizer, scheduler, micro: list[dict],
               ctx: WorkerContext) -> tuple[float, float, float]:
    """One optimizer step over this worker's micro-batches; returns the global summed loss, its token count,
    and all tokens processed.

    The loss is the mean over every loss-carrying token of the *global* batch (all workers, all
    micro-batches): each micro-batch's summed log-probability is divided by that one count before its
    backward, so the accumulated gradient is exactly the one-pass gradient, however the batch is split.
    Gradients are reduced across workers only after the last micro-batch."""
    local = [float((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
    global_tokens, all_tokens = all_reduce_sum([sum(local), float(sum(b["attention_mask"].sum() for b in micro))],
                                               ctx.device)
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        with gradient_sync(model, sync=i == len(micro) - 1):
            logprob_sum, _ = sequence_logprobs(model, batch)
            # Gradients are averaged over workers, so each worker's share is scaled by the world size.
            loss = -logprob_sum.sum() / max(global_tokens, 1.0) * ctx.world
            loss.backward()
        loss_sum -= float(logprob_sum.detach().sum())
    torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.optim.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = all_reduce_sum([loss_sum], ctx.device)[0]
    return loss_sum, global_tokens, all_tokens


def _window_row(step: int, cfg: SFTConfig, window: dict, scheduler) -> dict:
    seconds = time.perf_counter() - window["t0"]
    return {"step": step, "loss": window["loss"] / max(window["loss_tokens"], 1.0),
            "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / max(seconds, 1e-9),
            "steps_per_s": window["steps"] / max(seconds, 1e-9), "examples_seen": step * cfg.optim.batch_size}


def _progress_line(row: dict, max_steps: int) -> str:
    eta = (max_steps - row["step"]) / max(row["steps_per_s"], 1e-9)
    extra = f" | eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
    return (f"step {row['step']:>5}/{max_steps} | loss {row['loss']:.4f}{extra} | lr {row['learning_rate']:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | eta {eta:,.0f}s")


def _report(cfg, ctx, model, optimizer, scheduler, row, before, save_now) -> None:
    """Report the row to Ray Train (the dashboard), with a checkpoint when one is due."""
    if not save_now:
        ctx.report(row, None)
        return
    with tempfile.TemporaryDirectory(prefix="llmp-ckpt-") as tmp:
        checkpoint.save(tmp, model, optimizer, scheduler, row["step"],
                        {"before": before, "settings": training_settings(cfg)}, cfg.is_adapter)
        ctx.report(row, tmp)


def load_tokenized(cfg: SFTConfig, tokenizer, split: str) -> list[dict]:
    """``split``'s examples as ``input_ids`` + ``completion_mask``, tokenized once before the step loop."""
    examples, where, rows = load_split(cfg.data, split, seed=cfg.optim.seed)
    return tokenize_all(examples, tokenizer, cfg.data.max_length, cfg.data.loss_on, where, rows)


def _evaluate(cfg, model, tokenizer, val_set, test_pairs, labels, ctx) -> dict:
    figures = {"eval_loss": eval_loss(model, val_set, tokenizer, ctx)}
    if labels:
        figures["eval_accuracy"] = choice_accuracy(model, test_pairs, labels, tokenizer, ctx, cfg.data.max_length)
    return figures


def _save_weights(cfg: SFTConfig, model, state: dict, tokenizer, folder: Path) -> None:
    if cfg.method == "full":  # in the configured dtype (FSDP's float32 master weights cast down)
        state = {k: v.to(DTYPES[cfg.dtype]) if v.is_floating_point() else v for k, v in state.items()}
        model.save_pretrained(folder / "model", state_dict=state)
        tokenizer.save_pretrained(folder / "model")
    else:
        model.save_pretrained(folder / "adapter", state_dict=state)
