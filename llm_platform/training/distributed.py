"""The worker's view of its group: rank, device, reporting, and how the model is sharded.

Full and LoRA fine-tuning with several workers use FSDP (PyTorch's ``fully_shard``):
each decoder layer's parameters, gradients and optimizer state are split across the
workers and gathered only while the layer runs. The same code runs on gloo (CPU) and
NCCL (GPU); the device mesh follows the worker's device. QLoRA's 4-bit base and soft
prompts are small or not shardable, so they use DDP (every worker a full replica).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class WorkerContext:
    """What the training loop needs from whoever runs it (Ray Train, or a plain process)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: str | None = None
    """A checkpoint to resume from."""
    report: Callable[[dict, str | None], None] = lambda metrics, checkpoint_dir: None
    """Report metrics (and optionally a checkpoint folder) to the runner; every rank calls it."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ray_train_context() -> WorkerContext:
    """The context inside a Ray Train worker: rank, device, last checkpoint, ``ray.train.report``."""
    import ray.train
    import ray.train.torch

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    context = ray.train.get_context()
    return WorkerContext(rank=context.get_world_rank(), world=context.get_world_size(),
                         device=ray.train.torch.get_device(), checkpoint_dir=restored_checkpoint(), report=report)


def restored_checkpoint() -> str | None:
    """A local folder holding the checkpoint Ray Train restores from, if any. A checkpoint in an object
    store (``storage_path`` an ``s3://`` URI) is downloaded first: the loaders read local files."""
    import pyarrow.fs as pafs
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory()


def shard(model: torch.nn.Module, mode: str, device: torch.device,
          compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Wrap ``model`` for ``mode``: ``fsdp`` (per decoder layer, then the rest), ``ddp``, or ``none``.

    Under FSDP a 16-bit ``compute_dtype`` is mixed precision (FSDP2's ``MixedPrecisionPolicy``): the
    sharded parameters and the optimizer stay float32, each layer is gathered in ``compute_dtype`` for
    its forward and backward, and gradients are reduced in float32, so small updates are not rounded
    away as in pure bf16 training."""
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


@contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch, reducing gradients across workers only if ``sync`` (the
    last micro-batch of an optimizer step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``
    (gradients then accumulate unsharded until the synced micro-batch reduce-scatters their sum). A
    model on one worker has nothing to sync."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the ``ModuleList`` holding most parameters."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def held_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this process holds: its shard under FSDP, everything otherwise."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sum over the workers (identity with one worker)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

