"""The radix cache against a naive model of what it should contain."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from heteroserve.core.cache.page_allocator import PageAllocator
from heteroserve.core.cache.radix_cache import RadixCache

PAGE = 2
ops = st.lists(st.tuples(st.sampled_from(["insert", "match_lock", "unlock", "evict"]),
                         st.lists(st.integers(0, 3), min_size=0, max_size=24),
                         st.integers(0, 6)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_radix_cache_against_reference(program) -> None:
    alloc = PageAllocator(200)
    cache = RadixCache(PAGE)
    cached: dict[tuple[int, ...], int] = {}  # page-aligned prefix -> page id of its last page
    locks: list[tuple[object, tuple[int, ...]]] = []
    for op, tokens, n in program:
        aligned = tuple(tokens[: len(tokens) // PAGE * PAGE])
        if op == "insert":
            pages = alloc.alloc(len(aligned) // PAGE)
            leftover = cache.insert(list(tokens), pages)
            alloc.free(leftover)
            for i in range(1, len(aligned) // PAGE + 1):
                cached.setdefault(aligned[: i * PAGE], pages[i - 1])
        elif op == "match_lock":
            res = cache.match_prefix(list(tokens))
            want = max((len(k) for k in cached if aligned[: len(k)] == k), default=0)
            assert res.num_tokens == want
            assert res.pages == [cached[aligned[: (i + 1) * PAGE]] for i in range(want // PAGE)]
            cache.inc_lock(res.node)
            locks.append((res.node, aligned[:want]))
        elif op == "unlock" and locks:
            node, _ = locks.pop(n % len(locks))
            cache.dec_lock(node)
        elif op == "evict":
            freed = cache.evict(n)
            alloc.free(freed)
            for prefix in [k for k, p in cached.items() if p in set(freed)]:
                del cached[prefix]
            for _, prefix in locks:  # locked prefixes survive eviction
                for i in range(1, len(prefix) // PAGE + 1):
                    assert prefix[: i * PAGE] in cached
        assert alloc.num_free + cache.cached_pages == alloc.capacity
        assert cache.cached_pages == len(cached)
        assert cache.evictable_pages() == _unlocked_pages(cache)


def _unlocked_pages(cache: RadixCache) -> int:
    """Pages in nodes nobody locks, counted by walking the tree (the O(1) counter's oracle)."""
    total, stack = 0, [cache.root]
    while stack:
        node = stack.pop()
        total += len(node.pages) if node.lock_ref == 0 else 0
        stack.extend(node.children.values())
    return total


def test_lru_evicts_least_recently_used_first() -> None:
    alloc = PageAllocator(20)
    cache = RadixCache(PAGE)
    for tokens in ([1, 1], [2, 2], [3, 3]):
        cache.insert(tokens, alloc.alloc(1))
    cache.match_prefix([1, 1])  # touch the oldest
    freed = cache.evict(1)
    assert cache.match_prefix([2, 2]).num_tokens == 0
    assert cache.match_prefix([1, 1]).num_tokens == 2 and len(freed) == 1
