"""`llmp plan`: memory to serve or train a model of a given size, component by component.

The course's rules of thumb, made exact:
- Serving holds the weights: 4 bytes per parameter in fp32, 2 in fp16/bf16, 1 in int8, 0.5 in
  4-bit. 7B parameters in fp32 are 28 GB; in fp16 14 GB; in 4-bit 3.5 GB.
- Full fine-tuning with Adam adds a gradient per weight and Adam's two moments in fp32 (8 bytes
  per parameter): 4 + 4 + 8 = 16 bytes per parameter in fp32, 112 GB for 7B, before activations.
  In fp16/bf16, mixed precision keeps an fp32 master copy (4 bytes) beside the 16-bit weights and
  gradients: 2 + 2 + 4 + 8 = 16 bytes again (the ZeRO paper's 16 bytes per parameter). Half
  precision saves activation memory and time there, not weight memory.
- LoRA freezes the base and trains r * (in + out) parameters per adapted linear layer, kept in
  fp32 with their gradients and Adam moments (16 bytes each). QLoRA is LoRA on a 4-bit base.
- The KV cache holds a key and a value per layer, per token of context, per sequence:
  2 * layers * context * batch * kv_heads * head_dim * bytes (fp32 for fp32 models, else 16-bit).

Not included: activations (they depend on batch, sequence length, attention kernel and
checkpointing) and the block-wise scales of quantized weights (about 1-3% more). GB are 10^9
bytes, as the course quotes them; the total is also given in GiB (2^30), as torch reports memory.

The LoRA and KV-cache figures need the model's shape: read from ``--model`` (a checkpoint or its
config.json), given with ``--layers``/``--hidden``/..., or else estimated from the parameter
count with Llama's proportions (params ~ 12 * layers * hidden^2, hidden = 128 * layers), which
gives Llama-2's shapes for 7B (32 x 4096) and 13B (40 x 5120).

    llmp plan --params 7e9 [--method inference|full|lora|qlora|all] [--dtype fp32|fp16|bf16|int8|4bit|all]
              (torch's names work too: float32, float16, bfloat16)
              [--context 4096 --batch 8] [--layers 32 --hidden 4096 --kv-heads 8] [--lora-rank 16]
    llmp plan --model artifacts/models/tiny-l --json plan.json --plot plan.png
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from llm_platform.config import FrozenConfig, build_config
from llm_platform.dtypes import short_dtype
from llm_platform.evaluation import EvaluationError
from llm_platform.evaluation.output import pyplot, save
from llm_platform.report import format_table

Method = Literal["inference", "full", "lora", "qlora"]
# Short names in the plan (as the course quotes them); torch's names are accepted and shortened.
Dtype = Annotated[Literal["fp32", "fp16", "bf16", "int8", "4bit"],
                  BeforeValidator(lambda v: short_dtype(v) if isinstance(v, str) else v)]
METHODS: tuple[Method, ...] = ("inference", "full", "lora", "qlora")
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "4bit": 0.5}
# Weights each method can use. Quantized weights take no gradient steps, so full fine-tuning needs
# floating-point weights; LoRA on a 4-bit base is what QLoRA names.
DTYPES_FOR = {"inference": ("fp32", "fp16", "bf16", "int8", "4bit"), "full": ("fp32", "fp16", "bf16"),
              "lora": ("fp32", "fp16", "bf16", "int8"), "qlora": ("4bit",)}
ADAM_BYTES = 8  # two fp32 moments per trainable parameter
MASTER_BYTES = 4  # fp32 copy of 16-bit weights under mixed precision
ADAPTER_BYTES = 4  # PEFT keeps adapter weights (and so their gradients) in fp32
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("weights", "gradients", "optimizer", "adapter", "kv_cache")
GB, GIB = 1e9, 2 ** 30


class ModelShape(FrozenConfig):
    """A Llama-style decoder's dimensions: what LoRA sizes and the KV cache depend on."""

    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    """Key/value heads: fewer than ``heads`` under grouped-query attention."""
    head_dim: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    """Width of the MLP (gate_proj/up_proj outputs)."""
    source: str = "given"
    """Where the shape came from: given, a model path, or estimated from the parameter count."""

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``module -> (in, out)`` for each linear layer of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


class PlanSpec(FrozenConfig):
    params: float = Field(gt=0)
    """Parameter count of the base model."""
    shape: ModelShape
    methods: tuple[Method, ...] = METHODS
    dtypes: tuple[Dtype, ...] = tuple(DTYPE_BYTES)
    """Base weight types; each method is planned for the ones it can use."""
    context: int = Field(2048, gt=0)
    """Tokens per sequence held in the KV cache (prompt plus completion)."""
    batch: int = Field(1, gt=0)
    """Sequences served at once."""
    lora_rank: int = Field(8, gt=0)
    lora_targets: tuple[Literal[LINEAR_MODULES], ...] = Field(("q_proj", "v_proj"), min_length=1)
    """Linear layers LoRA adapts in every decoder layer (PEFT's default for Llama: q_proj, v_proj)."""


def estimate_shape(params: float, layers: int | None = None, hidden: int | None = None, heads: int | None = None,
                   kv_heads: int | None = None, head_dim: int | None = None,
                   intermediate: int | None = None, source: str = "given") -> ModelShape:
    """Fill in what is not given with Llama's proportions (see the module docstring)."""
    if hidden is None and layers is None:
        source = "estimated from the parameter count"
        # params ~ 12 * layers * hidden^2 with layers = hidden / 128, rounded to a multiple of 256.
        hidden = 256 * max(1, round((params * 128 / 12) ** (1 / 3) / 256))
    hidden = hidden or 128 * layers
    layers = layers or max(1, hidden // 128)
    if head_dim is None:
        head_dim = hidden // heads if heads else min(128, hidden)
    heads = heads or max(1, hidden // head_dim)
    # Llama's MLP: 8/3 of the hidden size, rounded up to a multiple of 256.
    intermediate = intermediate or 256 * math.ceil(8 * hidden / 3 / 256)
    return ModelShape(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim,
                      intermediate=intermediate, source=source)


def shape_of_model(model: str) -> tuple[int, ModelShape]:
    """Parameter count and shape of a checkpoint (or hub id), read from its config."""
    from llm_platform.evaluation.models import count_parameters
    from llm_platform.models.loading import load_model_config

    config = load_model_config(model)
    params = count_parameters(model)
    try:
        hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    except AttributeError as exc:
        raise EvaluationError(f"cannot read the shape of {model} ({exc}); give --params and --layers/--hidden") \
            from None
    shape = estimate_shape(
        params, layers=layers, hidden=hidden, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        intermediate=getattr(config, "intermediate_size", None), source=model)
    return params, shape


def lora_parameters(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters: A (rank x in) plus B (out x rank) per target, in every layer."""
    linears = shape.linear_shapes()
    return shape.layers * sum(rank * (linears[t][0] + linears[t][1]) for t in targets)


def plan(spec: PlanSpec) -> dict:
    """Bytes per component for every (method, weight type) pair the spec asks for and that exists."""
    wanted = [(m, d) for m in spec.methods for d in spec.dtypes if d in DTYPES_FOR[m]]
    if not wanted:
        allowed = "; ".join(f"{m} runs on {', '.join(DTYPES_FOR[m])}" for m in spec.methods)
        raise EvaluationError(f"no plan for {', '.join(spec.methods)} on {', '.join(spec.dtypes)} weights: "
                              f"{allowed}. Quantized weights take no gradient steps (fine-tune them with lora "
                              f"on int8, or qlora), and LoRA on a 4-bit base is qlora")
    return {"params": spec.params, "shape": spec.shape.model_dump(), "context": spec.context, "batch": spec.batch,
            "lora_rank": spec.lora_rank, "lora_targets": list(spec.lora_targets),
            "rows": [memory(spec, method, dtype) for method, dtype in wanted]}


def memory(spec: PlanSpec, method: str, dtype: str) -> dict:
    """One row of the plan, in bytes."""
    row = dict.fromkeys(COMPONENTS, 0.0)
    row["weights"] = spec.params * DTYPE_BYTES[dtype]
    if method == "inference":
        shape = spec.shape
        kv_bytes = 4 if dtype == "fp32" else 2  # quantized-weight models still compute in 16 bit
        row["kv_cache"] = 2 * shape.layers * spec.context * spec.batch * shape.kv_heads * shape.head_dim * kv_bytes
        trainable = 0
    elif method == "full":
        trainable = spec.params
        row["gradients"] = spec.params * DTYPE_BYTES[dtype]
        row["optimizer"] = spec.params * (ADAM_BYTES + (MASTER_BYTES if dtype != "fp32" else 0))
    else:
        trainable = lora_parameters(spec.shape, spec.lora_rank, spec.lora_targets)
        row["adapter"] = row["gradients"] = trainable * ADAPTER_BYTES
        row["optimizer"] = trainable * ADAM_BYTES
    total = sum(row[c] for c in COMPONENTS)
    return {"method": method, "dtype": dtype, "trainable_params": trainable, **row, "total": total}


def table(summary: dict) -> str:
    shape = summary["shape"]
    rows = [{"method": r["method"], "dtype": r["dtype"], "trainable": _count(r["trainable_params"]) or "-",
             **{f"{c}_GB": _gb(r[c]) for c in (*COMPONENTS, "total")}, "total_GiB": r["total"] / GIB}
            for r in summary["rows"]]
    return "\n".join([
        f"Memory for {_count(summary['params'])} parameters. Shape ({shape['source']}): {shape['layers']} layers, "
        f"hidden {shape['hidden']}, {shape['heads']} heads ({shape['kv_heads']} KV) x {shape['head_dim']}, "
        f"MLP {shape['intermediate']}.\nKV cache: context {summary['context']} x batch {summary['batch']}. "
        f"LoRA: r={summary['lora_rank']} on {', '.join(summary['lora_targets'])}.",
        format_table(rows),
        "GB = 10^9 bytes, GiB = 2^30. Training figures exclude activations. Optimizer: Adam's two fp32 moments,\n"
        "plus fp32 master weights for fp16/bf16 full fine-tuning (mixed precision)."])


def _gb(value: float) -> float | str:
    return value / GB if value else "-"


def _count(n: float) -> str:
    """7e9 -> 7B, 4194304 -> 4.19M; zero -> an empty string."""
    if not n:
        return ""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def plot(summary: dict, path: str) -> None:
    """One stacked bar per (method, weights) pair, a segment per component."""
    plt = pyplot()
    rows = summary["rows"]
    labels = [f"{r['method']}\n{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4.5))
    bottom = [0.0] * len(rows)
    for component in COMPONENTS:
        values = [r[component] / GB for r in rows]
        ax.bar(labels, values, bottom=bottom, label=component)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:.3g}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.08 * max(bottom))  # room for the totals above the tallest bar
    ax.set_ylabel("GB (10^9 bytes)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Memory for {_count(summary['params'])} parameters (activations not included)")
    save(fig, path)


def spec_from_args(args) -> PlanSpec:
    """The spec `llmp plan` asks for: parameters and shape from --model and/or the flags."""
    if args.params is None and args.model is None:
        raise EvaluationError("give --params (e.g. 7e9) or --model (a checkpoint folder or hub id)")
    dims = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "intermediate": args.intermediate}
    if args.model:
        params, shape = shape_of_model(args.model)
        given = {k: v for k, v in dims.items() if v is not None}
        shape = shape.model_copy(update=given) if given else shape
        params = args.params or params
    else:
        params, shape = args.params, estimate_shape(args.params, **dims)
    return build_config(PlanSpec, {
        "params": params, "shape": shape.model_dump(), "context": args.context, "batch": args.batch,
        "methods": METHODS if args.method == "all" else (args.method,),
        "dtypes": tuple(DTYPE_BYTES) if args.dtype == "all" else (args.dtype,),
        "lora_rank": args.lora_rank, "lora_targets": _targets(args.lora_targets)}, source="llmp plan arguments")


def _targets(text: str) -> tuple[str, ...]:
    if text == "all-linear":
        return LINEAR_MODULES
    return tuple(t.strip() for t in text.split(",") if t.strip())
