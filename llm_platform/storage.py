"""Local paths and object-store URIs as one kind of location: the one place that opens filesystems.

    open_filesystem("/data/out")                    # LocalFileSystem, "/data/out"
    open_filesystem("s3://bucket/adapters")         # S3FileSystem, "bucket/adapters"
    open_filesystem("gs://bucket/adapters")         # GcsFileSystem, "bucket/adapters"

S3-compatible stores at a custom endpoint (MinIO, Ceph, SeaweedFS, ...) keep plain
``s3://bucket/path`` URIs: set the endpoint in the environment, as for the AWS CLI and SDKs,

    AWS_ENDPOINT_URL_S3=http://minio.internal:9000     # or AWS_ENDPOINT_URL (S3 only here)
    AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...   # or an instance profile / ~/.aws

pyarrow (>= 15; checked on 26.0.1) reads these in ``FileSystem.from_uri``, and so does Ray
Train's ``storage_path``, which opens its filesystem the same way: one setting serves the
adapter store, ``output_dir`` and checkpoints alike. The scheme of the endpoint (``http://``)
is honoured. pyarrow's query options (``s3://bucket/p?endpoint_override=host:port&scheme=http``)
work too, but a URI with a query cannot be extended by appending ``/name``; prefer the
environment. ``S3FileSystem(...)`` built directly does *not* read the endpoint variables:
always go through :func:`open_filesystem`.

On a Ray cluster, processes on other nodes see their node's environment, not the driver's:
:data:`STORAGE_ENV` lists what to forward in a ``runtime_env`` (see :func:`storage_env`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
"""Environment variables that decide where ``s3://`` URIs point and which credentials open them.
(Variables naming files, such as ``AWS_PROFILE`` or ``GOOGLE_APPLICATION_CREDENTIALS``, are left out:
the file would have to exist on every node.)"""


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations (object stores, ``file://``), False for plain paths."""
    return "://" in str(location)


def open_filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI.

    Local paths are made absolute (``~`` expanded): Ray workers may run in another directory.
    """
    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def list_folder(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """What ``path`` holds (nothing when it does not exist), also while another process creates it.

    pyarrow's local listing with ``allow_not_found`` has a window: when the folder appears between its
    failed open and its check that the folder exists, it raises FileNotFoundError for a folder that is
    there (seen with concurrent adapter-store writers; a thread listing folders as another creates them
    hit it 0-2 times in 20,000). Listed again, the folder is found."""
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    try:
        return fs.get_file_info(selector)
    except FileNotFoundError:
        return fs.get_file_info(selector)


HUB_ENV = ("HF_TOKEN", "HF_HOME", "HF_ENDPOINT", "HF_HUB_OFFLINE")
"""Where Hugging Face models come from and the token for gated ones (Llama): a worker loading
``meta-llama/...`` on another node needs the driver's token."""


def storage_env() -> dict[str, str]:
    """The :data:`STORAGE_ENV` and :data:`HUB_ENV` variables set in this process, to hand to Ray workers
    on other nodes (``llm_platform.cluster.connect`` puts them in the job's ``runtime_env``)."""
    return {name: os.environ[name] for name in STORAGE_ENV + HUB_ENV if os.environ.get(name)}
