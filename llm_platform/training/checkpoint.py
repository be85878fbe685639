"""Resumable training state, written with ``torch.distributed.checkpoint``.

Each worker writes only its own shard of the model and optimizer state (under FSDP),
so saving a checkpoint never gathers the whole model on one process; loading
reshards to whatever the restarted group looks like. Adapter methods store only the
trainable parameters: the frozen base is read again from the model path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

STATE = "state"
PROGRESS = "progress.json"
SETTINGS = "llmp_settings.json"


def save(folder: str | Path, model, optimizer, scheduler, step: int, extra: dict, adapter_only: bool) -> None:
    """Write the model/optimizer shards of this worker and (from every worker, identical) the progress."""
    options = StateDictOptions(ignore_frozen_params=adapter_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(folder) / STATE))
    progress = {"step": step, "scheduler": scheduler.state_dict(), **extra}
    (Path(folder) / PROGRESS).write_text(json.dumps(progress))
    if "settings" in extra:
        write_settings(folder, extra["settings"])


def load(folder: str | Path, model, optimizer, scheduler, adapter_only: bool) -> dict:
    """Restore shards and schedule from ``folder``; returns the saved progress (``step`` and extras)."""
    options = StateDictOptions(ignore_frozen_params=adapter_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / STATE))
    # The frozen base is not in the checkpoint, so its weights are "missing" by design.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=adapter_only, strict=not adapter_only))
    progress = json.loads((Path(folder) / PROGRESS).read_text())
    scheduler.load_state_dict(progress.pop("scheduler"))
    return progress


def write_settings(folder: str | Path, settings: dict) -> None:
    """The run's training settings, stored with each checkpoint (every job does this, see
    :func:`stored_settings`)."""
    (Path(folder) / SETTINGS).write_text(json.dumps(settings, sort_keys=True))


def stored_settings(storage: str, run_name: str) -> dict | None:
    """The training settings stored with a run's newest checkpoint in ``storage`` (folder or URI), if any:
    at the checkpoint's top (SFT, PPO) or in the Hugging Face Trainer checkpoint inside it (reward, DPO)."""
    import pyarrow.fs as pafs

    from llm_platform.storage import list_folder, open_filesystem

    fs, root = open_filesystem(storage)
    infos = list_folder(fs, f"{root}/{run_name}")
    folders = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for folder in reversed(folders):
        for path in (f"{folder}/{SETTINGS}", f"{folder}/checkpoint/{SETTINGS}"):
            if fs.get_file_info(path).type == pafs.FileType.File:
                with fs.open_input_stream(path) as f:
                    return json.loads(f.read())
    return None


def full_state_dict(model, adapter_only: bool) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights on CPU; every worker must call it, rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only)
    return get_model_state_dict(model, options=options)
