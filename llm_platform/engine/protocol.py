"""The engine interface shared by serving and RLHF rollouts.

An engine turns a prompt, sampling settings and an optional adapter into a
stream of :class:`Chunk` s. Two real implementations sit behind it
(:mod:`.vllm_engine` and :mod:`.hf_engine`); which one runs is a config choice,
never a code path.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from llm_platform.config import FrozenConfig
from llm_platform.dtypes import FloatDType
from llm_platform.errors import SamplingError

AdapterKind = Literal["lora", "soft_prompt"]
MIN_LORA_RANK = 64
"""The floor of an unset ``max_lora_rank``: the rank of the platform's own LoRA default (training ``lora.r``), so
adapters trained with the defaults register with a running server. Padding to it costs nothing on CPU (our LoRA
plugin trims each adapter to its rank)."""
Prompt = str | list[int]


class EngineConfig(FrozenConfig):
    """How to run one base model."""

    model: str
    """Local checkpoint folder or hub id."""
    kind: Literal["vllm", "transformers"] = "vllm"
    """vllm for serving and rollouts; transformers for the reference and where vLLM is absent."""
    dtype: FloatDType = "float32"
    """Weights and activations. vLLM on CPU needs float32 here (bfloat16 crashes its worker)."""
    device: str = "cpu"
    """Device of the transformers engine (cpu, cuda, cuda:1); vLLM picks its own platform."""
    max_model_len: int = Field(1024, gt=0)
    """Longest prompt plus completion, in tokens."""
    max_num_seqs: int = Field(64, gt=0)
    """Sequences vLLM batches together."""
    enable_lora: bool = True
    """Accept LoRA adapters per request."""
    max_lora_rank: int | None = Field(None, gt=0)
    """Largest LoRA rank accepted (vLLM takes 1, 8, 16, 32, 64, 128, 256, 320, 512). Unset: a server picks it
    at start from the LoRA adapters registered for the model (the smallest of those values that holds the
    largest rank, at least :data:`MIN_LORA_RANK`); an engine built directly uses :data:`MIN_LORA_RANK`."""
    max_loras: int = Field(4, gt=0)
    """LoRA adapters active in one vLLM batch."""
    max_cpu_loras: int = Field(16, gt=0)
    """Adapters (LoRA and soft prompts) kept loaded per engine; least recently used ones are evicted."""
    enable_soft_prompts: bool = True
    """Accept soft prompts (PEFT prompt tuning) per request, served through prompt embeddings."""
    tensor_parallel_size: int = Field(1, gt=0)
    """GPUs one vLLM replica spans."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of GPU memory vLLM may take (GPU only)."""
    cpu_kv_cache_gib: float = Field(1.0, gt=0)
    """KV cache vLLM reserves on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    seed: int = 0
    """Engine seed, used when a request gives none."""
    trust_remote_code: bool = False
    """Run the Python code the model ships (``auto_map`` in its config) in transformers and vLLM. Off by
    default: only for models you trust."""
    served_name: str | None = None
    """The model's name in vLLM's metrics (their model_name label); default: the model path."""

    @property
    def lora_rank(self) -> int:
        """The ``max_lora_rank`` the engine runs with."""
        return self.max_lora_rank or MIN_LORA_RANK

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, named and bounded as in the OpenAI API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    """None: up to the rest of the context (``max_model_len`` minus the prompt)."""
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the sampled token's, plus the k most likely."""
    # vLLM's further sampling fields (the same names and meanings as vLLM's SamplingParams).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    min_tokens: int = 0
    """End-of-sequence and ``stop_token_ids`` are suppressed until this many tokens are generated."""
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    """None: none; k >= 0: each prompt token's log-probability (the first is None) plus the k most likely."""
    structured: dict | None = field(default=None, compare=False)
    """A vLLM structured-outputs spec (one of json, json_object, regex, choice, grammar), or None."""

    def __post_init__(self):
        checks = [
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2 (0 is greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be >= 0 (0 or -1 disables it)"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 2, "must be in (0, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("n", 1 <= self.n <= 16, "must be between 1 and 16"),
            ("n", self.n == 1 or self.temperature > 0, "must be 1 when temperature is 0 (greedy has one answer)"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
            ("stop", len(self.stop) <= 32 and all(self.stop), "at most 32 non-empty strings"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be between -2 and 2"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("min_tokens", self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens),
             "must be >= 0 and <= max_tokens"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "token ids must be >= 0"),
            ("logit_bias", all(-100 <= b <= 100 for _, b in self.logit_bias), "biases must be between -100 and 100"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be between 0 and 20"),
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63, "must fit in a signed 64-bit integer"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise SamplingError(param, f"{message} (got {getattr(self, param)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as an engine sees it: a PEFT folder of one kind, at one version."""

    name: str
    kind: AdapterKind
    path: str
    version: int | str = 0

    @property
    def key(self) -> str:
        """Unique per version, so a replaced adapter never reuses its predecessor's cache slot."""
        return f"{self.name}@{self.version}"


@dataclass
class Chunk:
    """New output of one choice since the previous chunk; ``finish_reason`` set on its last."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: Literal["stop", "length"] | None = None
    prompt_logprobs: list[float | None] | None = None
    """Set on a choice's first chunk when ``prompt_logprobs`` was asked: one per prompt token, the first None."""
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    first_token_s: float | None = None
    """Set by an engine that answered the choice whole (``stream(..., whole=True)``): seconds from the request's
    arrival to its first token, as the engine measured it."""


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs, self.prompt_top_logprobs = chunk.prompt_logprobs, chunk.prompt_top_logprobs
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        if chunk.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + chunk.top_logprobs
        self.finish_reason = chunk.finish_reason or self.finish_reason


@dataclass
class Result:
    prompt_token_ids: list[int]
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class Engine(abc.ABC):
    """One base model with per-request adapters. Implementations: vLLM and transformers."""

    config: EngineConfig

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The base model's tokenizer (a transformers tokenizer)."""

    @abc.abstractmethod
    def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None,
               request_id: str | None = None, whole: bool = False) -> AsyncIterator[Chunk]:
        """Generate from token ids, yielding chunks as tokens are produced.

        ``whole``: the caller only wants the finished choices, so an engine that can skip per-token work
        (vLLM) yields each choice once, complete; the chunks add up to the same choices either way."""

    @abc.abstractmethod
    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Make ``adapter`` resident (validated by the caller); later requests use it without loading."""

    @abc.abstractmethod
    async def unload_adapter(self, adapter: AdapterRef) -> None:
        """Drop ``adapter`` from this engine; a no-op when it is not loaded."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the engine's processes and memory."""

    async def check_health(self) -> None:
        """Raise :class:`EngineUnavailableError` if the engine can no longer serve (an in-process one always can)."""

    def num_unfinished_requests(self) -> int:
        """Requests the engine holds now (queued or running); 0 where the engine does not keep count."""
        return 0

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt``: text is tokenized with the model's special tokens (BOS)."""
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise SamplingError("prompt", "is empty")
        if len(ids) >= self.config.max_model_len:
            raise SamplingError("prompt", f"has {len(ids)} tokens; this model takes fewer than "
                                          f"{self.config.max_model_len}")
        vocab = len(self.tokenizer)
        if any(not 0 <= i < vocab for i in ids):
            raise SamplingError("prompt", f"token ids must be in [0, {vocab})")
        return ids

    def check_token_ids(self, params: SamplingParams) -> None:
        """``stop_token_ids`` and ``logit_bias`` name tokens of this model's vocabulary."""
        vocab = len(self.tokenizer)
        for param, ids in (("stop_token_ids", params.stop_token_ids),
                           ("logit_bias", [t for t, _ in params.logit_bias])):
            if any(not 0 <= t < vocab for t in ids):
                raise SamplingError(param, f"token ids must be in [0, {vocab})")

    async def generate(self, prompt: Prompt, params: SamplingParams, adapter: AdapterRef | None = None,
                       request_id: str | None = None) -> Result:
        """The whole result of :meth:`stream`."""
        ids = self.encode(prompt)
        choices = [Choice(index=i) for i in range(params.n)]
        async for chunk in self.stream(ids, params, adapter, request_id, whole=True):
            choices[chunk.index].add(chunk)
        return Result(prompt_token_ids=ids, choices=choices)


def new_request_id() -> str:
    return uuid.uuid4().hex
