"""Stop strings and streaming text (pure)."""

from __future__ import annotations


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:], or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to withhold from a stream because they may begin a stop string,
    plus an unfinished multi-byte character (decoders show it as U+FFFD until its last byte arrives)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    if text.endswith("\ufffd"):
        keep = max(keep, 1)
    return keep
