"""Where adapters may be registered from, and copying them in within size limits.

A registration names a source; the server reads it. Left open, that lets any client
make the server read any folder it can (``/root/.ssh``) or call any host (an ``s3://``
URI with ``?endpoint_override=10.0.0.5:80`` sends requests wherever it says: SSRF).
So sources are limited to the serve config's ``adapter_sources``: local folders, inside
which a source must resolve (symbolic links followed), and URI prefixes. Options such
as endpoints and credentials belong to the configured prefix, never to the client's URI.

The copy is ours rather than ``pyarrow.fs.copy_files`` because it must stop at a size
limit, follow the allow-list for each file, and leave no temporary folder behind.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from llm_platform.serving.adapter_store import ADAPTER_FILES, open_filesystem
from llm_platform.serving.errors import APIError

PICKLED = "adapter_model.bin"
CHUNK = 1 << 20


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    bucket: str
    parts: tuple[str, ...]
    query: str

    def covers(self, scheme: str, bucket: str, parts: tuple[str, ...]) -> bool:
        return (scheme, bucket) == (self.scheme, self.bucket) and parts[:len(self.parts)] == self.parts


def _split_uri(uri: str) -> tuple[str, str, tuple[str, ...], str, str]:
    url = urlsplit(uri)
    parts = tuple(p for p in url.path.split("/") if p)
    return url.scheme.lower(), url.netloc, parts, url.query, url.fragment


class AdapterSources:
    def __init__(self, allowed: list[str]):
        self.roots: list[Path] = []
        self.prefixes: list[_Prefix] = []
        for entry in allowed:
            if "://" in entry and not entry.startswith("file://"):
                scheme, bucket, parts, query, _ = _split_uri(entry)
                self.prefixes.append(_Prefix(scheme, bucket, parts, query))
            else:
                self.roots.append(Path(entry.removeprefix("file://")).expanduser().resolve())

    def describe(self) -> str:
        shown = [str(r) for r in self.roots] + [f"{p.scheme}://{'/'.join((p.bucket,) + p.parts)}" for p in self.prefixes]
        return ", ".join(shown) or "none (set adapter_sources in the serve config)"

    def resolve(self, source: str) -> str:
        """The path or URI (with the configured prefix's options) to read ``source`` from; 403 if not allowed."""
        if "://" in source and not source.startswith("file://"):
            scheme, bucket, parts, query, fragment = _split_uri(source)
            if query or fragment:
                raise APIError(403, "adapter source URIs may not carry options (?endpoint_override=..., "
                                    "?scheme=...): the server's adapter_sources prefixes set them",
                               param="source", code="source_not_allowed")
            if "@" in bucket or any(p in (".", "..") for p in parts) or "//" in source.split("://", 1)[1]:
                raise APIError(403, f"adapter source {source!r} is not a plain bucket/path URI", param="source",
                               code="source_not_allowed")
            for prefix in self.prefixes:
                if prefix.covers(scheme, bucket, parts):
                    uri = f"{scheme}://{bucket}/{'/'.join(parts)}"
                    return f"{uri}?{prefix.query}" if prefix.query else uri
            raise self._refused(source)
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_absolute():
            raise APIError(400, f"adapter source {source!r} must be an absolute path or a URI", param="source",
                           code="invalid_source")
        if not self._inside_roots(path):
            raise self._refused(source)
        return str(path.resolve())

    def fetch(self, source: str, max_bytes: int) -> Path:
        """Copy ``source``'s adapter files into a new temporary folder; nothing is left behind on failure."""
        uri = self.resolve(source)
        try:
            fs, root = open_filesystem(uri)
            is_dir = fs.get_file_info(root).type == pafs.FileType.Directory
        except (OSError, ValueError) as exc:
            raise APIError(400, f"adapter source {source} cannot be read: {exc}", param="source",
                           code="source_unreadable") from None
        if not is_dir:
            raise APIError(400, f"adapter source {source} does not exist or is not a folder", param="source",
                           code="source_not_found")
        local = Path(tempfile.mkdtemp(prefix="llmp-adapter-"))
        try:
            for name in ADAPTER_FILES + (PICKLED,):
                self._copy(fs, f"{root.rstrip('/')}/{name}", local / name, source, max_bytes,
                           local_source=isinstance(fs, pafs.LocalFileSystem))
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        return local

    def _copy(self, fs, src: str, dst: Path, source: str, max_bytes: int, local_source: bool) -> None:
        try:
            info = fs.get_file_info(src)
            if info.type != pafs.FileType.File:
                return
            if dst.name == PICKLED:  # never read: its presence is enough for validation to name the problem
                dst.touch()
                return
            if local_source and not self._inside_roots(Path(src)):
                raise APIError(403, f"adapter source {source}: {dst.name} links outside the allowed adapter_sources",
                               param="source", code="source_not_allowed")
            if info.size is not None and info.size > max_bytes:
                raise self._too_large(source, dst.name, info.size, max_bytes)
            copied = 0
            with fs.open_input_stream(src) as fin, open(dst, "wb") as fout:
                while block := fin.read(CHUNK):
                    copied += len(block)
                    if copied > max_bytes:  # the file grew since it was listed
                        raise self._too_large(source, dst.name, copied, max_bytes)
                    fout.write(block)
        except OSError as exc:
            raise APIError(400, f"adapter source {source}: cannot read {dst.name}: {exc}", param="source",
                           code="source_unreadable") from None

    def _inside_roots(self, path: Path) -> bool:
        real = path.resolve()
        return any(real == root or real.is_relative_to(root) for root in self.roots)

    def _refused(self, source: str) -> APIError:
        return APIError(403, f"adapter source {source!r} is outside the allowed adapter_sources "
                             f"({self.describe()})", param="source", code="source_not_allowed")

    @staticmethod
    def _too_large(source: str, name: str, size: int, limit: int) -> APIError:
        return APIError(413, f"adapter source {source}: {name} is {size} bytes or more; the limit is {limit} "
                             f"(limits.max_adapter_bytes)", param="source", code="adapter_too_large")
