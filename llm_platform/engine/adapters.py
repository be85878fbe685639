"""Checking PEFT adapters against their base before any engine touches them.

An adapter is a PEFT folder: ``adapter_config.json`` plus ``adapter_model.safetensors``.
LoRA adapters are served as LoRA; prompt-tuning adapters as soft prompts. Both are
checked here, tensor shape by tensor shape, so a mismatch is reported as "q_proj
expects 256 inputs, adapter has 128" rather than as a failure inside vLLM.
Pickled weights (``adapter_model.bin``) are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig

from llm_platform.engine.protocol import AdapterKind
from llm_platform.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KINDS = {"LORA": "lora", "PROMPT_TUNING": "soft_prompt"}
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter."""

    kind: AdapterKind
    rank: int | None
    target_modules: tuple[str, ...]
    num_virtual_tokens: int | None
    base_model_name: str | None


def inspect_adapter(path: str | Path, base_config: PretrainedConfig, max_rank: int = 64,
                    expected_kind: AdapterKind | None = None) -> AdapterInfo:
    """Validate the adapter at ``path`` against ``base_config``; raise :class:`AdapterError` if unfit."""
    folder = Path(path)
    peft_config = _read_peft_config(folder)
    kind = PEFT_KINDS.get(str(peft_config.get("peft_type", "")).upper())
    if kind is None:
        raise AdapterError(f"adapter {folder}: peft_type {peft_config.get('peft_type')!r} is not supported; "
                           f"expected LORA or PROMPT_TUNING")
    if expected_kind is not None and kind != expected_kind:
        raise AdapterError(f"adapter {folder} is a {kind} adapter, not {expected_kind}")
    shapes = _tensor_shapes(folder)
    if kind == "lora":
        return _check_lora(folder, peft_config, shapes, base_config, max_rank)
    return _check_soft_prompt(folder, peft_config, shapes, base_config)


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


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"adapter {folder}: {WEIGHTS_FILE} is corrupt or unreadable ({exc})") from None


def _check_lora(folder: Path, peft_config: dict, shapes: dict, base_config: PretrainedConfig,
                max_rank: int) -> AdapterInfo:
    rank = int(peft_config.get("r", 0))
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"adapter {folder}: LoRA rank {rank} is outside 1..{max_rank} (the configured maximum)")
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
        expected = (rank, in_features) if ab == "A" else (out_features, rank)
        if shape != expected:
            raise AdapterError(f"adapter {folder}: {module} lora_{ab} has shape {list(shape)}, the base needs "
                               f"{list(expected)} (was it trained on a base of another size?)")
        modules.add(module.rsplit(".", 1)[-1])
    if not modules:
        raise AdapterError(f"adapter {folder}: holds no LoRA weights")
    return AdapterInfo("lora", rank, tuple(sorted(modules)), None, peft_config.get("base_model_name_or_path"))


def _check_soft_prompt(folder: Path, peft_config: dict, shapes: dict, base_config: PretrainedConfig) -> AdapterInfo:
    if "prompt_embeddings" not in shapes:
        raise AdapterError(f"adapter {folder}: a prompt-tuning adapter must hold 'prompt_embeddings'")
    tokens, hidden = (shapes["prompt_embeddings"] + (0, 0))[:2]
    if len(shapes["prompt_embeddings"]) != 2 or hidden != base_config.hidden_size:
        raise AdapterError(f"adapter {folder}: soft prompt has shape {list(shapes['prompt_embeddings'])}, the base "
                           f"needs [num_virtual_tokens, {base_config.hidden_size}]")
    if int(peft_config.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"adapter {folder}: only decoder-only soft prompts can be served")
    return AdapterInfo("soft_prompt", None, (), tokens, peft_config.get("base_model_name_or_path"))


_LINEAR_CACHE: dict[str, dict[str, tuple[int, int]]] = {}


def _base_linear_shapes(base_config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """``module name -> (in, out)`` of every linear layer, from a weightless (meta) copy of the base."""
    cache_key = base_config.to_json_string()
    if cache_key not in _LINEAR_CACHE:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
        _LINEAR_CACHE[cache_key] = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                                    if isinstance(m, torch.nn.Linear)}
    return _LINEAR_CACHE[cache_key]
