"""Dtype names: every config and command takes torch's names (``float32``, ``bfloat16``, ``float16``)
and the short ones (``fp32``, ``bf16``, ``fp16``), through :func:`normalize_dtype`.

Configs store torch's spelling (what transformers, vLLM and PEFT take); ``llmp plan`` prints the
short one, as the course quotes memory per dtype.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator

# Canonical name -> other spellings accepted (case-insensitive).
ALIASES: dict[str, tuple[str, ...]] = {
    "float32": ("fp32", "f32", "float", "torch.float32"),
    "bfloat16": ("bf16", "torch.bfloat16"),
    "float16": ("fp16", "f16", "half", "torch.float16"),
    "int8": ("i8", "torch.int8"),
    "4bit": ("int4", "nf4"),
}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8", "4bit": "4bit"}
FLOATS = ("float32", "bfloat16", "float16")
_LOOKUP = {alias: name for name, aliases in ALIASES.items() for alias in (name, *aliases)}


def normalize_dtype(value, allowed: tuple[str, ...] = FLOATS) -> str:
    """``value`` (a name in either spelling, or a torch dtype) as torch spells it; ValueError names what
    is accepted."""
    name = _LOOKUP.get(str(value).strip().lower())
    if name is None or name not in allowed:
        accepted = ", ".join(f"{n} ({'/'.join(ALIASES[n][:1])})" for n in allowed)
        raise ValueError(f"unknown dtype {value!r}: expected one of {accepted}")
    return name


def short_dtype(value, allowed: tuple[str, ...] = tuple(SHORT)) -> str:
    """The short spelling (fp32, bf16, fp16, int8, 4bit) of any accepted name."""
    return SHORT[normalize_dtype(value, allowed)]


def torch_dtype(value):
    """The torch dtype of a floating-point dtype name."""
    import torch

    return getattr(torch, normalize_dtype(value))


def _normalize_float(value):
    return normalize_dtype(value) if isinstance(value, str) or not isinstance(value, (int, float)) else value


FloatDType = Annotated[Literal["float32", "bfloat16", "float16"], BeforeValidator(_normalize_float)]
"""A config field holding a floating-point dtype: either spelling in, torch's spelling stored."""
