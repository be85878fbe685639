"""Engine output → OpenAI response bodies (completions and chat, whole and streamed)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from llm_platform.engine import Chunk, Choice


@dataclass
class ResponseMeta:
    kind: str
    """"completion" or "chat"."""
    model: str
    top_logprobs: int = 0
    """Alternatives to report per token (OpenAI's top_logprobs / logprobs)."""
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def whole(meta: ResponseMeta, choices: list[Choice], prompt_tokens: int, tokenizer,
          completion_tokens: int | None = None) -> dict:
    """The response body; ``completion_tokens`` defaults to the choices' tokens (pass it when they hold echoes)."""
    if completion_tokens is None:
        completion_tokens = sum(len(c.token_ids) for c in choices)
    return {"id": meta.id, "object": "chat.completion" if meta.kind == "chat" else "text_completion",
            "created": meta.created, "model": meta.model,
            "choices": [_choice(meta, c.index, c.text, c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason,
                                tokenizer, streamed=False) for c in choices],
            "usage": usage(prompt_tokens, completion_tokens)}


def piece(meta: ResponseMeta, chunk: Chunk, tokenizer, first: bool) -> dict:
    choice = _choice(meta, chunk.index, chunk.text, chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                     chunk.finish_reason, tokenizer, streamed=True)
    if meta.kind == "chat" and first:
        choice["delta"]["role"] = "assistant"
    return {"id": meta.id, "object": "chat.completion.chunk" if meta.kind == "chat" else "text_completion",
            "created": meta.created, "model": meta.model, "choices": [choice]}


def usage_piece(meta: ResponseMeta, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": meta.id, "object": "chat.completion.chunk" if meta.kind == "chat" else "text_completion",
            "created": meta.created, "model": meta.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(meta, index, text, token_ids, logprobs, top_logprobs, finish_reason, tokenizer, streamed) -> dict:
    choice = {"index": index, "finish_reason": finish_reason}
    if meta.kind == "chat":
        if streamed:
            choice["delta"] = {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = _chat_logprobs(token_ids, logprobs, _best(top_logprobs, meta.top_logprobs), tokenizer)
    else:
        choice["text"] = text
        choice["logprobs"] = _completion_logprobs(token_ids, logprobs, _best(top_logprobs, meta.top_logprobs),
                                                  tokenizer)
    return choice


def _best(top_logprobs: list[dict[int, float] | None] | None, k: int) -> list[list[tuple[int, float]] | None]:
    """The ``k`` most likely tokens of each step, most likely first (engines may add the sampled one).

    A step without scores (an echoed prompt's first token) stays None.
    """
    return [None if top is None else sorted(top.items(), key=lambda item: -item[1])[:k]
            for top in top_logprobs or []]


def _completion_logprobs(token_ids, logprobs, top_logprobs, tokenizer) -> dict | None:
    if logprobs is None:
        return None
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [None if top is None else {tokenizer.decode([t]): lp for t, lp in top}
                             for top in top_logprobs]}


def _chat_logprobs(token_ids, logprobs, top_logprobs, tokenizer) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [{**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
               for token_id, logprob, top in zip(token_ids, logprobs, top_logprobs)]
    return {"content": content}
