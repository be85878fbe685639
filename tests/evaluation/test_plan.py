"""The memory planner against the course's figures, hand calculations, and PEFT's own count."""

from argparse import Namespace

import pytest

from llm_platform.errors import ConfigError
from llm_platform.evaluation import EvaluationError
from llm_platform.evaluation.plan import GB, GIB, PlanSpec, estimate_shape, plan, spec_from_args


def args(**overrides) -> Namespace:
    defaults = dict(params=None, model=None, method="all", dtype="all", context=2048, batch=1, layers=None,
                    hidden=None, heads=None, kv_heads=None, head_dim=None, intermediate=None, lora_rank=8,
                    lora_targets="q_proj,v_proj")
    return Namespace(**{**defaults, **overrides})


def rows_of(**overrides) -> dict[tuple[str, str], dict]:
    return {(r["method"], r["dtype"]): r for r in plan(spec_from_args(args(**overrides)))["rows"]}


def test_seven_billion_parameters_match_the_course():
    rows = rows_of(params=7e9)
    # GB here are 10^9 bytes, as the course quotes them: 7e9 parameters x 4 bytes = 28 GB (26.1 GiB).
    assert rows[("inference", "fp32")]["weights"] == 28 * GB
    assert rows[("inference", "fp32")]["weights"] / GIB == pytest.approx(26.08, abs=0.01)
    assert rows[("inference", "fp16")]["weights"] == 14 * GB
    assert rows[("inference", "int8")]["weights"] == 7 * GB
    assert rows[("inference", "4bit")]["weights"] == 3.5 * GB
    full = rows[("full", "fp32")]
    # weights 4 + gradients 4 + Adam's two moments 8 = 16 bytes per parameter: 112 GB before activations.
    assert (full["weights"], full["gradients"], full["optimizer"]) == (28 * GB, 28 * GB, 56 * GB)
    assert full["total"] == 112 * GB
    # Mixed precision: 2 + 2 + (4 master + 8 Adam) = 16 bytes per parameter again.
    assert rows[("full", "bf16")]["total"] == 112 * GB
    assert ("full", "int8") not in rows and ("lora", "4bit") not in rows and ("qlora", "4bit") in rows


def test_lora_parameters_and_kv_cache_by_hand():
    spec = spec_from_args(args(params=7e9, context=4096))
    # 7e9 is given Llama-2-7B's shape: 32 layers of hidden 4096, 32 heads of 128.
    assert (spec.shape.layers, spec.shape.hidden, spec.shape.heads, spec.shape.head_dim) == (32, 4096, 32, 128)
    assert spec.shape.intermediate == 11008
    rows = {(r["method"], r["dtype"]): r for r in plan(spec)["rows"]}
    # LoRA r=8 on q_proj and v_proj (4096 -> 4096): 32 layers x 2 modules x 8 x (4096 + 4096).
    lora = rows[("lora", "fp16")]
    assert lora["trainable_params"] == 32 * 2 * 8 * (4096 + 4096) == 4_194_304
    assert lora["adapter"] == lora["gradients"] == 4 * 4_194_304 and lora["optimizer"] == 8 * 4_194_304
    assert rows[("qlora", "4bit")]["total"] == 3.5 * GB + 16 * 4_194_304
    # KV cache, fp16: key + value x 32 layers x 4096 tokens x 1 sequence x 32 heads x 128 x 2 bytes = 2 GiB.
    assert rows[("inference", "fp16")]["kv_cache"] == 2 * 32 * 4096 * 32 * 128 * 2 == 2 * GIB
    assert rows[("inference", "fp32")]["kv_cache"] == 4 * GIB
    # Grouped-query attention with 8 KV heads and a batch of 4 sequences.
    gqa = rows_of(params=7e9, context=4096, batch=4, kv_heads=8)[("inference", "fp16")]
    assert gqa["kv_cache"] == 2 * 32 * 4096 * 4 * 8 * 128 * 2


def test_lora_parameters_agree_with_peft_on_a_real_model(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = spec_from_args(args(model=str(tiny_models["tiny-m"]), lora_rank=4, lora_targets="all-linear",
                               method="lora", dtype="fp32"))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["tiny-m"]),
                                LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    (row,) = plan(spec)["rows"]
    assert row["trainable_params"] == trainable
    assert spec.params == total - trainable  # the base's own count, read from the checkpoint


def test_bad_requests_are_refused_clearly():
    with pytest.raises(EvaluationError, match="full runs on fp32, fp16, bf16"):
        plan(spec_from_args(args(params=7e9, method="full", dtype="int8")))
    with pytest.raises(EvaluationError, match="give --params"):
        spec_from_args(args())
    with pytest.raises(ConfigError, match="lora_targets"):
        spec_from_args(args(params=7e9, lora_targets="q_proj,attn"))
    with pytest.raises(ValueError, match="dtypes"):
        PlanSpec(params=7e9, shape=estimate_shape(7e9), dtypes=("fp8",))
