"""Hands out KV pages. Page 0 is reserved and never handed out."""

from __future__ import annotations


class PageAllocator:
    """Free list over pages ``1 .. num_pages - 1``.

    Invariant: every page is either free here or owned by exactly one holder (a request or
    the radix cache); ``free`` of a page that is already free raises ``ValueError``.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("a KV pool needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))
        self._is_free = [False] + [True] * (num_pages - 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """``n`` pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p <= 0 or p >= self.num_pages or self._is_free[p]:
                raise ValueError(f"page {p} freed twice or out of range")
            self._is_free[p] = True
            self._free.append(p)
