"""Printing a benchmark's result: a table for people, one JSON object with --json (no Ray, no models)."""

from __future__ import annotations

import json


def emit(result: dict, as_json: bool, cols: list[str] | None = None) -> None:
    """One JSON object, or a header line and a `|`-separated table of result["rows"]."""
    if as_json:
        print(json.dumps(result))
        return
    print(" ".join(f"{k}={v}" for k, v in result.items() if k != "rows"))
    cols = cols or list(result["rows"][0])
    print(" | ".join(cols))
    for row in result["rows"]:
        print(" | ".join(str(row[c]) for c in cols))
