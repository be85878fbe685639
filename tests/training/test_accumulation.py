"""Gradient accumulation and activation checkpointing in the SFT step, on a tiny model in one process:
k micro-batches train exactly as one batch of k times the size, and checkpointing changes memory, not
gradients. (Under FSDP with two workers: tests/training/test_sft.py's FSDP test.)"""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from llm_platform.config import load_config
from llm_platform.errors import ConfigError
from llm_platform.models.loading import load_tokenizer
from llm_platform.training.config import SFTConfig
from llm_platform.training.distributed import WorkerContext
from llm_platform.training.evaluate import collate, sequence_logprobs
from llm_platform.training.loop import load_tokenized, micro_batches, train_step
from llm_platform.training.methods import build_model, trainable_parameters
from tests.training.conftest import CONFIGS


def _config(model, method: str, **overrides) -> SFTConfig:
    settings = {"model": str(model), "method": method, "lora": {"dropout": 0.0},
                "data": {"source": "synthetic:sentiment", "train_limit": 64, "eval_limit": 8, "max_length": 64},
                "optim": {"learning_rate": 0.1, "warmup_ratio": 0.0, "max_steps": 3, "batch_size": 8}}
    for key, value in overrides.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    return SFTConfig.model_validate(settings)


def _train(cfg: SFTConfig, examples: list[dict], pad_id: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``max_steps`` optimizer steps from the same start; the losses and the trained weights.

    Plain SGD: a weight moves by its gradient times the rate, so equal gradients give equal weights. AdamW's
    first steps move a weight by about the rate whatever the size of its gradient, so one whose gradient is
    at rounding level lands anywhere within that: on an AMD EPYC machine, one of 8192 LoRA-B elements differed
    by 3.5e-5 after three AdamW steps at 1e-3 while the losses agreed to 1e-7."""
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=cfg.optim.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, cfg.optim.max_steps)
    losses, ctx, size = [], WorkerContext(), cfg.optim.batch_size
    for step in range(cfg.optim.max_steps):
        micro = micro_batches(examples[step * size:(step + 1) * size], cfg.optim.gradient_accumulation_steps,
                              pad_id, ctx.device)
        loss_sum, tokens, _ = train_step(cfg, model, optimizer, scheduler, micro, ctx)
        losses.append(loss_sum / tokens)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_k_micro_batches_train_exactly_as_one_batch(method, tiny_models):
    """Examples of different lengths (so micro-batches hold different numbers of loss tokens: a loss
    averaged per micro-batch would differ) through 3 steps of 1 x 8 and of 4 x 2."""
    cfg = _config(tiny_models["tiny-s"], method)
    tokenizer = load_tokenizer(cfg.model)
    examples = load_tokenized(cfg, tokenizer, "train")[:24]
    assert len({sum(e["completion_mask"]) for e in examples}) > 1 or len({len(e["input_ids"]) for e in examples}) > 1
    one_losses, one = _train(cfg, examples, tokenizer.pad_token_id)
    acc_losses, acc = _train(_config(tiny_models["tiny-s"], method, optim={"gradient_accumulation_steps": 4}),
                             examples, tokenizer.pad_token_id)
    assert acc_losses == pytest.approx(one_losses, rel=1e-5)
    start = {k: v for k, v in build_model(cfg).named_parameters() if v.requires_grad}
    for name, value in one.items():
        assert torch.allclose(acc[name], value, atol=1e-5, rtol=1e-4), name
    moved = max(float((one[k] - start[k].detach()).abs().max()) for k in one)
    assert moved > 1e-4  # the steps did train: equality is not two unchanged copies


def _layer_calls_and_grads(cfg: SFTConfig, batch: dict) -> tuple[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(cfg)
    calls = []
    layer = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")][0]
    layer.register_forward_pre_hook(lambda *args: calls.append(1))  # entry: a recompute may stop early
    logprob_sum, counts = sequence_logprobs(model, batch)
    (-logprob_sum.sum() / counts.sum()).backward()
    return len(calls), {k: v.grad for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "prompt_tuning"])
def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradients(method, tiny_models):
    cfg = _config(tiny_models["tiny-s"], method)
    tokenizer = load_tokenizer(cfg.model)
    batch = collate(load_tokenized(cfg, tokenizer, "train")[:4], tokenizer.pad_token_id, torch.device("cpu"))
    plain_calls, plain = _layer_calls_and_grads(cfg, batch)
    ckpt_calls, ckpt = _layer_calls_and_grads(cfg.model_copy(update={"gradient_checkpointing": True}), batch)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer ran again in the backward pass: it was checkpointed
    assert plain.keys() == ckpt.keys() and all(g is not None for g in ckpt.values())
    for name, grad in plain.items():
        assert torch.allclose(ckpt[name], grad, atol=1e-6, rtol=1e-5), name
    assert max(float(g.abs().max()) for g in plain.values()) > 0


def test_accumulation_must_divide_each_workers_share():
    cfg = load_config(SFTConfig, CONFIGS / "local_lora.yaml", ["optim.batch_size=16", "scaling.num_workers=2",
                                                               "optim.gradient_accumulation_steps=4"])
    assert cfg.optim.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(3\) must divide .* = 8"):
        load_config(SFTConfig, CONFIGS / "local_lora.yaml", ["optim.batch_size=16", "scaling.num_workers=2",
                                                             "optim.gradient_accumulation_steps=3"])


def test_trl_trainers_get_accumulation_and_checkpointing_as_their_own_arguments(tmp_path):
    """The reward and DPO jobs pass both to TRL's configs (the Trainer accumulates and checkpoints);
    ``optim.batch_size`` stays the effective batch."""
    from trl import DPOConfig, RewardConfig

    from llm_platform.alignment.config import DPOJobConfig
    from llm_platform.alignment.preference_training import trainer_arguments

    cfg = load_config(DPOJobConfig, CONFIGS / "local_dpo.yaml",
                      ["optim.batch_size=16", "optim.gradient_accumulation_steps=4", "gradient_checkpointing=true"])
    assert trainer_arguments(cfg.optim, cfg.scaling.model_copy(update={"num_workers": 2}), cfg.dtype,
                             str(tmp_path), True)["per_device_train_batch_size"] == 2
    arguments = trainer_arguments(cfg.optim, cfg.scaling, cfg.dtype, str(tmp_path), cfg.gradient_checkpointing)
    del arguments["ddp_backend"]  # outside a Ray Train worker there is no process group to join
    for config_class in (RewardConfig, DPOConfig):
        args = config_class(**arguments)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
        assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
