"""One sequence's failure must not fail its batch-mates: batched calls are retried one by one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """One sequence's call raised: it fails alone. The message is short (it may reach a client); the
    traceback stays in the worker's log."""

    message: str


def isolated(run, items: list) -> list:
    """run(items) -> one result per item. It must be transactional (no state changed when it raises);
    if it raises, each item runs alone, and the one that raises again gets a Failure."""
    try:
        return run(items)
    except Exception as error:
        if len(items) == 1:
            log.exception("call failed for sequence %s", items[0].seq_id)
            return [Failure(f"{type(error).__name__} in the worker")]
        log.warning("batched call failed (%s); retrying %d sequences one by one", type(error).__name__, len(items))
        return [r for item in items for r in isolated(run, [item])]
