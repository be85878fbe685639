"""The adapter store on a local folder and on a real S3 server (SeaweedFS): versions, deletion,
concurrent writers (threads and processes), and readers that never see half an adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llm_platform.serving.adapter_store import ADAPTER_FILES, AdapterStore
from llm_platform.storage import open_filesystem

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").uri("store")


def adapter_folder(root: Path, tag: str, size: int = 200_000) -> Path:
    """A folder with the two adapter files; the store copies bytes, so their content only has to be
    recognisable (``tag`` in the config, a weights file whose every byte derives from ``tag``)."""
    folder = root / tag
    folder.mkdir(parents=True)
    (folder / ADAPTER_FILES[0]).write_text(json.dumps({"tag": tag}))
    (folder / ADAPTER_FILES[1]).write_bytes((tag.encode() * (size // len(tag) + 1))[:size])
    return folder


def tag_of(folder: str) -> str:
    """The tag of a stored version's files, checking that they are whole and belong together."""
    tag = json.loads((Path(folder) / ADAPTER_FILES[0]).read_text())["tag"]
    weights = (Path(folder) / ADAPTER_FILES[1]).read_bytes()
    assert weights == (tag.encode() * (len(weights) // len(tag) + 1))[:len(weights)] and len(weights) == 200_000
    return tag


def listing(uri: str) -> set[str]:
    """Every file under the store, relative to its root."""
    import pyarrow.fs as pafs

    fs, root = open_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File}


def test_put_replace_delete_and_put_again(store_uri, tmp_path):
    store = AdapterStore(store_uri, cache_dir=str(tmp_path / "cache"))
    first = store.put("tiny-s", "a", "lora", adapter_folder(tmp_path, "one"))
    assert (first.version, first.kind) == (1, "lora")
    assert tag_of(store.ref(first).path) == "one"
    second = store.put("tiny-s", "a", "lora", adapter_folder(tmp_path, "two"))
    third = store.put("tiny-s", "a", "soft_prompt", adapter_folder(tmp_path, "three"))
    assert (second.version, third.version) == (2, 3) and len({first.key, second.key, third.key}) == 3
    assert store.get("tiny-s", "a") == third and list(store.manifest()) == ["tiny-s:a"]
    ref = store.ref(third)
    assert tag_of(ref.path) == "three" and ref.key == third.key and ref.kind == "soft_prompt"
    # The previous version stays for requests in flight; older ones are gone, records and files.
    files = listing(store_uri)
    assert not any(first.path in f for f in files)
    assert {f"{v.path}/{name}" for v in (second, third) for name in ADAPTER_FILES} <= files

    assert store.remove("tiny-s", "a") == third
    assert store.get("tiny-s", "a") is None and store.manifest() == {}
    assert store.remove("tiny-s", "a") is None and store.remove("tiny-s", "never") is None
    again = store.put("tiny-s", "a", "lora", adapter_folder(tmp_path, "four"))
    assert again.version > third.version  # numbering continues across the deletion: no version reused
    assert tag_of(store.ref(again).path) == "four"
    assert AdapterStore(store_uri).manifest() == {"tiny-s:a": again}  # a fresh process sees the same


def test_uncommitted_upload_is_invisible_and_bad_names_are_refused(store_uri, tmp_path):
    store = AdapterStore(store_uri, cache_dir=str(tmp_path / "cache"))
    fs, root = open_filesystem(store_uri)
    fs.create_dir(f"{root}/adapters/tiny-s/crashed/0123456789ab")
    with fs.open_output_stream(f"{root}/adapters/tiny-s/crashed/0123456789ab/{ADAPTER_FILES[0]}") as f:
        f.write(b"{}")  # a writer that died after its upload, before its record
    assert store.manifest() == {} and store.get("tiny-s", "crashed") is None
    for base, name, field in (("tiny-s", "../x", "name"), ("a/b", "x", "base"), ("tiny-s", "..", "name")):
        with pytest.raises(ValueError, match=field):
            store.put(base, name, "lora", adapter_folder(tmp_path, f"bad{len(field)}{len(name)}{len(base)}"))
        assert store.remove(base, name) is None


def test_concurrent_writers_lose_no_entry_and_never_share_a_version(store_uri, tmp_path):
    """Threads and separate processes (as two ingress replicas would) write at once: every distinct
    name is listed, and racing writers of one name each get a version of their own."""
    store = AdapterStore(store_uri, cache_dir=str(tmp_path / "cache"))
    folders = [adapter_folder(tmp_path, f"t{i}") for i in range(6)]
    script = ("import sys, json; from pathlib import Path; from llm_platform.serving.adapter_store import AdapterStore;"
              "e = AdapterStore(sys.argv[1]).put('tiny-s', sys.argv[2], 'lora', Path(sys.argv[3]));"
              "print(json.dumps({'version': e.version, 'uid': e.uid}))")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    processes = [subprocess.Popen([sys.executable, "-c", script, store_uri, name, str(folder)], env=env,
                                  stdout=subprocess.PIPE, text=True)
                 for name, folder in (("p0", adapter_folder(tmp_path, "p0")), ("p1", adapter_folder(tmp_path, "p1")),
                                      ("same", adapter_folder(tmp_path, "p2")))]
    with ThreadPoolExecutor(6) as pool:
        distinct = list(pool.map(lambda i: store.put("tiny-s", f"t{i}", "lora", folders[i]), range(3)))
        same = list(pool.map(lambda i: store.put("tiny-s", "same", "lora", folders[i]), range(3, 6)))
    from_processes = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        from_processes.append(json.loads(out))

    manifest = store.manifest()
    assert set(manifest) == {"tiny-s:t0", "tiny-s:t1", "tiny-s:t2", "tiny-s:p0", "tiny-s:p1", "tiny-s:same"}
    assert [manifest[f"tiny-s:t{i}"] for i in range(3)] == distinct
    assert tag_of(store.ref(manifest["tiny-s:p1"]).path) == "p1"
    # Four writers of "same" (three threads, one process): four different versions, the highest is current.
    versions = sorted([e.version for e in same] + [from_processes[2]["version"]])
    assert len(set(versions)) == 4 and manifest["tiny-s:same"].version == versions[-1]
    assert tag_of(store.ref(manifest["tiny-s:same"]).path) in {"t3", "t4", "t5", "p2"}


def test_readers_never_see_half_an_adapter(store_uri, tmp_path):
    store = AdapterStore(store_uri, cache_dir=str(tmp_path / "cache"))
    folders = [adapter_folder(tmp_path, f"v{i}") for i in range(6)]
    store.put("tiny-s", "hot", "lora", folders[0])
    done, seen, errors = threading.Event(), [], []

    def read():
        reader = AdapterStore(store_uri, cache_dir=str(tmp_path / "reader-cache"))
        while not done.is_set():
            try:
                entry = reader.manifest()["tiny-s:hot"]
                seen.append((entry.version, tag_of(reader.ref(entry).path)))
            except FileNotFoundError as exc:  # fine only for a version pruned meanwhile (two newer ones exist)
                if reader.get("tiny-s", "hot").version <= entry.version + 1:
                    errors.append(exc)
            except Exception as exc:  # noqa: BLE001 - any other failure is a half-visible adapter
                errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    for folder in folders[1:]:
        store.put("tiny-s", "hot", "lora", folder)
    done.set()
    for thread in readers:
        thread.join(60)
    assert not errors, errors
    assert seen and all(tag == f"v{version - 1}" for version, tag in seen)  # version N is always folder N-1
    assert seen[-1][0] >= 2
