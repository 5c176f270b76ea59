"""Plain worker classes (testable without Ray); `actors.py` is the only place they become Ray actors."""

from cluster.workers.draft_worker import DraftItem, DraftWorker
from cluster.workers.target_worker import PrefillItem, TargetWorker, VerifyItem

__all__ = ["DraftItem", "DraftWorker", "PrefillItem", "TargetWorker", "VerifyItem"]
