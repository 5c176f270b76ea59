"""Tokens to streamed text, outside the step loop: incremental detokenisation and stop strings.

The step loop works in tokens and stops on token-level conditions (EOS, max_tokens, context end). A
`TextStream` per request turns its token deltas into text in the consumer's thread (a front door's
handler, or `collect` in process), so detokenising and stop matching never hold up the other requests.
When a stop string completes, the consumer aborts the request in the engine: a step or two of extra
work at most, and the text and token counts are cut exactly at the stop.
"""

from __future__ import annotations

from cluster.types import (
    FINISH_STOP,
    FinalDelta,
    SamplingParams,
    SpecStats,
    StreamDelta,
    TokenDelta,
)


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:], or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to withhold from a stream because they may begin a stop string,
    plus an unfinished multi-byte character (decoders show it as U+FFFD until its last byte arrives)."""
    keep = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        tail = text[-(len(s) - 1):] if len(s) > 1 else ""
        at = tail.find(s[0])
        while at >= 0:  # the longest tail that is a prefix of s starts at the first match that fits
            if s.startswith(tail[at:]):
                keep = max(keep, len(tail) - at)
                break
            at = tail.find(s[0], at + 1)
    return keep


class TextStream:
    """One request's text: feed it the engine's token deltas, get text deltas back."""

    def __init__(self, tokenizer, request_id: str, params: SamplingParams, prompt_tokens: int, seed: int):
        self.tokenizer, self.request_id, self.params = tokenizer, request_id, params
        self.prompt_tokens, self.seed = prompt_tokens, seed
        self.ids: list[int] = []
        self.logprobs: list = []
        self.text = ""
        self.sent = 0  # characters already streamed
        self.checked = 0  # stop strings were searched in text[:checked] (up to the overlap)
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] was decoded last time
        self.stopped = False

    def feed(self, delta: TokenDelta) -> StreamDelta:
        """Text for the new tokens. If a stop string completes, the result is a FinalDelta cut at the stop,
        `stopped` is set, and the caller must abort the request in the engine."""
        kept = 0
        for token in delta.token_ids:
            self.ids.append(token)
            kept += 1
            self.text += self._decode_new()
            if self._find_stop():
                break
        new_ids = delta.token_ids[:kept]
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs[:kept])
        finish = FINISH_STOP if self.stopped else delta.finish_reason
        if finish is not None and not self.stopped:
            self.text += self._decode_rest()
        visible = len(self.text) if finish else len(self.text) - holdback(self.text, self.params.stop)
        piece = self.text[self.sent:visible] if visible > self.sent else ""
        self.sent = max(self.sent, visible)
        lps = None if delta.logprobs is None else delta.logprobs[:kept]
        if finish is None:
            return StreamDelta(self.request_id, new_ids, piece, None, lps)
        return FinalDelta(self.request_id, new_ids, piece, finish, lps, self.prompt_tokens, len(self.ids),
                          delta.stats or SpecStats(), self.text, self.seed, delta.error,
                          self.logprobs if self.params.logprobs is not None else None)

    def _decode_new(self) -> str:
        """Text the newest token completes (vLLM's incremental detokenisation: decode a short window with
        the previous tokens as context; hold back while the window ends in a partial character)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(prefix):]
        return ""

    def _decode_rest(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        self._prefix = self._read = len(self.ids)
        return full[len(prefix):]

    def _find_stop(self) -> bool:
        """Search the new text (and the overlap a stop string could straddle) once min_tokens is reached."""
        if not self.params.stop or len(self.ids) < self.params.min_tokens:
            self.checked = len(self.text)
            return False
        at = find_stop(self.text, self.params.stop, max(0, self.checked - self.max_stop + 1))
        self.checked = len(self.text)
        if at < 0:
            return False
        self.text = self.text[:at]
        self.stopped = True
        return True
