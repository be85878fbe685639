"""The transformers + PEFT engine: the reference implementation, and the fallback without vLLM.

It decodes one sequence at a time with a KV cache and transformers' own logits
processors, so its greedy output is what ``model.generate`` would give. LoRA
adapters live in one PeftModel and are switched per request; soft prompts are
prepended as input embeddings, exactly as PEFT's prompt tuning does.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from peft import PeftModel
from transformers import (DynamicCache, LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from llm_platform.engine.adapters import load_soft_prompt
from llm_platform.engine.protocol import AdapterRef, Chunk, Engine, EngineConfig, SamplingParams
from llm_platform.engine.text import StopChecker
from llm_platform.errors import AdapterError, SamplingError
from llm_platform.models.loading import load_causal_lm, load_tokenizer

_DONE = object()


class TransformersEngine(Engine):
    def __init__(self, config: EngineConfig):
        self.config = config
        self._tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        self.model = load_causal_lm(config.model, dtype=config.dtype, device=config.device,
                                    trust_remote_code=config.trust_remote_code)
        self._embed = self.model.get_input_embeddings()
        self._eos = set(_as_list(self.model.generation_config.eos_token_id) or [self._tokenizer.eos_token_id])
        self._soft_prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._loras: OrderedDict[str, None] = OrderedDict()
        # One request decodes at a time: the model and its active adapter are shared state.
        # An asyncio lock, not a threading one: waiters must not hold the threads decoding needs.
        self._lock = asyncio.Lock()
        # All torch work runs on one thread: each new calling thread would get an OpenMP team of
        # its own, and idle teams spin for a while, competing with the active one for the cores.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        self._seeds = torch.Generator().manual_seed(config.seed)

    @property
    def tokenizer(self):
        return self._tokenizer

    async def load_adapter(self, adapter: AdapterRef) -> None:
        async with self._lock:
            await self._run(self._load_adapter, adapter)

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        async with self._lock:
            await self._run(self._unload, adapter.key)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self.model = None

    def _run(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None,
                     request_id: str | None = None, whole: bool = False) -> AsyncIterator[Chunk]:
        # ``whole`` changes nothing here: this engine decodes step by step either way, and its chunks add up
        # to the same choices.
        if params.structured:
            raise SamplingError("response_format", "structured outputs need the vLLM engine (this model runs on "
                                                   "transformers)")
        self.check_token_ids(params)
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else None
            async with self._lock:
                steps = self._decode(prompt_ids, params, adapter, index, seed)
                try:
                    while (chunk := await self._run(next, steps, _DONE)) is not _DONE:
                        yield chunk
                finally:
                    steps.close()

    def _decode(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None, index: int,
                seed: int | None) -> Iterator[Chunk]:
        """Decode one choice; a generator run step by step off the event loop."""
        model, prefix = self._select(adapter)
        device = self._embed.weight.device
        generator = torch.Generator(device=device).manual_seed(
            seed if seed is not None else int(torch.randint(0, 2**31, (1,), generator=self._seeds)))
        processors = _processors(params)
        ids = torch.tensor([prompt_ids], device=device)
        with torch.inference_mode():
            embeds = self._embed(ids)
            if prefix is not None:
                embeds = torch.cat([prefix.to(device, embeds.dtype)[None], embeds], dim=1)
        stop = StopChecker(self._tokenizer, params.stop, params.include_stop_str_in_output,
                           params.skip_special_tokens)
        cache, inputs = DynamicCache(), {"inputs_embeds": embeds}
        room = self.config.max_model_len - embeds.shape[1]
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = set() if params.ignore_eos else set(self._eos)
        ends = eos | set(params.stop_token_ids)
        counts = torch.zeros(self._embed.weight.shape[0], device=device)
        bias = torch.zeros(self._embed.weight.shape[0], device=device)
        for token_id, value in params.logit_bias:
            bias[token_id] = value
        for step in range(max_new):
            with torch.inference_mode():
                out = model(**inputs, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :].float()
            prompt_scores = None
            if step == 0 and params.prompt_logprobs is not None:
                prompt_scores = _prompt_logprobs(out.logits[0].float(), prompt_ids, params.prompt_logprobs)
            # vLLM's order: logit bias, min_tokens, penalties, then temperature and the truncations.
            scores = logits + bias
            if step < params.min_tokens and ends:
                scores[:, list(ends)] = -float("inf")
            scores = scores - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
            token = self._sample(processors(ids, scores), params, generator)
            ids = torch.cat([ids, token[:, None]], dim=1)
            inputs = {"input_ids": token[:, None]}
            token_id = int(token)
            counts[token_id] += 1
            chunk = Chunk(index=index, text="", token_ids=[token_id])
            if prompt_scores is not None:
                chunk.prompt_logprobs, chunk.prompt_top_logprobs = prompt_scores
            if params.logprobs is not None:
                _add_logprobs(chunk, logits, token_id, params.logprobs)
            is_eos = token_id in ends
            chunk.text, stopped = stop.push(token_id, final=is_eos or step == max_new - 1)
            if is_eos or stopped:
                chunk.finish_reason = "stop"
            elif step == max_new - 1:
                chunk.finish_reason = "length"
            yield chunk
            if chunk.finish_reason:
                return

    @staticmethod
    def _sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        if params.greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def _select(self, adapter: AdapterRef | None):
        """The module to run and the soft-prompt prefix (or None) for this request."""
        if adapter is not None:
            self._load_adapter(adapter)
            if adapter.kind == "lora":
                self.model.set_adapter(adapter.key)
                return self.model, None
        runner = _BaseOnly(self.model) if isinstance(self.model, PeftModel) else self.model
        return runner, (self._soft_prompts[adapter.key] if adapter is not None else None)

    def _load_adapter(self, adapter: AdapterRef) -> None:
        cache = self._soft_prompts if adapter.kind == "soft_prompt" else self._loras
        if adapter.key in cache:
            cache.move_to_end(adapter.key)
            return
        if adapter.kind == "soft_prompt":
            if not self.config.enable_soft_prompts:
                raise AdapterError("soft prompts are disabled for this model (enable_soft_prompts: false)")
            self._soft_prompts[adapter.key] = load_soft_prompt(adapter.path).to(self._embed.weight.device)
        else:
            if not self.config.enable_lora:
                raise AdapterError("LoRA adapters are disabled for this model (enable_lora: false)")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(adapter.path, adapter_name=adapter.key)
            else:
                self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=adapter.key)
            self.model.eval()
            self._loras[adapter.key] = None
        while len(self._soft_prompts) + len(self._loras) > self.config.max_cpu_loras:
            oldest = next(iter(self._loras if self._loras else self._soft_prompts))
            self._unload(oldest)

    def _unload(self, key: str) -> None:
        if self._soft_prompts.pop(key, None) is not None:
            return
        if key in self._loras:
            del self._loras[key]
            self.model.delete_adapter(key)


class _BaseOnly:
    """Calls a PeftModel with every LoRA disabled: the base model, without a second copy."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.get_base_model()(**kwargs)


def _processors(params: SamplingParams) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int):
    """Each prompt token's log-probability given the tokens before it (the first: None), as vLLM reports."""
    n = len(prompt_ids)
    scores = torch.log_softmax(logits[-n:-1], dim=-1)  # the position before each token (soft prompt first)
    targets = torch.tensor(prompt_ids[1:], device=scores.device)
    chosen = scores.gather(1, targets[:, None])[:, 0]
    logprobs, tops = [None], [None]
    for row, token, value in zip(scores, prompt_ids[1:], chosen.tolist()):
        logprobs.append(value)
        top = torch.topk(row, k) if k else None
        tops.append({token: value, **({int(i): float(v) for v, i in zip(top.values, top.indices)} if top else {})})
    return logprobs, tops


def _add_logprobs(chunk: Chunk, logits: torch.Tensor, token_id: int, k: int) -> None:
    """Log-probabilities of the raw model distribution, as vLLM reports them."""
    logprobs = torch.log_softmax(logits[0], dim=-1)
    chunk.logprobs = [float(logprobs[token_id])]
    top = torch.topk(logprobs, k) if k else None
    chunk.top_logprobs = [{token_id: float(logprobs[token_id]),
                           **({int(i): float(v) for v, i in zip(top.values, top.indices)} if top else {})}]


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
