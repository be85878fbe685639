"""Checking PEFT adapters against their base before any engine touches them.

An adapter is a PEFT folder: ``adapter_config.json`` plus ``adapter_model.safetensors``.
LoRA adapters are served as LoRA; prompt-tuning adapters as soft prompts. Both are
checked here, tensor shape by tensor shape, so a mismatch is reported as "q_proj
expects 256 inputs, adapter has 128" rather than as a failure inside vLLM.
Pickled weights (``adapter_model.bin``) are refused: unpickling runs code. The fields
of ``adapter_config.json`` that vLLM and PEFT read are type-checked (pydantic), and
every tensor must be a finite floating-point one: an adapter holding NaN or Inf would
turn every answer it serves into garbage without any error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch and transformers are imported where a check needs them: `llmp serve` imports this
    import torch  # module (through the ingress) before it starts Ray, and they took ~7 s of that here
    from transformers import PretrainedConfig

from llm_platform.engine.protocol import AdapterKind
from llm_platform.errors import AdapterError, PlatformError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KINDS = {"LORA": "lora", "PROMPT_TUNING": "soft_prompt"}
FLOAT_DTYPES = {"F16", "BF16", "F32"}
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


class _PeftFields(BaseModel):
    """The fields every PEFT config has that serving reads (strict: "r": "8" is refused, not coerced)."""

    model_config = ConfigDict(extra="allow", strict=True)
    peft_type: str
    base_model_name_or_path: str | None = None


class _LoraFields(_PeftFields):
    """What vLLM's PEFTHelper reads, typed; features it cannot serve are refused here rather than in vLLM."""

    r: int = Field(ge=1)
    lora_alpha: float
    target_modules: list[str] | str | None
    use_rslora: bool = False
    use_dora: bool | None = False
    lora_bias: bool | None = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] | None = None
    alpha_pattern: dict[str, float] | None = None
    layer_replication: list | None = None


class _PromptTuningFields(_PeftFields):
    num_virtual_tokens: int | None = Field(None, ge=1)
    num_transformer_submodules: int | None = Field(None, ge=1)
    token_dim: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter."""

    kind: AdapterKind
    rank: int | None
    target_modules: tuple[str, ...]
    num_virtual_tokens: int | None
    base_model_name: str | None


def inspect_adapter(path: str | Path, base_config: PretrainedConfig, max_rank: int = 64,
                    expected_kind: AdapterKind | None = None,
                    max_soft_prompt_tokens: int | None = None) -> AdapterInfo:
    """Validate the adapter at ``path`` against ``base_config``; raise :class:`AdapterError` if unfit."""
    folder = Path(path)
    peft_config = _read_peft_config(folder)
    peft_type = peft_config.get("peft_type", "")
    kind = PEFT_KINDS.get(peft_type.upper()) if isinstance(peft_type, str) else None
    if kind is None:
        raise AdapterError(f"adapter {folder}: peft_type {peft_type!r} is not supported; "
                           f"expected LORA or PROMPT_TUNING")
    if expected_kind is not None and kind != expected_kind:
        raise AdapterError(f"adapter {folder} is a {kind} adapter, not {expected_kind}")
    fields = _typed_fields(folder, peft_config, _LoraFields if kind == "lora" else _PromptTuningFields)
    shapes = _tensor_shapes(folder)
    if kind == "lora":
        info = _check_lora(folder, fields, shapes, base_config, max_rank)
    else:
        info = _check_soft_prompt(folder, fields, shapes, base_config, max_soft_prompt_tokens)
    _check_finite(folder)
    return info


def prepare_checks(base_config: PretrainedConfig) -> None:
    """Do ahead of time what the first check of a LoRA adapter for this base does: import torch and
    transformers (seconds) and read the base's layer shapes (cached)."""
    _base_linear_shapes(base_config)


def lora_slot_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank`` (vLLM 0.32 takes only
    1, 8, 16, 32, 64, 128, 256, 320, 512; ``max(rank, 8)`` gave 12 for a rank-12 policy, which it refuses)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise PlatformError(f"LoRA rank {rank}: vLLM serves LoRA ranks up to {allowed[-1]}")
    return fitting[0]


def lora_rank_of(peft_config: dict | _LoraFields) -> int:
    """The largest rank of a LoRA adapter's ``adapter_config.json`` (``r``, or a larger one in ``rank_pattern``)."""
    fields = peft_config if isinstance(peft_config, _LoraFields) else _LoraFields.model_validate(peft_config)
    return max([fields.r, *(fields.rank_pattern or {}).values()])


def load_soft_prompt(path: str | Path) -> torch.Tensor:
    """The ``[num_virtual_tokens, hidden]`` embeddings of a prompt-tuning adapter, float32."""
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        return f.get_tensor("prompt_embeddings").float()


def _read_peft_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise AdapterError(f"adapter path {folder} does not exist or is not a folder")
    if not (folder / WEIGHTS_FILE).is_file():
        if (folder / "adapter_model.bin").exists():
            raise AdapterError(f"adapter {folder} has pickled weights (adapter_model.bin), which can run code "
                               f"when loaded; save it with safetensors (save_pretrained(safe_serialization=True))")
        raise AdapterError(f"adapter {folder} has no {WEIGHTS_FILE}")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"adapter {folder} has no {CONFIG_FILE}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {folder}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {folder}: {CONFIG_FILE} must hold a JSON object")
    return config


def _typed_fields(folder: Path, peft_config: dict, model: type[_PeftFields]):
    try:
        fields = model.model_validate(peft_config)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AdapterError(f"adapter {folder}: {CONFIG_FILE} field {where!r}: {first['msg']} "
                           f"(got {first.get('input')!r})") from None
    if isinstance(fields, _LoraFields):
        unsupported = [name for name, on in [("use_dora", fields.use_dora), ("lora_bias", fields.lora_bias),
                                             ("bias", fields.bias != "none"), ("modules_to_save", fields.modules_to_save),
                                             ("layer_replication", fields.layer_replication)] if on]
        if unsupported:
            raise AdapterError(f"adapter {folder}: {CONFIG_FILE} sets {', '.join(unsupported)}, which vLLM cannot "
                               f"serve (plain LoRA only)")
        if not math.isfinite(fields.lora_alpha):
            raise AdapterError(f"adapter {folder}: {CONFIG_FILE} field 'lora_alpha' must be finite")
    return fields


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            dtypes = {key: s.get_dtype() for key, s in slices.items()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter {folder}: {WEIGHTS_FILE} is corrupt or unreadable ({exc})") from None
    wrong = {key: dtype for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES}
    if wrong:
        key, dtype = next(iter(wrong.items()))
        raise AdapterError(f"adapter {folder}: tensor {key!r} has dtype {dtype}; adapters hold "
                           f"{', '.join(sorted(FLOAT_DTYPES))} weights")
    return shapes


def _check_finite(folder: Path) -> None:
    """Every weight finite; tensors are read one at a time (sizes were bounded before this runs)."""
    import torch

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise AdapterError(f"adapter {folder}: tensor {key!r} holds {bad} NaN or infinite values")


def _module_rank(folder: Path, fields: _LoraFields, module: str) -> int:
    """The rank PEFT gives ``module``: its ``rank_pattern`` entry by PEFT's own matching rule, else ``r``."""
    from peft.utils.other import get_pattern_key

    pattern = fields.rank_pattern or {}
    for key in pattern:
        try:
            re.compile(key)
        except re.error as exc:
            raise AdapterError(f"adapter {folder}: rank_pattern key {key!r} is not a valid pattern ({exc})") from None
    return pattern.get(get_pattern_key(pattern.keys(), module), fields.r)


def _check_lora(folder: Path, fields: _LoraFields, shapes: dict, base_config: PretrainedConfig,
                max_rank: int) -> AdapterInfo:
    rank = lora_rank_of(fields)
    if rank > max_rank:
        try:
            needed = f"engine.max_lora_rank >= {lora_slot_rank(rank)} in the serve config"
        except PlatformError as exc:
            raise AdapterError(f"adapter {folder}: {exc}") from None
        raise AdapterError(f"adapter {folder}: LoRA rank {rank} is above this model's max_lora_rank {max_rank}; "
                           f"serving it needs {needed} (a server left unset picks it at start from the adapters "
                           f"registered then)")
    linears = _base_linear_shapes(base_config)
    modules = set()
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {folder}: tensor {key!r} is not a LoRA A/B weight "
                               f"(modules_to_save and embedding adapters cannot be served)")
        module, ab = match["module"], match["ab"]
        if module not in linears:
            raise AdapterError(f"adapter {folder}: targets {module!r}, which the base model does not have "
                               f"as a linear layer (the adapter was made for another architecture)")
        in_features, out_features = linears[module]
        module_rank = _module_rank(folder, fields, module)
        expected = (module_rank, in_features) if ab == "A" else (out_features, module_rank)
        if shape != expected:
            raise AdapterError(f"adapter {folder}: {module} lora_{ab} has shape {list(shape)}, the base needs "
                               f"{list(expected)} (was it trained on a base of another size?)")
        modules.add(module.rsplit(".", 1)[-1])
    if not modules:
        raise AdapterError(f"adapter {folder}: holds no LoRA weights")
    return AdapterInfo("lora", rank, tuple(sorted(modules)), None, fields.base_model_name_or_path)


def _check_soft_prompt(folder: Path, fields: _PromptTuningFields, shapes: dict, base_config: PretrainedConfig,
                       max_tokens: int | None) -> AdapterInfo:
    if "prompt_embeddings" not in shapes:
        raise AdapterError(f"adapter {folder}: a prompt-tuning adapter must hold 'prompt_embeddings'")
    tokens, hidden = (shapes["prompt_embeddings"] + (0, 0))[:2]
    if len(shapes["prompt_embeddings"]) != 2 or hidden != base_config.hidden_size:
        raise AdapterError(f"adapter {folder}: soft prompt has shape {list(shapes['prompt_embeddings'])}, the base "
                           f"needs [num_virtual_tokens, {base_config.hidden_size}]")
    if (fields.num_transformer_submodules or 1) != 1:
        raise AdapterError(f"adapter {folder}: only decoder-only soft prompts can be served")
    if max_tokens is not None and tokens > max_tokens:
        raise AdapterError(f"adapter {folder}: soft prompt has {tokens} virtual tokens; at most {max_tokens} are "
                           f"accepted (limits.max_soft_prompt_tokens)")
    return AdapterInfo("soft_prompt", None, (), tokens, fields.base_model_name_or_path)


_LINEAR_CACHE: dict[str, dict[str, tuple[int, int]]] = {}


def _base_linear_shapes(base_config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """``module name -> (in, out)`` of every linear layer, from a weightless (meta) copy of the base."""
    cache_key = base_config.to_json_string()
    if cache_key not in _LINEAR_CACHE:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
        _LINEAR_CACHE[cache_key] = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear)}
    return _LINEAR_CACHE[cache_key]
