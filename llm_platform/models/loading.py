"""Finding and loading models named by a local path, an object-store URI or a hub id.

Every place that takes a model name goes through :func:`resolve_model`
(:mod:`llm_platform.models.checkpoints`), so a mistyped path or an unreachable hub fails with one
clear message instead of a traceback from deep inside transformers or vLLM. A URI
(``s3://bucket/run/model``: what a training job on another node published) is downloaded once per node.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from llm_platform.dtypes import torch_dtype
from llm_platform.errors import ConfigError, ModelNotFoundError
from llm_platform.models.checkpoints import HUB_ID, resolve_model

__all__ = ["DTYPES", "load_causal_lm", "load_model_config", "load_sequence_classifier", "load_tokenizer",
           "resolve_model"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # by canonical name


def load_model_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config alone: for a hub id only ``config.json`` is downloaded, never the weights
    (what :func:`resolve_model` would fetch: 140 GB for a 70B model, just to read its shape)."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or not HUB_ID.match(name):
        folder = resolve_model(name)
    else:
        from huggingface_hub import hf_hub_download

        try:  # HF_TOKEN, for gated models, is read from the environment by huggingface_hub
            folder = str(Path(hf_hub_download(name, "config.json")).parent)
        except Exception as exc:
            raise ModelNotFoundError(f"cannot fetch config.json of hub model {name!r}: {type(exc).__name__}: "
                                     f"{str(exc)[:200]}. Without network, use a local checkpoint folder.") from None
    with _remote_code(name, trust_remote_code):
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    with _remote_code(name, trust_remote_code):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name, weights=False),
                                                  trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype: str = "float32", device: str = "cpu", quantization=None,
                   trust_remote_code: bool = False):
    """A causal LM in eval mode; ``quantization`` is a transformers quantization config (e.g. 4-bit)."""
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    with _remote_code(name, trust_remote_code):
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    if quantization is None:
        model = model.to(device)
    return model.eval()


def load_sequence_classifier(name: str, dtype: str = "float32", device: str = "cpu",
                             trust_remote_code: bool = False, **kwargs):
    """A sequence classifier (a reward model, or a causal LM with a fresh score head: ``num_labels=1``)."""
    from transformers import AutoModelForSequenceClassification

    with _remote_code(name, trust_remote_code):
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(name), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    return model.to(device)


@contextmanager
def _remote_code(name: str, trusted: bool):
    """transformers' refusal of a model that ships its own code, as a config error naming the setting.
    ``trust_remote_code`` is always passed as a bool: left at None, transformers *asks* on a terminal
    (and waits), which a job must never do."""
    try:
        yield
    except ValueError as exc:
        if trusted or "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(f"model {name} ships its own Python code (auto_map in its config.json); it runs only "
                          f"with trust_remote_code: true in the config (set it only for models you trust)") from None
