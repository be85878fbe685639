"""Where registered adapters live: a folder or an object-store URI (``s3://``, ``gs://``), via ``pyarrow.fs``.

Layout under the store root::

    adapters/BASE/NAME/UID/adapter_config.json   one folder per registration, never moved or rewritten
    adapters/BASE/NAME/UID/adapter_model.safetensors
    index/BASE/NAME/000000003-UID-MS.lora.json   commit records: version 3 of BASE:NAME is folder UID
    index/BASE/NAME/000000004-UID-MS.deleted.json   a deletion (tombstone)

Why this shape (object stores have neither folder moves nor conditional writes in pyarrow):

- **No moves.** A registration uploads its files into a fresh folder, then writes one small
  record object. The record is the commit: one PUT (or, locally, a write + fsync + rename) makes
  the version visible whole, so no reader sees half an adapter.
- **No read-modify-write.** There is no shared manifest to rewrite, so two writers (two ingress
  replicas, two servers on one store) cannot overwrite each other's entry: each adds its own
  record. The state is one LIST of ``index/``; for each name the record with the highest
  ``(version, uid)`` is current, and a tombstone there means "deleted".
- **Versions never reused.** A new record takes the highest version seen for its name, plus one,
  tombstones included, and the latest record of a name is never pruned: deleting a name and
  registering it again continues its numbering. A writer that lists after writing and sees another
  record with its number withdraws and takes the next one (of two racing writers at least one sees
  the other), so every committed version number means one folder. Keys that reach
  engines carry the uid as well (``BASE:NAME@3-UID``), so even a record seen during such a race
  can never be confused with another folder.
- After a registration, versions older than the previous one are pruned (record first, then
  folder): requests already routed to the previous version can finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from llm_platform.engine import AdapterRef
from llm_platform.errors import AdapterError
from llm_platform.storage import list_folder, open_filesystem

__all__ = ["ADAPTER_FILES", "AdapterStore", "StoredAdapter", "fetch_folder", "open_filesystem"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
INDEX = "index"
DATA = "adapters"
DELETED = "deleted"
RECORD = re.compile(r"^(?P<version>\d{9})-(?P<uid>[0-9a-f]{12})-(?P<ms>\d+)\.(?P<kind>[a-z_]+)\.json$")
SAFE = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")


@dataclass(frozen=True)
class StoredAdapter:
    base: str
    name: str
    kind: str
    version: int
    path: str
    """Folder of this version, relative to the store root."""
    registered_at: float
    uid: str = ""
    """Unique id of this registration (its folder's name)."""

    @property
    def model_id(self) -> str:
        return f"{self.base}:{self.name}"

    @property
    def key(self) -> str:
        """The key of this version, as :attr:`AdapterRef.key` of :meth:`AdapterStore.ref` gives it."""
        return f"{self.model_id}@{self.version}-{self.uid}"


@dataclass(frozen=True, order=True)
class _Record:
    version: int
    uid: str
    ms: int
    kind: str
    base: str
    name: str

    @property
    def file(self) -> str:
        return f"{INDEX}/{self.base}/{self.name}/{self.version:09d}-{self.uid}-{self.ms}.{self.kind}.json"

    @property
    def folder(self) -> str:
        return f"{DATA}/{self.base}/{self.name}/{self.uid}"

    def entry(self) -> StoredAdapter:
        return StoredAdapter(base=self.base, name=self.name, kind=self.kind, version=self.version, path=self.folder,
                             registered_at=self.ms / 1000, uid=self.uid)


def fetch_folder(uri: str, files: tuple[str, ...] = ADAPTER_FILES) -> Path:
    """Copy ``files`` of a local or remote folder into a new local temporary folder (missing ones skipped)."""
    fs, root = open_filesystem(uri)
    return _download(fs, root, files + ("adapter_model.bin",))


def _download(fs: pafs.FileSystem, root: str, files: tuple[str, ...]) -> Path:
    local = Path(tempfile.mkdtemp(prefix="llmp-adapter-"))
    for name in files:
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
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        else:  # fail at start-up, naming the store, when the endpoint or the credentials are wrong
            try:
                self.fs.get_file_info(self.root)
            except OSError as exc:
                raise OSError(f"adapter store {uri} cannot be reached: {exc}") from exc
        # Downloads of remote versions, per store (two stores may hold the same relative paths).
        digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "llmp-adapter-cache") / digest

    # -- reading ---------------------------------------------------------------------------

    def manifest(self) -> dict[str, StoredAdapter]:
        """Every registered adapter's current version, by ``BASE:NAME`` (one listing of the index)."""
        latest: dict[tuple[str, str], _Record] = {}
        for record in self._records(INDEX):
            key = (record.base, record.name)
            if key not in latest or record > latest[key]:
                latest[key] = record
        return {f"{b}:{n}": r.entry() for (b, n), r in sorted(latest.items()) if r.kind != DELETED}

    def get(self, base: str, name: str) -> StoredAdapter | None:
        if not _safe(base, name):
            return None
        records = self._records(f"{INDEX}/{base}/{name}")
        current = max(records, default=None)
        return current.entry() if current is not None and current.kind != DELETED else None

    def adapter_config(self, entry: StoredAdapter) -> dict:
        """This version's ``adapter_config.json`` (one small read, nothing downloaded to the cache)."""
        with self.fs.open_input_stream(self._path(f"{entry.path}/{ADAPTER_FILES[0]}")) as f:
            return json.loads(f.read())

    def local_dir(self, entry: StoredAdapter) -> str:
        """A local folder holding this version's files (downloaded once per node for remote stores)."""
        if self.is_local:
            return self._path(entry.path)
        target = self.cache_dir / entry.path
        if not (target / ADAPTER_FILES[1]).is_file():
            fetched = _download(self.fs, self._path(entry.path), ADAPTER_FILES)
            if not all((fetched / name).is_file() for name in ADAPTER_FILES):  # pruned meanwhile: cache nothing
                shutil.rmtree(fetched, ignore_errors=True)
                raise FileNotFoundError(f"{entry.key} is no longer in the adapter store {self.uri}")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(fetched, target)  # atomic: a concurrent reader sees no folder or a whole one
            except OSError:  # another replica on this node got there first
                shutil.rmtree(fetched, ignore_errors=True)
        return str(target)

    def ref(self, entry: StoredAdapter) -> AdapterRef:
        """The engine's view of ``entry``, with files on this node (downloaded once if remote)."""
        return AdapterRef(name=entry.model_id, kind=entry.kind, path=self.local_dir(entry),
                          version=f"{entry.version}-{entry.uid}")

    # -- writing ---------------------------------------------------------------------------

    def put(self, base: str, name: str, kind: str, folder: Path) -> StoredAdapter:
        """Copy a validated adapter folder in as the next version of ``base:name``."""
        _check_names(base, name)
        if kind == DELETED or not re.fullmatch(r"[a-z_]+", kind):
            raise ValueError(f"kind: {kind!r} is not an adapter kind")
        uid = uuid.uuid4().hex[:12]
        target = f"{DATA}/{base}/{name}/{uid}"
        for file in ADAPTER_FILES:  # the folder first, under a name no one else uses ...
            self._write(f"{target}/{file}", (Path(folder) / file).read_bytes())
        record = self._commit(base, name, kind, uid)  # ... then the record that makes it visible
        self._prune(base, name)
        return record.entry()

    def remove(self, base: str, name: str) -> StoredAdapter | None:
        """Delete ``base:name`` (a tombstone record); returns the version deleted, None if none was registered."""
        current = self.get(base, name)
        if current is None:
            return None
        self._commit(base, name, DELETED, uuid.uuid4().hex[:12])
        return current

    def _commit(self, base: str, name: str, kind: str, uid: str) -> _Record:
        prefix = f"{INDEX}/{base}/{name}"
        records = self._records(prefix)
        for attempt in range(1, 100):
            version = max((r.version for r in records), default=0) + 1
            record = _Record(version, uid, int(time.time() * 1000), kind, base, name)
            self._write(record.file, json.dumps(record.entry().__dict__).encode())
            records = self._records(prefix)
            if not any(r.version == version and r.uid != uid for r in records):
                return record
            # Another writer took the same number. Of two such writers at least one lists after both
            # wrote and sees the other, so "whoever sees a collision yields" leaves at most one record
            # per number (a tie-break by uid would not: the winner may have checked before the loser
            # wrote). Both may yield; a random pause keeps them from meeting again at the next number.
            self._delete(record.file)
            time.sleep(random.uniform(0, 0.05 * attempt))
            records = self._records(prefix)
        raise AdapterError(f"could not commit a version of {base}:{name}: too many concurrent writers")

    def _prune(self, base: str, name: str) -> None:
        """Drop versions older than the previous one (records first, so no reader resolves a gone folder)."""
        records = sorted(self._records(f"{INDEX}/{base}/{name}"), reverse=True)
        kept, old = records[:2], records[2:]
        keep_folders = {r.folder for r in kept}
        for record in old:
            self._delete(record.file)
        for record in old:
            if record.kind != DELETED and record.folder not in keep_folders and self._exists(record.folder):
                self.fs.delete_dir(self._path(record.folder))

    # -- filesystem ------------------------------------------------------------------------

    def _records(self, prefix: str) -> list[_Record]:
        records = []
        for info in list_folder(self.fs, self._path(prefix), recursive=True):
            match = RECORD.match(info.base_name) if info.type == pafs.FileType.File else None
            parts = info.path[len(self._path(INDEX)) + 1:].split("/")
            if match and len(parts) == 3:
                records.append(_Record(int(match["version"]), match["uid"], int(match["ms"]), match["kind"],
                                       parts[0], parts[1]))
        return records

    def _write(self, rel: str, data: bytes) -> None:
        if not self.is_local:  # one PUT: the object appears whole or not at all
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)
            return
        # Locally: write a hidden temporary file, fsync it, rename it into place, fsync the folder:
        # after a crash the file is absent or whole, never empty or half written.
        target = Path(self._path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)

    def _delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._path(rel))
        except FileNotFoundError:
            pass

    def _exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"


def _safe(*names: str) -> bool:
    return all(SAFE.match(value) and value not in (".", "..") for value in names)


def _check_names(base: str, name: str) -> None:
    for field, value in (("base", base), ("name", name)):
        if not _safe(value):
            raise ValueError(f"{field}: {value!r} must be letters, digits, '.', '_' or '-' (no path separators)")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
