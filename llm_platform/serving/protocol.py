"""Requests of the OpenAI API, as pydantic models, and their translation to engine settings.

Every field a request may carry is declared here, with vLLM's OpenAI server as the
reference for names and meanings (its extra sampling fields included). Unknown fields
are refused (``extra="forbid"``), so a client never gets an answer that silently ignored
part of its request; the ingress turns that refusal into a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llm_platform.engine import SamplingParams
from llm_platform.errors import SamplingError

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Add a final chunk with token counts (and no choices)."""


class JSONSchema(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    """Decoding is always constrained to the schema (vLLM's structured outputs), strict or not."""


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only then")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` extra field: exactly one constraint, and its options."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self

    def spec(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class _Request(_Strict):
    model: str
    temperature: float | None = None
    """Default 1.0 (as OpenAI and vLLM); 0 is greedy."""
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, as OpenAI sends it) to a bias in [-100, 100] added to its logit."""
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = None
    """An end-user id for the caller's records, as in OpenAI's API; it changes no output (as in vLLM)."""

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given with stream: true")
        return self

    def _sampling(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
                  ) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = []
        for key, value in (self.logit_bias or {}).items():
            try:
                bias.append((int(key), float(value)))
            except ValueError:
                raise SamplingError("logit_bias", f"keys must be token ids, got {key!r}") from None
        structured = self.structured_outputs.spec() if self.structured_outputs else None
        if self.response_format is not None and self.response_format.type != "text":
            if structured is not None:
                raise SamplingError("response_format", "give response_format or structured_outputs, not both")
            structured = ({"json_object": True} if self.response_format.type == "json_object"
                          else {"json": self.response_format.json_schema.schema_})
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, max_tokens=max_tokens, stop=stop, seed=self.seed, n=self.n,
            logprobs=logprobs, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            min_p=self.min_p, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()), logit_bias=tuple(bias),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, prompt_logprobs=prompt_logprobs, structured=structured)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt (text or token ids) or a batch of them: one choice per prompt and n, indexed prompt-major."""
    max_tokens: int | None = Field(16, ge=0)
    """0 only with echo (score the prompt without generating)."""
    echo: bool = False
    """Return the prompt before the completion (with its log-probabilities when logprobs is set)."""
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if len(prompt) == 0 or (isinstance(prompt, list) and any(len(p) == 0 for p in prompt
                                                                 if isinstance(p, (str, list)))):
            raise ValueError("must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the engine generates one token (vLLM needs >= 1) that is not returned."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        if self.max_tokens == 0 and not self.echo:
            raise SamplingError("max_tokens", "must be >= 1 (0 is only allowed with echo)")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._sampling(1 if self.echo_only else self.max_tokens, self.logprobs, prompt_logprobs)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    """developer is OpenAI's newer name for system and is given to the chat template as system."""
    content: str | list[dict[str, Any]]
    """A string, or content parts; only text parts ({"type": "text", "text": ...}) are supported."""
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts(cls, content):
        if isinstance(content, str):
            return content
        texts = []
        for i, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"part {i} must be {{'type': 'text', 'text': str}} (got type "
                                 f"{part.get('type')!r}); this server serves text-only models")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM's "string" content format joins text parts

    def for_template(self) -> dict:
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    """Default: the rest of the context (max_model_len minus the prompt), as vLLM."""
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (vLLM's field)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """Continue the last (assistant) message instead of starting a new one (vLLM's field)."""

    @model_validator(mode="after")
    def _continuation(self) -> ChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize body: a prompt, or chat messages rendered by the model's chat template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str
    tokens: list[int]


class AdapterRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME)
    """Letters, digits, '.', '_' and '-', starting with a letter or digit; no path separators."""
    base: str
    kind: Literal["lora", "soft_prompt"]
    source: str = Field(min_length=1)
    """Local folder or object-store URI of a PEFT adapter."""
