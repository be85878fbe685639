"""Where a worker's model lives and in what dtype: one decision, from the config, for every job.

SFT, the reward model, DPO and PPO workers, and PPO's reward actor, all ask :func:`placement` (and the
jobs' model builders load in what it says), so the rule is written once and tested on CPU for GPU configs
too: ``use_gpu`` (or a GPU for the actor) means ``cuda``, and the config's ``dtype`` is how the weights
are stored, except where training needs float32:

- FSDP mixed precision keeps float32 master weights (each layer is cast to ``dtype`` for compute);
- PEFT keeps adapter weights in float32 on a 16-bit base (its ``autocast_adapter_dtype``), and PPO's
  value head is float32, so small updates are not rounded away;
- QLoRA's non-quantized weights are float32 (PEFT's ``prepare_model_for_kbit_training`` upcasts them)
  and its 4-bit weights are packed bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_platform.dtypes import torch_dtype
from llm_platform.errors import PlatformError


@dataclass(frozen=True)
class Placement:
    device_type: str
    """``cuda`` or ``cpu``."""
    dtype: torch.dtype
    """The model's stored weights (and floating-point buffers)."""
    trained_dtype: torch.dtype
    """Weights that train on a frozen base (adapters, value head); the same as ``dtype`` for full training."""

    def check(self, device: torch.device | str) -> torch.device:
        """``device`` (what Ray gave the worker), if it is this placement's kind; a clear error otherwise
        (a ``use_gpu`` job on a node whose torch sees no GPU would otherwise train on the CPU for days)."""
        device = torch.device(device)
        if device.type != self.device_type:
            raise PlatformError(f"the worker's device is {device}, but the config asks for {self.device_type} "
                                f"(scaling.use_gpu / num_gpus): is a CUDA build of torch installed on the node?")
        return device

    def expected_dtypes(self, tensor: torch.Tensor, trained: bool, buffer: bool) -> set[torch.dtype] | None:
        """The dtypes ``tensor`` may have; None where the dtype is not a float we choose (integer buffers,
        4-bit packed weights). Floating-point buffers may also be float32: transformers keeps rotary
        frequencies in float32 on purpose, whatever the weights' dtype."""
        if not tensor.is_floating_point():
            return None
        if buffer:
            return {self.dtype, torch.float32}
        return {self.trained_dtype if trained else self.dtype}


def device_type(use_gpu: bool) -> str:
    return "cuda" if use_gpu else "cpu"


def placement(use_gpu: bool, dtype: str, sharding: str = "none", trains: str = "all") -> Placement:
    """The device kind and dtypes of a worker's model.

    ``sharding``: ``none``, ``ddp`` or ``fsdp``; ``trains``: ``all`` (full fine-tuning, a reward model's
    every weight), ``adapter`` (LoRA/prompt tuning/PPO's LoRA and value head on a frozen base) or ``qlora``."""
    if trains not in ("all", "adapter", "qlora"):
        raise ValueError(f"trains: {trains!r}")
    compute = torch_dtype(dtype)
    if trains == "qlora":
        return Placement(device_type(use_gpu), torch.float32, torch.float32)
    stored = torch.float32 if sharding == "fsdp" else compute
    return Placement(device_type(use_gpu), stored, stored if trains == "all" else torch.float32)


def sft_placement(cfg) -> Placement:
    """An SFT worker's model (:class:`llm_platform.training.config.SFTConfig`)."""
    trains = {"full": "all", "qlora": "qlora"}.get(cfg.method, "adapter")
    return placement(cfg.scaling.use_gpu, cfg.dtype, cfg.sharding, trains)


def audit(model: torch.nn.Module, where: Placement) -> list[str]:
    """Every parameter and buffer of ``model`` not on ``where``'s device kind or not in its dtype, as
    ``name: device dtype (expected ...)`` lines: empty when the model is where the config says."""
    wrong = []
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    tensors = [(n, t, id(t) in trained, False) for n, t in model.named_parameters()]
    tensors += [(n, t, False, True) for n, t in model.named_buffers()]
    for name, tensor, is_trained, is_buffer in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # an FSDP shard
        allowed = where.expected_dtypes(local, is_trained, is_buffer)
        if local.device.type != where.device_type or (allowed is not None and local.dtype not in allowed):
            expected = "" if allowed is None else " " + "/".join(sorted(str(d) for d in allowed))
            wrong.append(f"{name}: {local.device} {local.dtype} (expected {where.device_type}{expected})")
    return wrong
