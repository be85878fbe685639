"""The DPO job on its local config (LoRA on tiny-s, Ray Train in this process): the held-out
chosen-over-rejected margin rises, and the adapter loads in PEFT and changes the base."""

from __future__ import annotations

import json

import pytest
import torch

from llm_platform.config import load_config
from tests.alignment.conftest import CONFIGS


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin(ray_local, tiny_models, tmp_path):
    from peft import PeftModel

    from llm_platform.alignment.preferences import PreferenceData, load_pairs, preference_margins
    from llm_platform.models.loading import load_causal_lm, load_tokenizer
    from llm_platform.alignment import dpo_job as dpo

    base_path = str(tiny_models["tiny-s"])
    summary = dpo.main(load_config(dpo.DPOJobConfig, CONFIGS / "local_dpo.yaml",
                                   [f"model={base_path}", f"output_dir={tmp_path}"]))
    print({k: summary[k] for k in ("margin_before", "margin_after", "implicit_reward_margin", "eval_accuracy",
                                   "train_seconds")})
    assert summary["margin_after"] > summary["margin_before"] + 5
    assert summary["margin_reference"] == pytest.approx(summary["margin_before"], abs=1e-3)  # LoRA starts at zero
    assert summary["eval_accuracy"] >= 0.9 and summary["implicit_reward_margin"] > 0.5
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] / 2

    tokenizer = load_tokenizer(base_path)
    held_out = load_pairs(PreferenceData(eval_limit=40), "test")
    base = load_causal_lm(base_path)
    before = preference_margins(base, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    after = preference_margins(tuned, tokenizer, held_out)
    assert (after > before).float().mean() >= 0.9
    ids = tokenizer("<s><|user|>\nAny advice on tea?</s>\n<|assistant|>\n", add_special_tokens=False,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = tuned(ids).logits
        with tuned.disable_adapter():
            plain = tuned(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
