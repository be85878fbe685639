"""Fine-tuned variants for the generation tests, trained here in plain torch + PEFT.

The fine-tuning jobs (train_jobs.sft) are not needed to test the evaluation: a few dozen steps
on the synthetic DialogSum summaries move tiny-s enough that its summaries (and ROUGE) change.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from llm_platform.data.loader import synthetic_split
from llm_platform.data.templates import summary_pair


def train_on_summaries(model, tokenizer, steps: int, lr: float, batch_size: int = 16, seed: int = 0) -> list[float]:
    """Causal-LM loss on the summary only (the prompt is masked), right-padded batches; returns losses."""
    records = synthetic_split("dialogsum", "train")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    pad = tokenizer.pad_token_id
    losses = []
    model.train()
    for _ in range(steps):
        pairs = [summary_pair(r, template=0) for r in rng.sample(records, batch_size)]
        prompts = [tokenizer(p.prompt)["input_ids"] for p in pairs]
        answers = [tokenizer(p.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for p in pairs]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers))
        ids = torch.tensor([p + a + [pad] * (width - len(p) - len(a)) for p, a in zip(prompts, answers)])
        labels = torch.tensor([[-100] * len(p) + a + [-100] * (width - len(p) - len(a))
                               for p, a in zip(prompts, answers)])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != pad), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Models this small gain nothing from a second thread, and on a shared 2-core machine a second
    OpenMP thread waits on cores another process holds (training here ran 4x slower with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="package")
def summary_variants(tiny_models, tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """``{"lora": PEFT adapter dir, "full": model dir}``, both tiny-s fine-tuned on summaries."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("variants")
    base = tiny_models["tiny-s"]
    tokenizer = AutoTokenizer.from_pretrained(base)

    full = AutoModelForCausalLM.from_pretrained(base)
    losses = train_on_summaries(full, tokenizer, steps=40, lr=3e-3)
    assert losses[-1] < losses[0] / 2
    full.save_pretrained(root / "full" / "model")
    tokenizer.save_pretrained(root / "full" / "model")

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], task_type="CAUSAL_LM"))
    losses = train_on_summaries(lora, tokenizer, steps=40, lr=1e-2)
    assert losses[-1] < losses[0] / 2
    lora.save_pretrained(root / "lora")
    return {"lora": root / "lora", "full": root / "full"}
