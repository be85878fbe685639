"""A job's output_dir seen from the driver and from rank 0 (``JobOutputs``): a local folder is written in
place only where the driver's marker is visible; an s3:// output_dir is staged on the worker's node and
uploaded, and the driver reads everything back from the store."""

from __future__ import annotations

import json

import pytest

from llm_platform.errors import PlatformError
from llm_platform.training.outputs import JobOutputs


def test_a_local_output_dir_is_written_in_place_where_the_driver_left_its_marker(tmp_path):
    outputs = JobOutputs.create(str(tmp_path / "out"))
    folder = outputs.worker_folder()
    assert folder == tmp_path / "out"
    (folder / "adapter").mkdir()
    (folder / "adapter" / "weights").write_bytes(b"w")
    (folder / "summary.json").write_text(json.dumps({"output": "adapter"}))
    outputs.publish(folder)
    assert outputs.read_json("summary.json") == {"output": "adapter"}
    outputs.finish()
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "summary.json"]  # the marker is gone


def test_a_folder_the_worker_node_does_not_see_fails_with_what_to_use(tmp_path):
    """The worker's node has a folder at that path, but not the driver's: another machine's disk."""
    driver = JobOutputs.create(str(tmp_path / "out"))
    elsewhere = JobOutputs(str(tmp_path / "other-node-out"), driver.run_id)
    (tmp_path / "other-node-out").mkdir()
    with pytest.raises(PlatformError, match=r"does not see.*s3:// or gs:// URI"):
        elsewhere.worker_folder()


def test_an_s3_output_dir_is_staged_uploaded_and_read_back_from_the_store(s3):
    uri = s3.uri("outputs")
    driver = JobOutputs.create(uri)
    driver.write_text("config.yaml", "model: tiny\n")
    worker = JobOutputs(**driver.as_dict())  # what rank 0 gets, through Ray Train's loop config
    folder = worker.worker_folder()
    assert not str(folder).startswith("s3") and folder.is_dir()
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    (folder / "summary.json").write_text(json.dumps({"output": "adapter", "steps": 3}))
    worker.publish(folder)
    assert not folder.exists()  # the staging folder is removed once uploaded
    assert driver.read_json("summary.json") == {"output": "adapter", "steps": 3}
    assert driver.location("adapter") == f"{uri}/adapter"
    driver.finish()
    assert s3.listing(uri) == ["adapter/adapter_model.safetensors", "config.yaml", "summary.json"]
    assert s3.read(f"{uri}/adapter/adapter_model.safetensors") == b"\0" * 1000
    with pytest.raises(PlatformError, match="ended without writing .*/missing.json"):
        driver.read_json("missing.json")
    # The search copies its best trial's adapter within the store; a second copy replaces the first.
    assert driver.copy_within(f"{uri}/adapter", "best_adapter") == f"{uri}/best_adapter"
    driver.copy_within(f"{uri}/adapter", "best_adapter")
    assert [p for p in s3.listing(uri) if p.startswith("best_adapter/")] == ["best_adapter/adapter_model.safetensors"]


def test_a_model_published_to_s3_loads_by_its_uri(s3, tiny_models):
    """What a job on another node published (``s3://.../model``) is what the next job names as its model."""
    import pyarrow.fs as pafs
    import torch

    from llm_platform.models.loading import load_causal_lm, load_tokenizer, resolve_model
    from llm_platform.storage import open_filesystem

    uri = s3.uri("published-model")
    fs, path = open_filesystem(uri)
    pafs.copy_files(str(tiny_models["tiny-s"]), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    local = resolve_model(uri)
    assert resolve_model(uri) == local != str(tiny_models["tiny-s"])  # downloaded once per node
    ids = load_tokenizer(uri)("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = load_causal_lm(uri)(ids).logits
        reference = load_causal_lm(str(tiny_models["tiny-s"]))(ids).logits
    assert torch.equal(ours, reference)
    with pytest.raises(PlatformError, match="no config.json"):
        resolve_model(s3.uri("nothing-here"))
