"""The pool manager's decisions as pure functions: how many cache slots each router may use on a shared
worker (its lease), and how many actors each pool should have, from load the routers measured.

Leases keep a worker's cache from being over-committed by routers that admit independently: the
manager reserves for each router the larger of what it last offered and what the router last said it
may use, and never offers more than the worker's slots minus the others' reservations. A router admits
within the lease it last received and reports max(that lease, what it holds), so a shrinking lease frees
slots for others only once the router has seen it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def grant(slots: int, reserved_by_others: int, usage: int, demand: int, contenders: int, headroom: int = 1) -> int:
    """One router's lease on one worker.

    slots: the worker's cache slots; reserved_by_others: what the other routers may be using;
    usage: what this router holds there; demand: requests it has waiting; contenders: routers that
    want slots here (this one included). It keeps what it holds, may grow by its demand (plus
    `headroom`, so the next request is admitted without a round trip) into the free slots, but not
    past an even share while others contend."""
    free = max(0, slots - reserved_by_others)
    want = usage + max(demand, headroom)
    fair = math.ceil(slots / max(1, contenders))
    return max(usage, min(want, free, max(usage, fair)))


@dataclass
class PoolLoad:
    """What one pool did over a window, summed over the routers' reports and the workers."""

    seconds: float = 0.0  # the window's wall time
    step_s: float = 0.0  # the routers' step time in the window (summed over routers)
    draft_wait_s: float = 0.0  # of which the steps waited on drafts (draft pool)
    busy_s: float = 0.0  # compute the pool's workers did in the window (summed over workers)
    waiting: int = 0  # requests queued at the routers at the last report (target pool)


@dataclass
class ScalingRule:
    min_replicas: int = 1
    max_replicas: int = 1
    grow_at: float = 0.5  # draft: share of step time waiting on drafts; target: busy share per worker
    shrink_below: float = 0.1  # busy share per worker under which the pool shrinks


def target_replicas(current: int, load: PoolLoad, rule: ScalingRule, draft_pool: bool) -> int:
    """The size a pool should have after a window of `load`. One actor at a time, within bounds.

    A draft pool grows when the routers' steps spent more than `grow_at` of their time waiting on drafts
    (verification starved by drafting); a target pool grows when requests queue and its workers were
    busy more than `grow_at` of the window. Either shrinks when its workers were busy less than
    `shrink_below` each (and, for targets, nothing queues)."""
    if load.seconds <= 0:
        return max(rule.min_replicas, min(current, rule.max_replicas))
    busy_share = load.busy_s / (load.seconds * max(1, current))
    if draft_pool:
        grow = load.step_s > 0 and load.draft_wait_s / load.step_s > rule.grow_at
    else:
        grow = load.waiting > 0 and busy_share > rule.grow_at
    shrink = busy_share < rule.shrink_below and not grow and (draft_pool or load.waiting == 0)
    wanted = current + 1 if grow else current - 1 if shrink else current
    return max(rule.min_replicas, min(wanted, rule.max_replicas))
