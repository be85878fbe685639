"""Incremental detokenization with stop strings, OpenAI semantics: the stop string is not returned."""

from __future__ import annotations


class StopChecker:
    """Turns a growing list of token ids into text deltas, withholding what may begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), include_stop: bool = False,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0
        # A stop string may straddle tokens: keep back as many characters as one could leave unfinished.
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def push(self, token_id: int, final: bool = False) -> tuple[str, bool]:
        """Add a token; return the new text to emit and whether a stop string was reached."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        hits = [(i, i + len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            start, stop_end = min(hits)
            end = stop_end if self.include_stop else start
            delta, self.emitted = text[self.emitted:end], max(self.emitted, end)
            return delta, True
        end = len(text) if final else len(text) - self.holdback
        # A byte-level token may end inside a UTF-8 character: wait for the rest of it, and drop
        # it if generation ends first (as vLLM's detokenizer does).
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        end = max(end, self.emitted)
        delta, self.emitted = text[self.emitted:end], end
        return delta, False
