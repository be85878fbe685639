"""A real server for the serving tests: `llmp serve` in a subprocess, on free local ports, with keys set."""

from __future__ import annotations

import pytest

from llm_platform.serving.process import ServerProcess

ADMIN_KEY, API_KEY = "test-admin-key", "test-api-key"
SERVER_MARK = "LLMP_TEST_SERVER"
LIMITS = {"max_adapter_bytes": 4 * 2**20, "max_soft_prompt_tokens": 64, "max_request_bytes": 2**20}


class Server(ServerProcess):
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def user(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}


# Two sizes behind the one endpoint (tiny-l's vLLM engine is checked against transformers in tests/engine; a
# third engine here would cost ~20 s of start-up for no other check).
SIZES = ("tiny-s", "tiny-m")


# Package scope: its engines are freed before the training tests that follow.
@pytest.fixture(scope="package")
def server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    config = {
        "adapter_store": str(root / "store"),
        "adapter_sync_s": 0.5,
        "adapter_sources": [str(tmp_path_factory.getbasetemp())],
        "limits": LIMITS,
        "models": [{"id": name, "engine": {"model": str(path), "kind": "vllm", "max_model_len": 512},
                    "num_cpus": 0.5, "max_adapters": 4} for name, path in tiny_models.items() if name in SIZES],
    }
    # SERVER_MARK marks every process of this server (Ray's daemons and workers, vLLM's processes inherit it).
    # In this process's session: the tests time its streams from here (llm_platform.serving.process.child_group).
    running = Server(config, root, env={"LLMP_ADMIN_KEY": ADMIN_KEY, "LLMP_API_KEY": API_KEY, SERVER_MARK: str(root)},
                     same_session=True)
    running.start()
    yield running
    running.stop()
