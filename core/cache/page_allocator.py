"""Hands out KV pages. Page 0 is reserved (padding and graph replays write there) and is never
handed out."""

from __future__ import annotations


class PageAllocator:
    """Free list over page ids ``1 .. num_pages - 1``.

    Ownership: every page is either free here or owned by exactly one holder (a request, or
    the radix cache). :meth:`free` checks the whole list first and raises ``ValueError``
    (freeing nothing) for page 0, an id out of range, a page that is already free, or the same
    page listed twice, so a double free is caught where it happens.
    """

    def __init__(self, num_pages: int) -> None:
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (page 0 is reserved), got {num_pages!r}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: low ids first
        self._is_free = [False] + [True] * (num_pages - 1)

    @property
    def capacity(self) -> int:
        """Pages that can be handed out (``num_pages - 1``)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def usage(self) -> float:
        """``num_used / capacity`` in [0, 1]."""
        return self.num_used / self.capacity

    def alloc(self, n: int) -> list[int] | None:
        """``n`` page ids, or None (nothing taken) when fewer than ``n`` are free.
        ``ValueError`` for a negative ``n``."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: list[int]) -> None:
        """Return ``pages`` to the pool (see the class docstring for the errors)."""
        seen: set[int] = set()
        for p in pages:
            if not 0 < p < self.num_pages:
                raise ValueError(f"page {p} is not a page of this pool (1..{self.num_pages - 1})")
            if self._is_free[p] or p in seen:
                raise ValueError(f"page {p} freed twice")
            seen.add(p)
        for p in pages:
            self._is_free[p] = True
            self._free.append(p)
