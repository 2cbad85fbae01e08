"""Radix prefix cache over token ids at page granularity (SGLang's RadixAttention idea).

Keys are token ids; only whole pages are cached, so every node's key length is a multiple
of ``page_size`` and its value is one page id per ``page_size`` tokens. Pages held by the
tree belong to the tree: callers never free them. Locks (reference counts along a path)
pin prefixes that running requests use; only unlocked leaves are evicted, least recently
used first.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

_clock = itertools.count()


@dataclass(eq=False)
class Node:
    key: tuple[int, ...] = ()
    pages: list[int] = field(default_factory=list)
    parent: Node | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


@dataclass
class MatchResult:
    pages: list[int]
    num_tokens: int
    node: Node


class RadixCache:
    """See the module docstring. ``page_size`` tokens per page."""

    enabled = True

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.reset()

    def reset(self) -> None:
        self.root = Node()
        self.root.lock_ref = 1  # the root is never evicted
        self.cached_pages = 0
        self.locked_pages = 0  # cached pages in nodes some request holds a lock on
        self.hit_tokens = 0
        self.queried_tokens = 0

    def _first(self, key: tuple[int, ...]) -> tuple[int, ...]:
        return key[: self.page_size]

    def _common_pages(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        """How many whole pages ``a`` and ``b`` share from the start. Slice comparisons run
        in C: the whole overlap first (the usual answer), else a bisection over pages."""
        ps = self.page_size
        equal, differ = 0, min(len(a), len(b)) // ps  # pages [0, equal) match
        if a[:differ * ps] == b[:differ * ps]:
            return differ
        while differ - equal > 1:  # invariant: the first ``differ`` pages do not all match
            mid = (equal + differ) // 2
            if a[equal * ps:mid * ps] == b[equal * ps:mid * ps]:
                equal = mid
            else:
                differ = mid
        return equal

    def _split(self, node: Node, pages: int) -> Node:
        """Cut ``node`` after ``pages`` pages; returns the new upper node."""
        cut = pages * self.page_size
        upper = Node(node.key[:cut], node.pages[:pages], node.parent, {}, node.lock_ref,
                     node.last_access)
        node.parent.children[self._first(upper.key)] = upper  # type: ignore[union-attr]
        node.key, node.pages, node.parent = node.key[cut:], node.pages[pages:], upper
        upper.children[self._first(node.key)] = node
        return upper

    def match_prefix(self, token_ids: list[int], count: bool = True) -> MatchResult:
        """Longest cached page-aligned prefix of ``token_ids``. ``count=False`` leaves the
        hit statistics alone (for lookups that only inform scheduling)."""
        key = tuple(token_ids[: len(token_ids) // self.page_size * self.page_size])
        node, pages, stamp = self.root, [], next(_clock)
        self.queried_tokens += len(token_ids) if count else 0
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
        self.hit_tokens += len(pages) * self.page_size if count else 0
        return MatchResult(pages, len(pages) * self.page_size, node)

    def insert(self, token_ids: list[int], pages: list[int]) -> list[int]:
        """Cache the page-aligned prefix of ``token_ids`` whose pages are ``pages``.
        Returns the caller's pages that the tree did not take (positions already cached under
        other page ids, and pages beyond the aligned prefix); the caller frees those."""
        n_pages = min(len(token_ids) // self.page_size, len(pages))
        key = tuple(token_ids[: n_pages * self.page_size])
        rest, leftover = list(pages[:n_pages]), list(pages[n_pages:])
        node, stamp = self.root, next(_clock)
        while key:
            child = node.children.get(self._first(key))
            if child is None:
                new = Node(key, rest, node, {}, 0, stamp)
                node.children[self._first(key)] = new
                self.cached_pages += len(rest)
                return leftover
            common = self._common_pages(child.key, key)
            if common * self.page_size < len(child.key):
                child = self._split(child, common)
            leftover += [mine for mine, cached in zip(rest[:common], child.pages) if mine != cached]
            child.last_access = stamp
            key, rest, node = key[common * self.page_size:], rest[common:], child
        return leftover

    def inc_lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self.locked_pages += len(node.pages)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref <= 0:
                raise ValueError("radix cache lock released more often than taken")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_pages -= len(node.pages)
            node = node.parent  # type: ignore[assignment]

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if not n.children and n is not self.root:
                out.append(n)
            stack.extend(n.children.values())
        return out

    def evictable_pages(self) -> int:
        """Cached pages no running request holds (what :meth:`evict` can free); O(1)."""
        return self.cached_pages - self.locked_pages

    def evict(self, num_pages: int) -> list[int]:
        """Free at least ``num_pages`` pages (fewer if not enough are unlocked), least recently
        used leaves first; returns the freed page ids."""
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            freed += leaf.pages
            self.cached_pages -= len(leaf.pages)
            parent = leaf.parent
            del parent.children[self._first(leaf.key)]  # type: ignore[union-attr]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class NoopPrefixCache(RadixCache):
    """``--disable-radix-cache``: matches nothing and keeps nothing."""

    enabled = False

    def match_prefix(self, token_ids: list[int], count: bool = True) -> MatchResult:
        self.queried_tokens += len(token_ids) if count else 0
        return MatchResult([], 0, self.root)

    def insert(self, token_ids: list[int], pages: list[int]) -> list[int]:
        return list(pages)
