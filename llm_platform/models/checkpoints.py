"""Where a model named by a local path, an object-store URI or a hub id is on this node.

Kept apart from :mod:`llm_platform.models.loading` because it imports neither torch nor transformers
(seconds of imports): a command checks the model it was given before it loads anything.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from llm_platform.errors import ModelNotFoundError
from llm_platform.prerequisites import missing

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHTS = "*.safetensors"
HUB_FILES = ["*.json", "*.model", "*.txt", "*.jinja"]
"""What a hub snapshot holds besides the weights: config, tokenizer, chat template."""


def resolve_model(name: str, weights: bool = True) -> str:
    """A local checkpoint folder for ``name``: the path itself, a download of a URI, or a hub snapshot.
    ``weights=False`` (a tokenizer, a driver-side check) fetches a hub model without its weights: 14 GB
    for a 7B model, not worth downloading onto the head node to read a tokenizer."""
    if "://" in name and not name.startswith("file://"):
        return str(_download(name))
    path = Path(name.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json: not a Hugging Face checkpoint")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"model path {path} is a file; expected a checkpoint folder")
    if name.startswith(("/", ".", "~")) or not HUB_ID.match(name):
        raise ModelNotFoundError(missing("model path", name, "give a checkpoint folder or a hub id"))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=HUB_FILES + ([WEIGHTS] if weights else []))
    except Exception as exc:  # offline, gated, unknown repo: one message for all
        raise ModelNotFoundError(f"cannot fetch hub model {name!r}: {type(exc).__name__}: {str(exc)[:200]}. "
                                 f"Without network, use a local checkpoint folder.") from None


def _download(uri: str) -> Path:
    """A checkpoint on an object store, copied to this node's temp folder (once: a completed copy is kept,
    keyed by the URI, and a partial one never counts as completed)."""
    import pyarrow.fs as pafs

    from llm_platform.storage import open_filesystem

    folder = Path(tempfile.gettempdir()) / "llmp-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (folder / ".complete").exists():
        return folder
    fs, path = open_filesystem(uri)
    if fs.get_file_info(f"{path}/config.json").type != pafs.FileType.File:
        raise ModelNotFoundError(f"model {uri} has no config.json: not a Hugging Face checkpoint (or not there)")
    partial = Path(tempfile.mkdtemp(prefix="llmp-model-download-"))
    try:
        pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        (partial / ".complete").write_text(uri)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.rename(folder)
        except OSError:  # another process on this node finished the same download first
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
