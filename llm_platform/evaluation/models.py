"""The models an evaluation runs on: building the tiny ones when asked, engines, parameter counts,
and fine-tuned variants (a PEFT adapter folder or a full model folder) told apart by what they hold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from llm_platform.config import FrozenConfig
from llm_platform.dtypes import FloatDType
from llm_platform.engine import AdapterRef, EngineConfig
from llm_platform.evaluation import EvaluationError


class EngineSettings(FrozenConfig):
    """How evaluations run their engines; the model comes from the evaluation's own config."""

    kind: Literal["vllm", "transformers"] = "vllm"
    """vllm (the serving engine) or transformers (the reference, and where vLLM is absent)."""
    max_model_len: int = Field(1024, gt=0)
    """Longest prompt plus completion, in tokens."""
    dtype: FloatDType = "float32"
    """vLLM on CPU needs float32."""

    def for_model(self, model: str) -> EngineConfig:
        return EngineConfig(model=model, kind=self.kind, max_model_len=self.max_model_len, dtype=self.dtype)


@dataclass(frozen=True)
class Variant:
    """A fine-tuned variant of a base model: an adapter on the base, or a model of its own."""

    name: str
    kind: Literal["lora", "soft_prompt", "model"]
    path: str

    @property
    def adapter(self) -> AdapterRef | None:
        return AdapterRef(self.name, self.kind, self.path) if self.kind != "model" else None


def build_tiny_if_asked(models_dir: str | None) -> None:
    """The local configs name the tiny models; build them on first use, as `llmp serve` does."""
    if models_dir:
        from llm_platform.models.tiny import build_tiny_models

        build_tiny_models(models_dir)


def set_torch_threads(threads: int | None) -> None:
    """Intra-op threads of the models run in this process (scoring, the transformers engine).

    The evaluations default to 1: forward passes over one short example gain little from more, and
    on a shared machine every extra OpenMP thread waits at each barrier for a core another process
    holds; scoring tiny-m on this 2-core machine beside a training job took 860 ms per example with
    2 threads and 12 ms with 1. ``None`` keeps torch's default (all cores), for dedicated machines.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def count_parameters(model: str) -> int:
    """Parameters of a checkpoint, from its config on the meta device (no weights are read)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_platform.models.loading import load_model_config

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(load_model_config(model))
    return sum(p.numel() for p in lm.parameters())


def find_variant(name: str, path: str, base: str) -> Variant:
    """The variant at ``path``, or at its ``adapter/`` or ``model/`` folder (a train_jobs.sft output_dir).

    Adapters are checked against ``base`` tensor by tensor here, so a mismatch is reported before
    any engine starts.
    """
    from llm_platform.engine.adapters import inspect_adapter
    from llm_platform.models.loading import load_model_config

    folder = Path(path).expanduser()
    if not folder.exists():
        raise EvaluationError(f"variant {name!r}: {path} does not exist. Fine-tune it first (python -m "
                              f"train_jobs.sft; the local config's comments give the commands) or point "
                              f"variants.{name} at a PEFT adapter folder, a model folder, or an sft output_dir")
    for candidate in (folder, folder / "adapter", folder / "model"):
        if (candidate / "adapter_config.json").is_file():
            info = inspect_adapter(candidate, load_model_config(base))
            return Variant(name, info.kind, str(candidate))
        if (candidate / "config.json").is_file():
            if not any((candidate / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                raise EvaluationError(f"variant {name!r}: model folder {candidate} has no tokenizer "
                                      f"(save it with tokenizer.save_pretrained beside the weights)")
            return Variant(name, "model", str(candidate))
    raise EvaluationError(f"variant {name!r}: {path} holds neither a PEFT adapter (adapter_config.json) "
                          f"nor a model (config.json), nor an adapter/ or model/ folder with one")
