"""Rollout and reward actors for RLHF, and the pool that keeps them alive.

A :class:`RolloutWorker` is a Ray actor holding one inference engine (vLLM by default,
transformers as the alternative: the same engine interface serving uses). It samples
responses for a batch of prompts and returns, per response, the token ids and the
log-probability the engine gave each sampled token, which the trainer later checks
against its own recomputation. New policy weights arrive as a new adapter version
(:class:`AdapterVersion`: the adapter's files, through Ray's object store, since the actors
may run on other nodes than the trainer), loaded into the running engine (no restart). A :class:`RewardWorker` holds the reward
model. The :class:`RolloutPool` splits batches over the workers and replaces a worker
that dies, retrying its share, so one lost process does not end a long run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayActorError

from llm_platform import console
from llm_platform.engine import AdapterRef, EngineConfig, SamplingParams


@dataclass
class Sample:
    """One prompt and the response sampled for it."""

    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    response_text: str


@dataclass(frozen=True)
class AdapterVersion:
    """A policy adapter version as its files' bytes (a LoRA of a small model: a few MB). Shipped to the
    rollout actors by value, so an actor on any node can load it: a path on the trainer's disk would
    exist only on the trainer's node."""

    name: str
    version: int
    files: dict[str, bytes]

    @classmethod
    def from_folder(cls, folder: Path, name: str, version: int) -> "AdapterVersion":
        return cls(name, version, {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()})

    def write(self, root: Path) -> AdapterRef:
        """The files under ``root`` on this node, as the reference an engine loads."""
        folder = root / f"{self.name}-v{self.version}"
        folder.mkdir(parents=True, exist_ok=True)
        for filename, data in self.files.items():
            (folder / filename).write_bytes(data)
        return AdapterRef(name=self.name, kind="lora", path=str(folder), version=self.version)


def chat_prompt_ids(tokenizer, user_turn: str) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant's response starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_turn}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


class RolloutWorker:
    """An inference engine in a Ray actor (async: many requests batch inside the engine)."""

    def __init__(self, engine: EngineConfig):
        self.config = engine
        self.engine = None
        self.adapter: AdapterRef | None = None
        self.adapters_dir = Path(tempfile.mkdtemp(prefix="llmp-rollout-adapters-"))  # on this actor's node

    async def start(self) -> str:
        from llm_platform.engine import build_engine

        self.engine = build_engine(self.config)
        # The first requests compile kernels; do it now so the first iteration's timing is real.
        await self.engine.generate([1, 2, 3], SamplingParams(temperature=1.0, max_tokens=4))
        return self.config.kind

    async def set_adapter(self, version: AdapterVersion) -> float:
        """Load ``version`` (the new policy) and make it the one sampled from; returns seconds."""
        start = time.perf_counter()
        adapter = version.write(self.adapters_dir)
        await self.engine.load_adapter(adapter)
        previous, self.adapter = self.adapter, adapter
        if previous is not None and previous.key != adapter.key:
            await self.engine.unload_adapter(previous)
            shutil.rmtree(previous.path, ignore_errors=True)
        return time.perf_counter() - start

    async def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        results = await asyncio.gather(*(self.engine.generate(p, params, self.adapter) for p in prompts))
        return [Sample(r.prompt_token_ids, r.choices[0].token_ids, r.choices[0].logprobs or [], r.choices[0].text)
                for r in results]

    def pid(self) -> int:
        import os

        return os.getpid()

    def cleanup(self) -> None:
        shutil.rmtree(self.adapters_dir, ignore_errors=True)


class RewardWorker:
    """The reward model in a Ray actor: scores prompt + response texts."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False):
        from llm_platform.alignment.reward import RewardScorer

        self.scorer = RewardScorer(path, device, dtype=dtype, trust_remote_code=trust_remote_code)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score(prompts, responses)


class RolloutPool:
    """``size`` rollout actors; a dead one is replaced and its share of the batch retried.

    The actors start their engines in the background from construction on (so a trainer can build its policy
    meanwhile); :meth:`wait_ready` waits for them, and raises what an engine's start raised."""

    def __init__(self, engine: EngineConfig, size: int, num_cpus: float, num_gpus: float, name: str):
        self.engine, self.size, self.name = engine, size, name
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": 64}
        self.workers = [self._spawn(i) for i in range(size)]
        self._starting = [w.start.remote() for w in self.workers]
        self.adapter: AdapterVersion | None = None
        self.replaced = 0

    def wait_ready(self) -> None:
        ray.get(self._starting)

    def _spawn(self, index: int):
        actor = ray.remote(RolloutWorker).options(name=f"{self.name}-rollout-{index}", **self.options)
        return actor.remote(self.engine)

    def _replace(self, index: int) -> None:
        console.progress(f"rollout worker {index} died; starting a replacement")
        try:
            ray.kill(self.workers[index])
        except Exception:  # already gone
            pass
        self.workers[index] = self._spawn(index)
        ray.get(self.workers[index].start.remote())
        if self.adapter is not None:
            ray.get(self.workers[index].set_adapter.remote(self.adapter))
        self.replaced += 1

    def set_adapter(self, version: AdapterVersion) -> float:
        """Every worker switches to ``version``; returns the slowest worker's load time."""
        self.adapter = version
        shipped = ray.put(version)  # stored once, fetched by each actor's node
        return max(self._call_all([lambda w: w.set_adapter.remote(shipped)] * self.size))

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        shares = [prompts[i::self.size] for i in range(self.size)]
        results = self._call_all([lambda w, s=share: w.generate.remote(s, params) for share in shares])
        samples: list[Sample | None] = [None] * len(prompts)
        for i, share in enumerate(results):
            samples[i::self.size] = share
        return samples

    def _call_all(self, calls: list, attempts: int = 3) -> list:
        """``calls[i](worker i)`` on every worker; a worker that dies is replaced and its call retried."""
        results = [None] * self.size
        pending = list(range(self.size))
        for _ in range(attempts):
            refs = {i: calls[i](self.workers[i]) for i in pending}
            failed = []
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref)
                except RayActorError:
                    failed.append(i)
            if not failed:
                return results
            for i in failed:
                self._replace(i)
            pending = failed
        raise RuntimeError(f"rollout workers {pending} kept failing after {attempts} attempts")

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                ray.get(worker.cleanup.remote(), timeout=60)
            except Exception:  # a dead actor: nothing to ask it
                pass
            ray.kill(worker)
