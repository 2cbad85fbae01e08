"""Orderings of the waiting queue."""

from __future__ import annotations

from heteroserve.core.cache.radix_cache import RadixCache
from heteroserve.core.scheduler.request import Req

POLICIES = ("fcfs", "lpm")


def order_waiting(waiting: list[Req], policy: str, cache: RadixCache) -> list[Req]:
    """``fcfs``: arrival order (retracted requests, re-queued at the front, keep priority).
    ``lpm``: longest cached prefix first (ties by arrival), so requests sharing a prefix run
    together while it is cached. Matching here only reads the tree."""
    if policy == "fcfs" or not cache.enabled or len(waiting) < 2:
        return list(waiting)
    scored = [(-cache.match_prefix(r.fill_ids, count=False).num_tokens, i, r)
              for i, r in enumerate(waiting)]
    return [r for _, _, r in sorted(scored, key=lambda t: (t[0], t[1]))]
