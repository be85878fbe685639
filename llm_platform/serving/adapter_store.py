"""Where registered adapters live: a folder or an object-store URI, through ``pyarrow.fs``.

Layout under the store root::

    manifest.json                    {"BASE:NAME": {"base", "name", "kind", "version", "path", ...}}
    BASE/NAME/v3/adapter_config.json
    BASE/NAME/v3/adapter_model.safetensors

A registration copies the files into a fresh version folder first and rewrites the
manifest last: the manifest write (an atomic rename locally, a single PUT on object
stores) is the commit point, so no reader ever sees half an adapter. The previous
version stays on disk so requests already routed to it can finish; older ones are
removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

from llm_platform.engine import AdapterRef

MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class StoredAdapter:
    base: str
    name: str
    kind: str
    version: int
    path: str
    """Folder of this version, relative to the store root."""
    registered_at: float

    @property
    def model_id(self) -> str:
        return f"{self.base}:{self.name}"

    @property
    def key(self) -> str:
        """The key of this version, as :attr:`AdapterRef.key` of :meth:`AdapterStore.ref` gives it."""
        return f"{self.model_id}@{self.version}"


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def fetch_folder(uri: str, files: tuple[str, ...] = ADAPTER_FILES) -> Path:
    """Copy ``files`` of a local or remote folder into a new local temporary folder (missing ones skipped)."""
    fs, root = open_filesystem(uri)
    local = Path(tempfile.mkdtemp(prefix="llmp-adapter-"))
    for name in files + ("adapter_model.bin",):
        src = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(src).type == pafs.FileType.File:
            with fs.open_input_stream(src) as fin, open(local / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return local


class AdapterStore:
    def __init__(self, uri: str, cache_dir: str | None = None):
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "llmp-adapter-cache")

    def manifest(self) -> dict[str, StoredAdapter]:
        path = self._path(MANIFEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return {}
        with self.fs.open_input_stream(path) as f:
            raw = json.loads(f.read().decode())
        return {key: StoredAdapter(**entry) for key, entry in raw.items()}

    def get(self, base: str, name: str) -> StoredAdapter | None:
        return self.manifest().get(f"{base}:{name}")

    def put(self, base: str, name: str, kind: str, folder: Path) -> StoredAdapter:
        """Copy a validated adapter folder in as the next version of ``base:name``."""
        manifest = self.manifest()
        previous = manifest.get(f"{base}:{name}")
        version = previous.version + 1 if previous else 1
        entry = StoredAdapter(base=base, name=name, kind=kind, version=version,
                              path=f"{base}/{name}/v{version}", registered_at=time.time())
        staging = f"{entry.path}.staging-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(self._path(staging), recursive=True)
        for file in ADAPTER_FILES:
            self._write(f"{staging}/{file}", (folder / file).read_bytes())
        self.fs.move(self._path(staging), self._path(entry.path))
        manifest[entry.model_id] = entry
        self._write_manifest(manifest)
        self._prune(base, name, keep={version, version - 1})
        return entry

    def remove(self, base: str, name: str) -> StoredAdapter | None:
        manifest = self.manifest()
        entry = manifest.pop(f"{base}:{name}", None)
        if entry is not None:
            self._write_manifest(manifest)
            self._prune(base, name, keep={entry.version})
        return entry

    def local_dir(self, entry: StoredAdapter) -> str:
        """A local folder holding this version's files (downloaded once for remote stores)."""
        if self.is_local:
            return self._path(entry.path)
        target = self.cache_dir / entry.path
        if not (target / ADAPTER_FILES[1]).is_file():
            fetched = fetch_folder(f"{self.uri.rstrip('/')}/{entry.path}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, target) if not target.exists() else shutil.rmtree(fetched)
        return str(target)

    def ref(self, entry: StoredAdapter) -> AdapterRef:
        """The engine's view of ``entry``, with files on this node (downloaded once if remote)."""
        return AdapterRef(name=entry.model_id, kind=entry.kind, path=self.local_dir(entry), version=entry.version)

    def _write_manifest(self, manifest: dict[str, StoredAdapter]) -> None:
        payload = json.dumps({k: asdict(v) for k, v in sorted(manifest.items())}, indent=1).encode()
        if self.is_local:  # write then rename: readers see the old or the new manifest, never half
            tmp = self._path(f"{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp")
            Path(tmp).write_bytes(payload)
            os.replace(tmp, self._path(MANIFEST))
        else:  # one PUT replaces an object atomically
            self._write(MANIFEST, payload)

    def _write(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def _prune(self, base: str, name: str, keep: set[int]) -> None:
        folder = self._path(f"{base}/{name}")
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            version = info.base_name.removeprefix("v")
            if version.isdigit() and int(version) not in keep:
                self.fs.delete_dir(info.path)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"
