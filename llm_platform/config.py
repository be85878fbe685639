"""Typed configuration: YAML files plus ``key=value`` overrides, validated at once.

Every config is a frozen pydantic model that forbids unknown keys, so a typo such
as ``enigne.kind=vllm`` fails before any work starts, with a message that names
the key and suggests the closest valid one. Field docstrings double as the
descriptions shown in error messages and ``--help`` output.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from llm_platform.errors import ConfigError

C = TypeVar("C", bound="FrozenConfig")


class FrozenConfig(BaseModel):
    """Base of every config: immutable, no unknown keys, docstrings as descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[x, y]"]`` into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``base``; nested dicts merge, other values replace."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def build_config(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate ``data`` into ``cls``; every problem is reported with its dotted key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(cls, err) for err in exc.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems)) from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (optional), apply ``overrides`` and validate into ``cls``."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return build_config(cls, data, source=str(path) if path else cls.__name__)


def _describe(cls: type[BaseModel], err: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = _keys_at(cls, err["loc"][:-1])
        close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(valid)})"
        return f"{loc}: unknown key{hint}"
    message = err["msg"]
    if err["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{loc}: {message} (got {err.get('input')!r})"


def _keys_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model reached by ``loc``, for did-you-mean hints."""
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif annotation is not None:
            inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not inner:
                return []
            model = inner[0]
    return sorted(model.model_fields)
