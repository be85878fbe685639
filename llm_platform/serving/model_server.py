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

from llm_platform.engine import AdapterRef, Chunk, Choice, SamplingParams, build_engine
from llm_platform.errors import SamplingError
from llm_platform.serving import openai_format
from llm_platform.serving.adapter_store import AdapterStore, StoredAdapter
from llm_platform.serving.config import ModelSpec
from llm_platform.serving.cpu_cores import keep_serving_off_engine_cores, widen_this_thread
from llm_platform.serving.errors import APIError
from llm_platform.serving.metrics import ServingMetrics
from llm_platform.serving.pacing import StreamPacer
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
    prompts: list[str | list[int]] | None = None
    """Completions: one or more prompts, each answered with ``n`` choices (indexed prompt-major)."""
    messages: list[dict] | None = None
    adapter: StoredAdapter | None = None
    """Resolved here, on the replica's node: a remote store's files are fetched where they are used."""
    include_usage: bool = False
    echo: bool = False
    """Completions: return each prompt before its completion (and its log-probabilities with logprobs)."""
    echo_only: bool = False
    """echo with max_tokens 0: the one token generated is dropped."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


async def _reindexed(chunks: AsyncIterator[Chunk], offset: int) -> AsyncIterator[Chunk]:
    async for chunk in chunks:
        chunk.index += offset
        yield chunk


async def _merged(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[Chunk]:
    """The chunks of several streams as they come (one prompt's stream alone is passed through)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for chunk in stream:
                await queue.put(chunk)
            await queue.put(done)
        except BaseException as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _LoadedAdapter:
    """What Serve's multiplex LRU holds; evicting it unloads the adapter from the engine."""

    def __init__(self, server: ModelServer, ref: AdapterRef):
        self.server, self.ref = server, ref

    async def __del__(self):
        await self.server.evict(self.ref)


def render_chat(tokenizer, model_id: str, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a chat request's ``messages`` through the model's own chat template (transformers'
    apply_chat_template): whatever the family (Llama-2, Llama-3, ChatML, ...), nothing here knows its markup."""
    if not getattr(tokenizer, "chat_template", None):
        raise SamplingError("messages", f"model {model_id} has no chat template; use /v1/completions")
    kwargs = dict(chat_template_kwargs or {})
    clash = {"messages", "add_generation_prompt", "continue_final_message", "tokenize"} & set(kwargs)
    if clash:
        raise SamplingError("chat_template_kwargs", f"may not set {sorted(clash)}; use the request fields")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             tokenize=False, **kwargs)
    except Exception as exc:  # a template error (jinja raise_exception, bad kwargs) is the request's fault
        raise SamplingError("messages", f"the chat template refused them: {exc}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ModelServer:
    def __init__(self, spec: dict, store_uri: str, sync_s: float = 1.0, secrets: Secrets | None = None):
        self.spec = ModelSpec.model_validate(spec)
        self.model_id = self.spec.id
        (secrets or Secrets()).export("HF_TOKEN", *STORAGE_ENV)  # gated hub weights; s3:// adapters on any node
        widen_this_thread()
        self.engine = build_engine(self.spec.engine.model_copy(update={"served_name": self.spec.id}))
        keep_serving_off_engine_cores()  # on CPU: vLLM's worker cores for its workers alone (see cpu_cores.py)
        self.tokenizer = self.engine.tokenizer
        self.store_uri = store_uri
        self._store: AdapterStore | None = None  # opened on first use: the base serves while the store is away
        self.metrics = ServingMetrics()
        self._pacer = StreamPacer(self.spec.stream_batching_interval_ms, self.spec.stream_messages_per_s)
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
        meta = self._meta(request)
        prompts = await self._tokenized(request)
        choices = [Choice(index=i) for i in range(len(prompts) * request.sampling.n)]
        async for chunk in self._chunks(request, prompts, whole=True):
            choices[chunk.index].add(chunk)
        generated = 0 if request.echo_only else sum(len(c.token_ids) for c in choices)
        if request.echo:
            choices = [self._echoed(choice, prompts[choice.index // request.sampling.n], request)
                       for choice in choices]
        return openai_format.whole(meta, choices, sum(len(p) for p in prompts), self.tokenizer,
                                   completion_tokens=generated)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[list[dict]]:
        """The response's pieces, in lists, one list per message to the ingress (each crossing costs the
        replica, the ingress and the proxy a Ray round): paced by ``stream_batching_interval_ms`` and the
        replica's ``stream_messages_per_s`` (see :mod:`llm_platform.serving.pacing`). The ingress sends each
        piece as its own event."""
        batches = self._pacer.stream(self._pieces(request))
        try:
            async for batch in batches:
                yield batch
        finally:  # the client left (Serve closes this generator): stop generating now, freeing the engine slot
            await batches.aclose()

    async def _pieces(self, request: GenerateRequest) -> AsyncIterator[dict]:
        meta = self._meta(request)
        prompts = await self._tokenized(request)
        started, produced, n = set(), 0, request.sampling.n
        async for chunk in self._chunks(request, prompts):
            generated = 0 if request.echo_only else len(chunk.token_ids)
            if request.echo and chunk.index not in started:
                whole = Choice(index=chunk.index)
                whole.add(chunk)
                echoed = self._echoed(whole, prompts[chunk.index // n], request)
                chunk = Chunk(index=chunk.index, text=echoed.text, token_ids=echoed.token_ids,
                              logprobs=echoed.logprobs, top_logprobs=echoed.top_logprobs,
                              finish_reason=chunk.finish_reason)
            elif request.echo_only:
                continue
            produced += generated
            yield openai_format.piece(meta, chunk, self.tokenizer, first=chunk.index not in started)
            started.add(chunk.index)
        if request.include_usage:
            yield openai_format.usage_piece(meta, sum(len(p) for p in prompts), produced)

    @staticmethod
    def _meta(request: GenerateRequest) -> openai_format.ResponseMeta:
        return openai_format.ResponseMeta(request.kind, request.model, request.sampling.logprobs or 0)

    def _echoed(self, choice: Choice, prompt_ids: list[int], request: GenerateRequest) -> Choice:
        """The choice with its prompt in front (vLLM's echo): text, tokens and, with logprobs, their scores."""
        original = request.prompts[choice.index // request.sampling.n]
        text = original if isinstance(original, str) else self.tokenizer.decode(prompt_ids)  # as vLLM echoes
        echoed = Choice(index=choice.index, text=text, token_ids=list(prompt_ids),
                        finish_reason=choice.finish_reason or ("length" if request.echo_only else None))
        if request.sampling.logprobs is not None:
            echoed.logprobs = list(choice.prompt_logprobs or [None] * len(prompt_ids))
            echoed.top_logprobs = list(choice.prompt_top_logprobs or [None] * len(prompt_ids))
        if not request.echo_only:
            echoed.add(Choice(index=choice.index, text=choice.text, token_ids=choice.token_ids,
                              logprobs=choice.logprobs, top_logprobs=choice.top_logprobs))
        return echoed

    async def _tokenized(self, request: GenerateRequest) -> list[list[int]]:
        """The prompts' token ids, computed off the event loop (a huge prompt must not stall other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, self._prompt_ids, request)

    async def _chunks(self, request: GenerateRequest, prompts: list[list[int]], whole: bool = False):
        """Engine chunks of every prompt, re-indexed prompt-major, with the adapter held and metrics recorded.

        ``whole``: only finished choices are wanted (a non-streamed response): the engine skips per-token
        outputs where it can."""
        self._start_sync()
        adapter = await asyncio.to_thread(self._store_ref, request.adapter) if request.adapter else None
        kind, status = (adapter.kind if adapter else "base"), "error"
        name = request.adapter.name if request.adapter else ""
        start, first, produced = time.perf_counter(), True, 0
        if adapter is not None:
            await self._hold(adapter)
        try:
            streams = [_reindexed(self.engine.stream(ids, request.sampling, adapter, whole=whole),
                                  i * request.sampling.n) for i, ids in enumerate(prompts)]
            async for chunk in _merged(streams):
                if first:
                    # A whole answer carries the engine's own time to its first token.
                    self.metrics.first_token(self.model_id, chunk.first_token_s or time.perf_counter() - start,
                                             adapter=name)
                    first = False
                produced += len(chunk.token_ids)
                yield chunk
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

    def _prompt_ids(self, request: GenerateRequest) -> list[list[int]]:
        if request.kind == "chat":
            return [self.engine.encode(self.render_chat(request.messages, request.add_generation_prompt,
                                                        request.continue_final_message,
                                                        request.chat_template_kwargs))]
        return [self.engine.encode(prompt) for prompt in request.prompts]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[int]:
        return render_chat(self.tokenizer, self.model_id, messages, add_generation_prompt, continue_final_message,
                           chat_template_kwargs)

    async def tokenize(self, prompt: str | None, messages: list[dict] | None, add_special_tokens: bool,
                       add_generation_prompt: bool, continue_final_message: bool,
                       chat_template_kwargs: dict | None) -> list[int]:
        if messages is not None:
            return self.render_chat(messages, add_generation_prompt, continue_final_message, chat_template_kwargs)
        return self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]

    async def token_strings(self, tokens: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for t in tokens):
            raise SamplingError("tokens", f"token ids must be in [0, {vocab})")
        return self.tokenizer.decode(tokens)

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
