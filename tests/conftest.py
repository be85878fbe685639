"""Shared, session-scoped fixtures: the tiny models and adapters are built once, each vLLM
engine is started once, and all async engine calls run on one long-lived event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from llm_platform.models.tiny import TINY_NAMES, build_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


CHAT_FAMILIES = ("llama-2", "llama-3", "chatml")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """``family_models[family]``: tiny-s with a real family's chat template and special tokens (about 1 s each)."""
    root = tmp_path_factory.mktemp("family-models")
    return {family: build_tiny_models(root / family, chat_template=family, sizes=("tiny-s",))["tiny-s"]
            for family in CHAT_FAMILIES}


def make_lora(base: Path, out: Path, seed: int, rank: int = 8, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
              rank_pattern: dict | None = None):
    """A LoRA adapter with random (non-zero) A and B, so it visibly changes the base's output; ``rank_pattern``
    gives some modules another rank (PEFT's per-module ranks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                      rank_pattern=rank_pattern or {}, init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    return out


def make_soft_prompt(base: Path, out: Path, seed: int, tokens: int = 8):
    """A prompt-tuning adapter whose virtual tokens are random embeddings of the base's scale."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tokens))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``adapters[size]["lora" | "soft_prompt"]``: one of each per tiny model."""
    root = tmp_path_factory.mktemp("adapters")
    return {size: {"lora": make_lora(tiny_models[size], root / f"{size}-lora", seed=i),
                   "soft_prompt": make_soft_prompt(tiny_models[size], root / f"{size}-soft", seed=i)}
            for i, size in enumerate(TINY_NAMES)}


class LoopThread:
    """An event loop on its own thread: engines bound to it can be used from any sync test."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop():
    runner = LoopThread()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster in the test process, for jobs run in-process (training, tuning)."""
    import ray

    from llm_platform import console
    from llm_platform.cluster import connect

    connect(num_cpus=2)
    yield
    console.stop_relay()
    ray.shutdown()


_ENGINES: dict = {}
"""The engines the ``engines`` fixture started, by (size, kind)."""


def _shutdown_engines() -> None:
    for engine in _ENGINES.values():
        engine.shutdown()
    _ENGINES.clear()


ENGINE_FRIENDLY = {("data",), ("engine",), ("evaluation",), ("models",)}
"""Test packages that start no server, Ray cluster or training job: the engines started before them stay. An engine
caches adapters by name and version (``AdapterRef.key``), so the adapter names these packages use are distinct."""


def pytest_runtest_teardown(item, nextitem):
    """A vLLM engine holds ~2 GB: when the run moves on to a test package that starts servers, Ray clusters
    or training jobs, the engines started so far are stopped, and each such package starts the few it uses.
    Kept for the whole session, the engine tests' engines sat beside the serving tests' servers and the
    training jobs until Ray's memory monitor killed workers (24 GiB machine). Into the packages of
    ``ENGINE_FRIENDLY`` they stay: the alignment tests' tiny-s vLLM engine serves the engine tests, and
    theirs the evaluation tests (~40 s of start-up each here)."""
    if nextitem is None or not _ENGINES:
        return
    here = Path(__file__).parent
    package, next_package = (i.path.relative_to(here).parts[:-1] for i in (item, nextitem))
    if package != next_package and next_package not in ENGINE_FRIENDLY:
        _shutdown_engines()


@pytest.fixture(scope="session")
def engines(tiny_models, loop):
    """``engines(size, kind)``: one engine per (tiny model, engine kind), started on first use."""
    from llm_platform.engine import EngineConfig, build_engine

    async def start(config):
        return build_engine(config)

    def get(size: str, kind: str):
        if (size, kind) not in _ENGINES:
            _ENGINES[(size, kind)] = loop.run(start(EngineConfig(model=str(tiny_models[size]), kind=kind,
                                                                 max_model_len=512)))
        return _ENGINES[(size, kind)]

    yield get
    _shutdown_engines()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS) per session, reached through plain ``s3://`` URIs.

    Its endpoint and keys are put in this process's environment (the standard AWS variables) for
    the session, so pyarrow, Ray workers and subprocesses started by the tests find it as a user's
    would find MinIO or Ceph; ``s3.uri(prefix)`` gives a fresh location in its bucket."""
    import os

    from tests.seaweedfs import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real two-node Ray cluster per session (see tests/ray_cluster.py): a head that does no work
    and a worker node with private disks. Its nodes get no object-store variables: whatever reaches
    S3 from the worker node must have been handed over the way an application does (runtime_env)."""
    import os

    from llm_platform.storage import STORAGE_ENV
    from tests.ray_cluster import TwoNodeCluster

    cluster = TwoNodeCluster(tmp_path_factory.mktemp("ray-cluster"))
    for name in STORAGE_ENV:
        cluster.env.pop(name, None)
    cluster.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                              os.environ.get("PYTHONPATH")]))
    cluster.start()
    yield cluster
    cluster.stop()
