"""Adapter sources (allow-list, SSRF, size limits, clean-up) and secrets, on the real file system."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llm_platform.errors import ConfigError
from llm_platform.serving.errors import APIError
from llm_platform.serving.secrets import Secrets
from llm_platform.serving.sources import AdapterSources


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value.status, info.value.message


@pytest.fixture
def lora(adapters, tmp_path, monkeypatch) -> Path:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's temp folders only
    return shutil.copytree(adapters["tiny-s"]["lora"], tmp_path / "allowed" / "lora")


def leftover_temp_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("llmp-adapter-*")}


def test_local_sources_must_lie_inside_an_allowed_root(lora, tmp_path):
    sources = AdapterSources([str(tmp_path / "allowed")])
    folder = sources.fetch(str(lora), 2**20)
    try:
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    finally:
        shutil.rmtree(folder)
    outside = shutil.copytree(lora, tmp_path / "elsewhere")
    assert status_of(sources.resolve, str(outside))[0] == 403
    assert status_of(sources.resolve, str(lora / ".." / ".." / "elsewhere"))[0] == 403
    assert status_of(sources.resolve, "/etc")[0] == 403
    assert status_of(sources.resolve, "relative/lora")[0] == 400
    # A link inside the root pointing out of it is followed, then refused.
    (tmp_path / "allowed" / "link").symlink_to(outside)
    assert status_of(sources.resolve, str(tmp_path / "allowed" / "link"))[0] == 403
    sneaky = tmp_path / "allowed" / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    shutil.copy(lora / "adapter_model.safetensors", sneaky)
    assert "links outside" in status_of(sources.fetch, str(sneaky), 2**20)[1]
    assert leftover_temp_folders() == set()
    assert "none (set adapter_sources" in status_of(AdapterSources([]).resolve, str(lora))[1]


def test_uri_sources_refuse_options_and_unlisted_prefixes():
    sources = AdapterSources(["s3://models/runs?endpoint_override=127.0.0.1:9000&scheme=http", "gs://team/adapters"])
    assert sources.resolve("s3://models/runs/a/adapter") == \
        "s3://models/runs/a/adapter?endpoint_override=127.0.0.1:9000&scheme=http"
    assert sources.resolve("gs://team/adapters/x") == "gs://team/adapters/x"
    for uri in ("s3://models/runs/a?endpoint_override=10.0.0.5:80&scheme=http",  # SSRF: the client names a host
                "s3://models/runs/a#frag", "s3://models/other/a", "s3://other-bucket/runs/a",
                "s3://models/runs/../secrets", "s3://key:secret@models/runs/a", "gs://team/adapters-evil/x",
                "hdfs://namenode/runs/a"):
        status, message = status_of(sources.resolve, uri)
        assert status == 403, uri
    assert "may not carry options" in status_of(sources.resolve, "s3://models/runs/a?scheme=http")[1]


def test_size_limit_stops_the_copy_and_leaves_no_temp_folder(lora, tmp_path):
    sources = AdapterSources([str(tmp_path / "allowed")])
    size = (lora / "adapter_model.safetensors").stat().st_size
    status, message = status_of(sources.fetch, str(lora), size - 1)
    assert status == 413 and "limits.max_adapter_bytes" in message
    assert leftover_temp_folders() == set()
    assert status_of(sources.fetch, str(tmp_path / "allowed" / "missing"), 2**20)[0] == 400


def test_secrets_compare_in_constant_time_and_never_show(tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text("s3cret-admin\n")
    secrets = Secrets.from_environment({"LLMP_ADMIN_KEY_FILE": str(key_file), "LLMP_API_KEY": "user-key"})
    assert secrets.bearer_matches("LLMP_ADMIN_KEY", "Bearer s3cret-admin")
    assert not secrets.bearer_matches("LLMP_ADMIN_KEY", "Bearer s3cret-admi")
    assert not secrets.bearer_matches("LLMP_ADMIN_KEY", None)
    assert not secrets.bearer_matches("LLMP_API_KEY", "Bearer s3cret-admin")
    assert "s3cret" not in repr(secrets) and "user-key" not in repr(secrets)
    assert "HF_TOKEN" not in secrets
    with pytest.raises(ConfigError, match="LLMP_ADMIN_KEY_FILE: cannot read"):
        Secrets.from_environment({"LLMP_ADMIN_KEY_FILE": str(tmp_path / "absent")})
    assert os.environ.get("LLMP_ADMIN_KEY") != "s3cret-admin"
