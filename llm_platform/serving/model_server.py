"""One base model behind the endpoint: a Serve deployment holding an engine and its adapters.

Adapters are loaded through Serve's model multiplexing, keyed by ``BASE:NAME@VERSION``:
Serve routes a request to a replica that already holds its adapter when it can, and
each replica keeps an LRU of ``max_adapters``. A replaced or deleted adapter is
dropped from the engine once no request of this replica still uses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from llm_platform.engine import AdapterRef, Choice, SamplingParams, build_engine
from llm_platform.errors import SamplingError
from llm_platform.serving import openai_format
from llm_platform.serving.adapter_store import AdapterStore, StoredAdapter
from llm_platform.serving.config import ModelSpec
from llm_platform.serving.errors import APIError
from llm_platform.serving.metrics import ServingMetrics
from llm_platform.serving.secrets import Secrets
from llm_platform.storage import STORAGE_ENV

logger = logging.getLogger("ray.serve")
STORE_RETRY_AFTER_S = 5.0


@dataclass
class GenerateRequest:
    """What the ingress hands a model replica (validated already)."""

    kind: str
    """"completion" or "chat"."""
    model: str
    """The model id the client asked for (echoed in responses)."""
    sampling: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    adapter: StoredAdapter | None = None
    """Resolved here, on the replica's node: a remote store's files are fetched where they are used."""
    include_usage: bool = False


class _LoadedAdapter:
    """What Serve's multiplex LRU holds; evicting it unloads the adapter from the engine."""

    def __init__(self, server: ModelServer, ref: AdapterRef):
        self.server, self.ref = server, ref

    async def __del__(self):
        await self.server.evict(self.ref)


class ModelServer:
    def __init__(self, spec: dict, store_uri: str, sync_s: float = 1.0, secrets: Secrets | None = None):
        self.spec = ModelSpec.model_validate(spec)
        self.model_id = self.spec.id
        (secrets or Secrets()).export("HF_TOKEN", *STORAGE_ENV)  # gated hub weights; s3:// adapters on any node
        self.engine = build_engine(self.spec.engine.model_copy(update={"served_name": self.spec.id}))
        self.tokenizer = self.engine.tokenizer
        self.store_uri = store_uri
        self._store: AdapterStore | None = None  # opened on first use: the base serves while the store is away
        self.metrics = ServingMetrics()
        self.sync_s = sync_s
        # One thread: a fast tokenizer used from two threads at once fails ("Already borrowed").
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._gauge_task: asyncio.Task | None = None
        self._refs: dict[str, AdapterRef] = {}
        self._inflight: Counter[str] = Counter()
        self._evicted: set[str] = set()
        self._resident: set[str] = set()  # keys in Serve's multiplex LRU
        self._sync_task: asyncio.Task | None = None

        async def load(key: str) -> _LoadedAdapter:
            ref = self._refs[key]
            await self.engine.load_adapter(ref)
            self._resident.add(key)
            self.metrics.adapter(self.model_id, "load")
            return _LoadedAdapter(self, ref)

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=self.spec.max_adapters)(load)

    async def ready(self) -> bool:
        """Answered once the engine is up (the constructor has returned)."""
        return True

    async def check_health(self) -> None:
        """Serve's periodic probe: raising marks this replica unhealthy, and Serve replaces it."""
        await self.engine.check_health()

    @property
    def store(self) -> AdapterStore:
        if self._store is None:
            try:
                self._store = AdapterStore(self.store_uri)
            except Exception as exc:
                raise APIError(503, f"the adapter store is unavailable ({type(exc).__name__}); retry later",
                               code="adapter_store_unavailable", retry_after_s=STORE_RETRY_AFTER_S) from None
        return self._store

    def _store_ref(self, entry: StoredAdapter) -> AdapterRef:
        try:
            return self.store.ref(entry)
        except APIError:
            raise
        except Exception as exc:
            raise APIError(503, f"the adapter store is unavailable ({type(exc).__name__}); retry later",
                           code="adapter_store_unavailable", retry_after_s=STORE_RETRY_AFTER_S) from None

    async def generate(self, request: GenerateRequest) -> dict:
        meta = openai_format.ResponseMeta(request.kind, request.model, request.sampling.logprobs or 0)
        choices = [Choice(index=i) for i in range(request.sampling.n)]
        async for ids, chunk in self._chunks(request):
            choices[chunk.index].add(chunk)
        return openai_format.whole(meta, choices, len(ids), self.tokenizer)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict]:
        meta = openai_format.ResponseMeta(request.kind, request.model, request.sampling.logprobs or 0)
        started, produced = set(), 0
        async for ids, chunk in self._chunks(request):
            produced += len(chunk.token_ids)
            yield openai_format.piece(meta, chunk, self.tokenizer, first=chunk.index not in started)
            started.add(chunk.index)
        if request.include_usage:
            yield openai_format.usage_piece(meta, len(ids), produced)

    async def _chunks(self, request: GenerateRequest):
        """Engine chunks for ``request``, with its adapter held and metrics recorded."""
        self._start_sync()
        adapter = await asyncio.to_thread(self._store_ref, request.adapter) if request.adapter else None
        kind, status = (adapter.kind if adapter else "base"), "error"
        name = request.adapter.name if request.adapter else ""
        start, first, produced = time.perf_counter(), True, 0
        if adapter is not None:
            await self._hold(adapter)
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._prompt_ids, request)
            async for chunk in self.engine.stream(ids, request.sampling, adapter):
                if first:
                    self.metrics.first_token(self.model_id, time.perf_counter() - start, adapter=name)
                    first = False
                produced += len(chunk.token_ids)
                yield ids, chunk
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):  # the client left
            status = "cancelled"
            raise
        finally:
            self.metrics.tokens(self.model_id, produced, adapter=name)
            self.metrics.request(self.model_id, kind, status, adapter=name)
            self.metrics.latency(self.model_id, time.perf_counter() - start, status, adapter=name)
            if adapter is not None:
                await self._release(adapter)

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.kind == "chat":
            if not getattr(self.tokenizer, "chat_template", None):
                raise SamplingError("messages", f"model {self.model_id} has no chat template; use /v1/completions")
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return self.engine.encode(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.engine.encode(request.prompt)

    async def _hold(self, adapter: AdapterRef) -> None:
        key = adapter.key
        self._refs[key] = adapter
        self._inflight[key] += 1
        hit = key in self._resident
        await self._get_adapter(key)
        if hit:
            self.metrics.adapter(self.model_id, "cache_hit")
        self._evicted.discard(key)

    async def _release(self, adapter: AdapterRef) -> None:
        key = adapter.key
        self._inflight[key] -= 1
        if not self._inflight[key]:
            del self._inflight[key]
            if key in self._evicted:
                await self._unload(adapter)

    async def evict(self, ref: AdapterRef) -> None:
        """Called when Serve's LRU drops an adapter: unload now, or when its last request ends."""
        self.metrics.adapter(self.model_id, "evict")
        self._resident.discard(ref.key)
        self._evicted.add(ref.key)
        if not self._inflight[ref.key]:
            await self._unload(ref)

    async def _unload(self, ref: AdapterRef) -> None:
        self._evicted.discard(ref.key)
        await self.engine.unload_adapter(ref)

    def _start_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        if self._gauge_task is None or self._gauge_task.done():
            self._gauge_task = asyncio.get_running_loop().create_task(self._gauge_loop())

    async def _gauge_loop(self) -> None:
        """The engine's own count of unfinished requests, as a Ray gauge (aborted requests leave it)."""
        while True:
            self.metrics.engine_requests(self.model_id, self.engine.num_unfinished_requests())
            await asyncio.sleep(1.0)

    async def _sync_loop(self) -> None:
        """Drop adapters the store replaced or deleted, once no request here uses them."""
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                manifest = await asyncio.to_thread(lambda: self.store.manifest())
            except Exception as exc:  # the store is away: keep what is loaded, look again later
                logger.warning("adapter store unavailable: %s", exc)
                continue
            current = {e.key for e in manifest.values()}
            for key, ref in list(self._refs.items()):
                if key not in current and not self._inflight[key]:
                    del self._refs[key]
                    await self._unload(ref)

    def shutdown(self) -> None:
        for task in (self._sync_task, self._gauge_task):
            if task is not None:
                task.cancel()
        self._tokenize_pool.shutdown(wait=False)
        self.engine.shutdown()
