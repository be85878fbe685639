"""The HTTP edge: OpenAI-compatible routes, adapter admin, auth and errors, in front of the models.

The ingress holds no model. It validates requests (pydantic), resolves the model id
(``BASE`` or ``BASE:ADAPTER``) against the deployments and the adapter store, and
forwards to the base model's deployment with the adapter's versioned key as Serve's
multiplexed model id. Every failure leaves as an OpenAI-shaped error body.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

from fastapi import FastAPI, Request
from pyarrow.fs import FileType
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from llm_platform.engine.adapters import inspect_adapter
from llm_platform.errors import AdapterError, SamplingError
from llm_platform.models.loading import load_model_config
from llm_platform.serving.adapter_store import AdapterStore, StoredAdapter, fetch_folder, open_filesystem
from llm_platform.serving.config import ModelSpec
from llm_platform.serving.errors import APIError
from llm_platform.serving.model_server import GenerateRequest
from llm_platform.serving.protocol import AdapterRegistration, ChatRequest, CompletionRequest

HEALTH_TIMEOUT_S = 10.0
app = FastAPI(title="llm-platform", description="OpenAI-compatible serving with hot-swapped adapters")


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
    return APIError(400, f"{param or 'body'}: {first['msg']}", param=param, code=first["type"]).response()


def _as_api_error(exc: Exception) -> APIError:
    """Errors raised in a model replica (they arrive wrapped by Ray) as HTTP errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return APIError(503, "the model is overloaded; retry later", code="overloaded")
    if isinstance(exc, SamplingError):
        return APIError(400, f"{exc.param}: {exc.message}", param=exc.param)
    if isinstance(exc, AdapterError):
        return APIError(422, str(exc), code="invalid_adapter")
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


# Serve pickles the ingress class when it is decorated: helpers it calls must be defined above it.
@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict, specs: list[dict], store_uri: str, sync_s: float = 1.0):
        self.models = models
        self.specs = {s["id"]: ModelSpec.model_validate(s) for s in specs}
        self.store = AdapterStore(store_uri)
        self.sync_s = sync_s
        self._manifest: dict[str, StoredAdapter] = {}
        self._manifest_at = 0.0
        self._write_lock = asyncio.Lock()
        self._configs = {}

    # -- inference -------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        return await self._serve("completion", body, prompt=body.prompt)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        messages = [m.model_dump() for m in body.messages]
        return await self._serve("chat", body, messages=messages)

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        created = int(time.time())
        data = [{"id": mid, "object": "model", "created": created, "owned_by": "llm-platform", "kind": "base",
                 "parent": None} for mid in self.specs]
        data += [self._adapter_card(e) for e in self._adapters().values() if e.base in self.specs]
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self):
        """200 once every model deployment answers; 503 while engines start or replicas are saturated."""
        async def ping(handle):
            return await handle.ready.remote()

        try:
            await asyncio.wait_for(asyncio.gather(*(ping(h) for h in self.models.values())), HEALTH_TIMEOUT_S)
        except Exception:
            raise APIError(503, "models are starting or overloaded; retry later", code="unavailable") from None
        return {"status": "ok", "models": sorted(self.specs)}

    async def _serve(self, kind: str, body, **prompt):
        base, adapter = self._resolve(body.model)
        try:
            sampling = body.sampling_params()
        except SamplingError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        job = GenerateRequest(kind=kind, model=body.model, sampling=sampling, adapter=adapter,
                              include_usage=include_usage, **prompt)
        handle = self.models[base].options(multiplexed_model_id=adapter.key if adapter else "")
        if body.stream:
            return await self._stream(handle.options(stream=True).stream.remote(job))
        try:
            return await handle.generate.remote(job)
        except Exception as exc:
            raise _as_api_error(exc) from None

    async def _stream(self, chunks) -> StreamingResponse:
        # Pull the first chunk before answering so that errors found before any token (an
        # overloaded replica, a prompt too long) still get their proper status code.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            raise _as_api_error(exc) from None

        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as exc:  # mid-stream: the status is sent already, so report in-band
                yield f"data: {json.dumps(_as_api_error(exc).body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def _resolve(self, model_id: str):
        base, sep, name = model_id.partition(":")
        if base not in self.specs:
            raise APIError(404, f"model {model_id!r} does not exist; GET /v1/models lists the served ones",
                           param="model", code="model_not_found")
        if not sep:
            return base, None
        entry = self._adapters().get(model_id)
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
        folder = await asyncio.to_thread(self._fetch_source, body.source)
        try:
            await asyncio.to_thread(inspect_adapter, folder, self._base_config(body.base), engine.max_lora_rank,
                                    body.kind)
            async with self._write_lock:
                entry = await asyncio.to_thread(self.store.put, body.base, body.name, body.kind, folder)
                self._manifest_at = 0.0
        except AdapterError as exc:
            raise APIError(422, str(exc).replace(str(folder), body.source), param="source",
                           code="invalid_adapter") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return self._adapter_card(entry)

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        self._authorize(request, "LLMP_ADMIN_KEY")
        return {"object": "list", "data": [self._adapter_card(e) for e in self._adapters().values()]}

    @app.delete("/v1/adapters/{model_id}")
    async def delete_adapter(self, model_id: str, request: Request):
        self._authorize(request, "LLMP_ADMIN_KEY")
        base, _, name = model_id.partition(":")
        async with self._write_lock:
            entry = await asyncio.to_thread(self.store.remove, base, name)
            self._manifest_at = 0.0
        if entry is None:
            raise APIError(404, f"adapter {model_id!r} is not registered", param="model_id", code="model_not_found")
        return {"id": model_id, "object": "adapter", "deleted": True}

    def _fetch_source(self, source: str) -> Path:
        fs, path = open_filesystem(source)
        if fs.get_file_info(path).type != FileType.Directory:
            raise APIError(400, f"adapter source {source} does not exist or is not a folder", param="source",
                           code="source_not_found")
        return fetch_folder(source)

    def _base_config(self, base: str):
        if base not in self._configs:
            self._configs[base] = load_model_config(self.specs[base].engine.model)
        return self._configs[base]

    def _adapters(self) -> dict[str, StoredAdapter]:
        """The store's manifest, re-read at most every ``sync_s`` (other ingress replicas may write)."""
        if time.monotonic() - self._manifest_at > self.sync_s:
            self._manifest = self.store.manifest()
            self._manifest_at = time.monotonic()
        return self._manifest

    @staticmethod
    def _adapter_card(entry: StoredAdapter) -> dict:
        return {"id": entry.model_id, "object": "model", "created": int(entry.registered_at),
                "owned_by": "llm-platform", "kind": entry.kind, "parent": entry.base, "version": entry.version}

    @staticmethod
    def _authorize(request: Request, variable: str) -> None:
        key = os.environ.get(variable)
        if key and request.headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")
