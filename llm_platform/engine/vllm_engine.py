"""The vLLM engine: continuous batching, LoRA per request, soft prompts as prompt embeddings.

vLLM removed prompt adapters, so a soft prompt (PEFT prompt tuning) is served the
way PEFT computes it: its virtual-token embeddings are prepended to the prompt's
token embeddings and the result is passed as ``prompt_embeds``. The token
embedding matrix is read once from the checkpoint for that.

Scripts that build this engine need an ``if __name__ == "__main__":`` guard:
vLLM starts its engine core with the spawn method.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from safetensors import safe_open

from llm_platform.engine.adapters import load_soft_prompt
from llm_platform.engine.gate import KindGate, PrefillAloneGate
from llm_platform.engine.protocol import AdapterRef, Chunk, Engine, EngineConfig, SamplingParams, new_request_id
from llm_platform.errors import AdapterError, EngineUnavailableError, SamplingError
from llm_platform.models.loading import load_tokenizer, resolve_model

DEAD_ENGINE_POLL_S = 1.0
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


class VLLMEngine(Engine):
    def __init__(self, config: EngineConfig):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        import ray

        in_ray = ray.is_initialized()
        if in_ray:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
        self.config = config
        self.path = resolve_model(config.model)
        self._tokenizer = load_tokenizer(self.path, trust_remote_code=config.trust_remote_code)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(config.cpu_kv_cache_gib)))
        args = AsyncEngineArgs(
            model=self.path, dtype=config.dtype, seed=config.seed, max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs, tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization, enable_lora=config.enable_lora,
            max_lora_rank=config.lora_rank if config.enable_lora else None,
            max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras,
            enable_prompt_embeds=config.enable_soft_prompts, disable_log_stats=not in_ray,
            trust_remote_code=config.trust_remote_code,
            served_model_name=config.served_name)
        # Inside Ray (a Serve replica, a rollout actor) vLLM's engine statistics (queue, running and waiting
        # requests, TTFT, inter-token latency, KV cache use) are exported through Ray's metrics agent, beside
        # Serve's and the platform's, labelled with the served model id.
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[RayPrometheusStatLogger] if in_ray else None)
        self._embeddings = _read_input_embeddings(self.path) if config.enable_soft_prompts else None
        self._soft_prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lora_ids: OrderedDict[str, int] = OrderedDict()
        self._next_lora_id = 1
        # Only needed when both adapter kinds are on (see gate.py for the vLLM failure it avoids).
        self._gate = KindGate() if config.enable_lora and config.enable_soft_prompts else None
        self._alone = PrefillAloneGate() if config.enable_lora else None

    @property
    def tokenizer(self):
        return self._tokenizer

    async def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None,
                     request_id: str | None = None, whole: bool = False) -> AsyncIterator[Chunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        lora_request, prompt, n_prompt = None, {"prompt_token_ids": prompt_ids}, len(prompt_ids)
        if adapter is not None and adapter.kind == "soft_prompt":
            if params.prompt_logprobs is not None:
                # vLLM has no token ids for the virtual tokens of prompt embeddings to score the prompt by.
                raise SamplingError("echo", "prompt log-probabilities (echo with logprobs) are not available "
                                            "for soft-prompt adapters")
            prefix = self._soft_prompt(adapter)
            prompt = {"prompt_embeds": torch.cat([prefix, self._embeddings[prompt_ids]])}
            n_prompt += len(prefix)
        elif adapter is not None:
            lora_request = self._lora_request(adapter)
        alone = self._alone is not None and params.prompt_logprobs is not None
        if alone and params.n > 1:
            raise SamplingError("n", "must be 1 with prompt log-probabilities (echo with logprobs) on a "
                                     "LoRA-enabled vLLM CPU engine")
        sampling = self._sampling(params, n_prompt)
        gated = adapter.kind if adapter is not None and self._gate is not None else None
        # A whole answer is asked of vLLM as its own server does for non-streamed requests (FINAL_ONLY): one
        # output per request, none per token. Not where a gate waits for the first output (the prefill's end).
        whole = whole and not alone and gated != "soft_prompt"
        sampling.output_kind = RequestOutputKind.FINAL_ONLY if whole else RequestOutputKind.DELTA
        (engine_input,) = await self.llm.renderer.render_cmpl_async([prompt])
        outputs = None
        if gated:
            await self._gate.acquire(gated)
        if self._alone is not None:
            try:
                await self._alone.acquire(alone)
            except BaseException:
                if gated:
                    await self._gate.release(gated)
                raise
        try:
            outputs, started = self._watched(self.llm.generate(engine_input, sampling, request_id or new_request_id(),
                                                               lora_request=lora_request)), False
            while True:
                try:
                    output = await outputs.__anext__()
                except StopAsyncIteration:
                    break
                except (ValueError, VLLMClientError) as exc:  # vLLM validates a request (its JSON schema...)
                    if started:
                        raise
                    raise _sampling_error(exc, params) from None
                if alone:
                    await self._alone.prefilled()
                    alone = False
                started = True
                if gated == "soft_prompt":  # prefill done: its tokens are plain ids from here on
                    await self._gate.release(gated)
                    gated = None
                prompt_logprobs = _prompt_logprobs(output, prompt_ids)
                first_token_s = _first_token_s(output) if whole else None
                for completion in output.outputs:
                    chunk = _chunk(completion, params.logprobs)
                    chunk.first_token_s = first_token_s
                    if prompt_logprobs is not None:
                        chunk.prompt_logprobs, chunk.prompt_top_logprobs = prompt_logprobs
                    yield chunk
        except EngineDeadError as exc:
            raise EngineUnavailableError(f"the vLLM engine of {self.config.model} died: {exc}") from None
        finally:
            if outputs is not None:
                await outputs.aclose()  # aborts the request in vLLM when the client went away
            if self._alone is not None:
                await self._alone.release(alone_still=alone)
            if gated:
                await self._gate.release(gated)

    async def _watched(self, outputs):
        """``outputs``, but failing once the engine is dead. A request already in the engine when its
        process dies is not always failed by vLLM 0.32 (its output never comes): wait for each output
        in a task, looking at ``errored`` every second, rather than for ever."""
        from vllm.v1.engine.exceptions import EngineDeadError

        iterator, step = outputs.__aiter__(), None
        try:
            while True:
                step = asyncio.ensure_future(iterator.__anext__())
                while not (await asyncio.wait({step}, timeout=DEAD_ENGINE_POLL_S))[0]:
                    if self.llm is None or self.llm.errored:
                        raise EngineDeadError("the engine core process died")
                try:
                    output = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield output
        finally:
            if step is not None and not step.done():
                step.cancel()  # vLLM's generate sees the cancellation and aborts the request
                with contextlib.suppress(BaseException):
                    await step
            await iterator.aclose()

    async def load_adapter(self, adapter: AdapterRef) -> None:
        if adapter.kind == "soft_prompt":
            self._soft_prompt(adapter)
        else:
            await self.llm.add_lora(self._lora_request(adapter))

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        if self._soft_prompts.pop(adapter.key, None) is None and adapter.key in self._lora_ids:
            await self.llm.remove_lora(self._lora_ids.pop(adapter.key))

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self.llm.check_health()
        except EngineDeadError as exc:
            raise EngineUnavailableError(f"the vLLM engine of {self.config.model} died: {exc}") from None

    def num_unfinished_requests(self) -> int:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    def shutdown(self) -> None:
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.shutdown()

    def _sampling(self, params: SamplingParams, n_prompt: int):
        from vllm import SamplingParams as VSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import StructuredOutputsParams

        room = self.config.max_model_len - n_prompt
        if room < 1:
            raise SamplingError("prompt", f"leaves no room to generate within {self.config.max_model_len} tokens")
        self.check_token_ids(params)
        try:
            structured = StructuredOutputsParams(**params.structured) if params.structured else None
            return VSamplingParams(
                n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                repetition_penalty=params.repetition_penalty,
                max_tokens=room if params.max_tokens is None else min(params.max_tokens, room),
                stop=list(params.stop) or None, seed=params.seed, logprobs=params.logprobs,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                min_p=params.min_p, min_tokens=params.min_tokens, ignore_eos=params.ignore_eos,
                stop_token_ids=list(params.stop_token_ids) or None,
                logit_bias=dict(params.logit_bias) or None,
                include_stop_str_in_output=params.include_stop_str_in_output,
                skip_special_tokens=params.skip_special_tokens, prompt_logprobs=params.prompt_logprobs,
                structured_outputs=structured)
        except (ValueError, TypeError, VLLMClientError) as exc:
            raise _sampling_error(exc, params) from None

    def _soft_prompt(self, adapter: AdapterRef) -> torch.Tensor:
        if not self.config.enable_soft_prompts:
            raise AdapterError("soft prompts are disabled for this model (enable_soft_prompts: false)")
        if adapter.key not in self._soft_prompts:
            self._soft_prompts[adapter.key] = load_soft_prompt(adapter.path)
            while len(self._soft_prompts) > self.config.max_cpu_loras:
                self._soft_prompts.popitem(last=False)
        self._soft_prompts.move_to_end(adapter.key)
        return self._soft_prompts[adapter.key]

    def _lora_request(self, adapter: AdapterRef):
        from vllm.lora.request import LoRARequest

        if not self.config.enable_lora:
            raise AdapterError("LoRA adapters are disabled for this model (enable_lora: false)")
        if adapter.key not in self._lora_ids:
            # vLLM caches adapters by integer id (its own LRU of max_cpu_loras); a new version gets a new id.
            self._lora_ids[adapter.key] = self._next_lora_id
            self._next_lora_id += 1
            while len(self._lora_ids) > 4 * self.config.max_cpu_loras:
                self._lora_ids.popitem(last=False)
        self._lora_ids.move_to_end(adapter.key)
        return LoRARequest(adapter.key, self._lora_ids[adapter.key], adapter.path)


def _chunk(completion, k: int | None) -> Chunk:
    chunk = Chunk(index=completion.index, text=completion.text, token_ids=list(completion.token_ids),
                  finish_reason=completion.finish_reason if completion.finished() else None)
    if k is not None and completion.logprobs is not None:
        chunk.logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
        chunk.top_logprobs = [{token: lp.logprob for token, lp in step.items()} for step in completion.logprobs]
    return chunk


def _first_token_s(output) -> float | None:
    """Seconds from the request's arrival to its first token, as vLLM measured it (with its statistics on)."""
    latency = getattr(getattr(output, "metrics", None), "first_token_latency", None)
    return latency if latency else None


def _prompt_logprobs(output, prompt_ids: list[int]):
    """vLLM's prompt log-probabilities (first entry None) as (logprob per token, top alternatives per token)."""
    steps = getattr(output, "prompt_logprobs", None)
    if not steps:
        return None
    logprobs, tops = [], []
    for token, step in zip(prompt_ids, steps):
        if step is None:
            logprobs.append(None)
            tops.append(None)
        else:
            logprobs.append(step[token].logprob)
            tops.append({t: lp.logprob for t, lp in step.items()})
    return logprobs, tops


def _sampling_error(exc: Exception, params: SamplingParams) -> SamplingError:
    """vLLM's rejection of a request, naming the field (vLLM's VLLMValidationError carries it)."""
    param = getattr(exc, "parameter", None)
    if param is None:
        param = "response_format" if params.structured else "request"
    if param in ("structured_outputs", "json", "json_object", "regex", "choice", "grammar"):
        param = "response_format"
    message = str(exc.args[0]) if exc.args else str(exc)
    return SamplingError(param, message)


def _read_input_embeddings(path: str) -> torch.Tensor:
    """The token embedding matrix, read straight from the safetensors files (no model load)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight"):
                    return f.get_tensor(key).float()
    raise AdapterError(f"model {path}: no embed_tokens weight found, so soft prompts cannot be served")
