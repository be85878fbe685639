"""One loader for every dataset source: built-in synthetic sets, local files, hub names.

``source`` is one of
- ``synthetic:NAME`` with NAME in :data:`llm_platform.data.synthetic.GENERATORS`;
- a ``.jsonl``/``.json``/``.parquet`` file, or a folder holding ``SPLIT.jsonl`` or ``SPLIT.parquet``;
- the same on an object store or any file system pyarrow reaches (``s3://bucket/data/train.jsonl``,
  ``gs://...``, ``file://...``; S3-compatible stores take ``?endpoint_override=HOST:PORT&scheme=http``);
- a Hugging Face hub dataset name (``super_glue`` with ``subset="axb"``, ``knkarthick/dialogsum``),
  which needs network access and so is only used by GPU-cluster configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from llm_platform.data import synthetic
from llm_platform.errors import DataError

SPLITS = ("train", "validation", "test")
# Rows generated per synthetic set before splitting 80/10/10.
SYNTHETIC_SIZES = {"sentiment": 2000, "preferences": 2000, "nli_axb": 1000, "dialogsum": 600}
# Columns each synthetic set guarantees; hub sets with the same task share them.
COLUMNS = {
    "sentiment": ("text", "label"),
    "preferences": ("prompt", "chosen", "rejected"),
    "nli_axb": ("sentence1", "sentence2", "label"),
    "dialogsum": ("dialogue", "summary"),
}
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def synthetic_split(name: str, split: str, seed: int = 0) -> list[dict]:
    """Rows of one split of a synthetic set; held-out rows never repeat a training row."""
    if name not in synthetic.GENERATORS:
        raise DataError(f"unknown synthetic dataset {name!r}; known: {', '.join(sorted(synthetic.GENERATORS))}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for synthetic:{name}; expected one of {', '.join(SPLITS)}")
    rows = synthetic.GENERATORS[name](SYNTHETIC_SIZES[name], seed)
    n_train, n_val = int(0.8 * len(rows)), int(0.1 * len(rows))
    parts = {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    if split == "train":
        return parts["train"]
    seen = {_key(row) for row in parts["train"]}
    return [row for row in parts[split] if _key(row) not in seen]


def load_records(source: str, split: str = "train", subset: str | None = None, limit: int | None = None,
                 columns: tuple[str, ...] = ()) -> datasets.Dataset:
    """Load ``split`` of ``source`` as a :class:`datasets.Dataset`, checking ``columns`` exist."""
    if source.startswith("synthetic:"):
        dataset = datasets.Dataset.from_list(synthetic_split(source.removeprefix("synthetic:"), split))
    elif "://" in source:
        dataset = _load_uri(source, split)
    elif Path(source).exists():
        dataset = _load_local(Path(source), split)
    elif source.startswith(("/", ".", "~")) or Path(source).suffix in FILE_SUFFIXES:
        raise DataError(f"dataset path {source} does not exist")
    else:
        dataset = _load_hub(source, split, subset)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"dataset {source} ({split}) lacks column(s) {missing}; it has {dataset.column_names}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def write_synthetic(out_dir: str | Path, fmt: str = "jsonl") -> list[Path]:
    """Write every synthetic set as ``out_dir/NAME/SPLIT.jsonl`` (or ``.parquet``)."""
    written = []
    for name in sorted(synthetic.GENERATORS):
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = synthetic_split(name, split)
            path = folder / f"{split}.{fmt}"
            if fmt == "parquet":
                datasets.Dataset.from_list(rows).to_parquet(str(path))
            else:
                path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
            written.append(path)
    return written


def _key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("idx", "id")}, sort_keys=True)


def is_split_file(source: str) -> bool:
    """Whether ``source`` names one data file (all of its rows are one split), not a folder of split files."""
    return not source.startswith("synthetic:") and Path(source.split("?")[0]).suffix in FILE_SUFFIXES


def available_splits(source: str) -> tuple[str, ...] | None:
    """Splits a synthetic set or a local folder holds; ``None`` where unknown (a file, a URI, a hub set)."""
    if source.startswith("synthetic:"):
        return SPLITS
    path = Path(source)
    if "://" not in source and path.is_dir():
        return tuple(s for s in SPLITS if any((path / f"{s}{suffix}").is_file() for suffix in FILE_SUFFIXES))
    return None


def data_file(source: str, split: str) -> str:
    """The file a local ``source`` reads ``split`` from (for error messages naming it)."""
    path = Path(source)
    if "://" not in source and path.is_dir():
        found = [path / f"{split}{suffix}" for suffix in FILE_SUFFIXES if (path / f"{split}{suffix}").is_file()]
        return str(found[0]) if found else str(path)
    return source


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if path.is_dir():
        candidates = [path / f"{split}{suffix}" for suffix in FILE_SUFFIXES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(f"folder {path} has no {split}.jsonl, {split}.json or {split}.parquet")
        path = found[0]
    builder = FILE_SUFFIXES.get(path.suffix)
    if builder is None:
        raise DataError(f"cannot read {path}: expected one of {', '.join(FILE_SUFFIXES)}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        where = _bad_json_line(path.read_bytes()) if builder == "json" else ""
        raise DataError(f"cannot read {path}{where}: {type(exc).__name__}: {exc}") from None


def _bad_json_line(data: bytes) -> str:
    """``", line N: ..."`` for the first line of a JSON Lines file that is not a JSON object.
    Hand-written because datasets' JSON builder reports only "An error occurred while generating the dataset"."""
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):  # a JSON array, not JSON Lines
        return ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f", line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(row, dict):
            return f", line {number}: a JSON {type(row).__name__}, expected an object with named columns"
    return ""


def _load_uri(uri: str, split: str) -> datasets.Dataset:
    """A file (or a folder of split files) on any file system pyarrow.fs reaches: S3, GCS, HDFS, file://."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            names = [f"{path.rstrip('/')}/{split}{suffix}" for suffix in FILE_SUFFIXES]
            found = [n for n, info in zip(names, fs.get_file_info(names)) if info.type == pafs.FileType.File]
            if not found:
                raise DataError(f"{uri} has no {split}.jsonl, {split}.json or {split}.parquet")
            path = found[0]
        elif fs.get_file_info(path).type != pafs.FileType.File:
            raise DataError(f"dataset {uri} does not exist")
        suffix = Path(path).suffix
        if suffix not in FILE_SUFFIXES:
            raise DataError(f"cannot read {uri}: expected one of {', '.join(FILE_SUFFIXES)}")
        if suffix == ".parquet":
            return datasets.Dataset(pq.read_table(path, filesystem=fs))
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except DataError:
        raise
    except Exception as exc:  # credentials, endpoint, permissions: one clear error naming the URI
        raise DataError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from None
    text = data.decode("utf-8", errors="replace")
    try:
        if text.lstrip().startswith("["):  # a JSON array of objects
            return datasets.Dataset.from_list(json.loads(text))
        where = _bad_json_line(data)
        if where:
            raise DataError(f"cannot read {uri}{where}")
        return datasets.Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])
    except (ValueError, TypeError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from None


def _load_hub(name: str, split: str, subset: str | None) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all reach users as one clear error
        raise DataError(f"cannot load hub dataset {name!r} (subset={subset!r}, split={split!r}): "
                        f"{type(exc).__name__}: {str(exc)[:300]}. Without network, use a local file "
                        f"or a synthetic:NAME set.") from None
