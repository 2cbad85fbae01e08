"""Radix prefix cache over token ids at page granularity (SGLang's RadixAttention idea).

Keys are token ids; only whole pages are cached, so every node's key length is a multiple
of ``page_size`` and its value holds one page id per ``page_size`` tokens of its key.

Ownership (who frees what):

- Pages held by the tree belong to the tree. Callers never free them; they come back out
  only through :meth:`RadixCache.evict`, whose result the caller must free.
- :meth:`RadixCache.insert` takes ownership of the caller's pages for positions that were
  not cached yet. Every other page passed in is listed in :attr:`InsertResult.unused_pages`
  and stays the caller's to free: positions already cached under another page id, and pages
  beyond the page-aligned part of the key. A page passed in that the tree already holds at
  that position (one the caller got from :meth:`RadixCache.match_prefix`) is neither.
- :meth:`RadixCache.lock` pins a matched prefix (reference counts on every node of its
  path); locked nodes are never evicted. Each ``lock`` needs exactly one ``unlock``.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    """One edge of the tree: ``key`` (token ids, a multiple of ``page_size`` long) and its
    ``pages`` (``len(key) // page_size`` ids). ``lock_ref`` counts the locks whose path passes
    through this node; ``last_access`` is a logical clock for LRU."""

    key: tuple[int, ...] = ()
    pages: list[int] = field(default_factory=list)
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


@dataclass
class MatchResult:
    """``pages`` of the longest cached page-aligned prefix (``num_tokens`` tokens, a multiple
    of ``page_size``); ``last_node`` ends exactly at that prefix (pass it to ``lock``)."""

    pages: list[int]
    num_tokens: int
    last_node: Node


@dataclass
class InsertResult:
    """``num_new_tokens``: tokens the insert added to the tree (a multiple of ``page_size``);
    ``unused_pages``: the caller's pages the tree did not take (the caller frees them)."""

    num_new_tokens: int
    unused_pages: list[int]


class RadixCache:
    """See the module docstring. ``page_size`` tokens per page."""

    enabled = True

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget everything (the caller owns the KV pool and resets it too)."""
        self.root = Node()
        self.root.lock_ref = 1  # the root is never evicted
        self._cached = 0
        self._evictable = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    # -- sizes and statistics ------------------------------------------------------------------
    @property
    def total_cached_pages(self) -> int:
        """Pages the tree holds (locked or not)."""
        return self._cached

    @property
    def evictable_pages(self) -> int:
        """Pages that :meth:`evict` could free now (held by unlocked nodes)."""
        return self._evictable

    @property
    def hit_rate(self) -> float:
        """``hit_tokens / queried_tokens`` over counted matches (0 before any)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def record_query(self, queried_tokens: int, hit_tokens: int) -> None:
        """Add one lookup to the hit statistics."""
        self.queried_tokens += queried_tokens
        self.hit_tokens += hit_tokens

    # -- tree helpers --------------------------------------------------------------------------
    def _first(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return key[: self.page_size]

    def _common_pages(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        ps, n = self.page_size, 0
        limit = min(len(a), len(b)) // ps
        while n < limit and a[n * ps:(n + 1) * ps] == b[n * ps:(n + 1) * ps]:
            n += 1
        return n

    def _split(self, node: Node, pages: int) -> Node:
        """Cut ``node`` after ``pages`` pages; returns the new upper node (same locks)."""
        cut = pages * self.page_size
        upper = Node(node.key[:cut], node.pages[:pages], node.parent, {}, node.lock_ref,
                     node.last_access)
        node.parent.children[self._first(upper.key)] = upper  # type: ignore[union-attr]
        node.key, node.pages, node.parent = node.key[cut:], node.pages[pages:], upper
        upper.children[self._first(node.key)] = node
        return upper

    def _walk(self, key: tuple[int, ...], stamp: int) -> tuple[Node, list[int], tuple[int, ...]]:
        """Follow ``key`` as far as whole pages match, splitting the last node touched so the
        path ends exactly there. Returns (last node, its path's pages, unmatched rest)."""
        node, pages = self.root, []
        while key:
            child = node.children.get(self._first(key))
            if child is None:
                break
            common = self._common_pages(child.key, key)
            if common * self.page_size < len(child.key):
                child = self._split(child, common)
            child.last_access = stamp
            pages += child.pages
            key = key[len(child.key):]
            node = child
        return node, pages, key

    # -- the interface -------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int], count: bool = True) -> MatchResult:
        """Longest cached page-aligned prefix of ``token_ids``; refreshes its LRU stamp.
        ``count=False`` leaves the hit statistics alone (lookups that only inform scheduling)."""
        key = tuple(token_ids[: len(token_ids) // self.page_size * self.page_size])
        node, pages, _ = self._walk(key, next(self._clock))
        if count:
            self.record_query(len(token_ids), len(pages) * self.page_size)
        return MatchResult(pages, len(pages) * self.page_size, node)

    def insert(self, token_ids: list[int], pages: list[int]) -> InsertResult:
        """Cache the page-aligned prefix of ``token_ids`` whose KV is in ``pages`` (page ``i``
        holds tokens ``i*page_size .. (i+1)*page_size - 1``). Only
        ``min(len(token_ids) // page_size, len(pages))`` pages are considered. See the module
        docstring for which pages the tree takes and which the caller must free."""
        n_pages = min(len(token_ids) // self.page_size, len(pages))
        key = tuple(token_ids[: n_pages * self.page_size])
        mine, unused = list(pages[:n_pages]), list(pages[n_pages:])
        stamp = next(self._clock)
        node, cached, rest = self._walk(key, stamp)
        unused += [m for m, c in zip(mine, cached) if m != c]
        if rest:
            new_pages = mine[len(cached):]
            child = Node(rest, new_pages, node, {}, 0, stamp)
            node.children[self._first(rest)] = child
            self._cached += len(new_pages)
            self._evictable += len(new_pages)
        return InsertResult(len(rest), unused)

    def lock(self, node: Node) -> None:
        """Pin the path from the root to ``node`` (a ``MatchResult.last_node``)."""
        while node is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: Node) -> None:
        """Undo one :meth:`lock` of ``node``. ``ValueError`` (nothing changed) when the path
        is not locked."""
        path = []
        while node is not None:
            if node.lock_ref <= 0:
                raise ValueError("radix cache lock released more often than taken")
            path.append(node)
            node = node.parent  # type: ignore[assignment]
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._evictable += len(n.pages)

    def evict(self, num_pages: int) -> list[int]:
        """Remove unlocked leaves, least recently used first (a parent left childless and
        unlocked becomes a candidate), until at least ``num_pages`` pages are freed or nothing
        evictable is left. Returns the freed page ids; the caller frees them in the pool."""
        order = itertools.count()
        heap = []
        stack = [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if not n.children and n.lock_ref == 0:
                heap.append((n.last_access, next(order), n))
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            freed += leaf.pages
            self._cached -= len(leaf.pages)
            self._evictable -= len(leaf.pages)
            parent = leaf.parent
            del parent.children[self._first(leaf.key)]  # type: ignore[union-attr]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed


class NoopPrefixCache(RadixCache):
    """``--disable-radix-cache``: the same interface, matching nothing and keeping nothing
    (every page passed to :meth:`insert` comes back as unused)."""

    enabled = False

    def match_prefix(self, token_ids: list[int], count: bool = True) -> MatchResult:
        if count:
            self.record_query(len(token_ids), 0)
        return MatchResult([], 0, self.root)

    def insert(self, token_ids: list[int], pages: list[int]) -> InsertResult:
        return InsertResult(0, list(pages))
