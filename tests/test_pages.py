"""The host side of the KV cache: page ownership, reference counts, the prefix cache's hashes,
sharing and least-recently-released eviction; nothing owned twice, nothing leaked."""

import numpy as np
import pytest

from qoq_jax.pages import SCRATCH_PAGE, OutOfPagesError, PageAllocator, page_hashes


def test_hashes_chain_over_every_earlier_token():
    a = list(range(40))
    ha = page_hashes(a, 8)
    assert len(ha) == 5 and len(set(ha)) == 5  # full pages only: 40 // 8
    assert page_hashes(a + [99, 98], 8) == ha  # a partial page adds nothing
    b = a.copy()
    b[3] = 77  # one early token changes every page from there on
    hb = page_hashes(b, 8)
    assert all(x != y for x, y in zip(ha, hb))
    c = a.copy()
    c[20] = 77
    hc = page_hashes(c, 8)
    assert hc[:2] == ha[:2] and all(x != y for x, y in zip(ha[2:], hc[2:]))
    assert page_hashes(a, 8, salt=b"kv4") != ha  # the cache kind is part of the key


def _filled(alloc, seq, tokens):
    pages = alloc.ensure(seq, len(tokens))
    for i, h in enumerate(page_hashes(tokens, alloc.page_size)):
        alloc.register(seq, i, h)
    return pages


def test_shared_pages_are_counted_cached_and_evicted_least_recently_released():
    alloc = PageAllocator(num_pages=9, page_size=4, caching=True)  # 8 usable pages
    t1, t2 = list(range(12)), list(range(100, 112))
    p1 = _filled(alloc, 1, t1)
    assert alloc.lookup(page_hashes(t1, 4)) == p1
    alloc.share(2, p1[:2])  # a second sequence shares the first two pages
    assert alloc.num_used == 3
    alloc.free(1)
    assert alloc.num_used == 2 and alloc.num_cached == 3  # page 3 cached, unheld
    alloc.free(2)
    assert alloc.num_used == 0 and alloc.num_free == 8 and alloc.num_cached == 3
    p3 = _filled(alloc, 3, t2)  # never-used pages first: the cache survives
    assert alloc.num_cached == 6 and not set(p3) & set(p1)
    alloc.free(3)
    alloc.ensure(4, 4 * 4)  # 4 pages: 2 never used, then the 2 released longest ago
    assert alloc.evictions == 2
    # t1's pages were released last page first, so its tail went and its head stays findable
    assert alloc.lookup(page_hashes(t1, 4)) == p1[:1]
    assert alloc.lookup(page_hashes(t2, 4)) == p3
    with pytest.raises(OutOfPagesError):
        alloc.ensure(5, 5 * 4)
    alloc.free(4)
    assert alloc.clear_cache() == 4 and alloc.num_cached == 0 and alloc.num_free == 8


def test_without_caching_nothing_is_registered_or_found():
    alloc = PageAllocator(num_pages=9, page_size=4)
    _filled(alloc, 1, list(range(12)))
    assert alloc.num_cached == 0 and alloc.lookup(page_hashes(list(range(12)), 4)) == []
    alloc.free(1)
    assert alloc.num_free == 8


def test_random_sharing_keeps_counts_consistent_and_returns_to_empty():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=40, page_size=4, caching=True)
    prefixes = [rng.integers(0, 50, 24).tolist() for _ in range(3)]
    live: dict[int, list[int]] = {}
    for step in range(3000):
        if rng.random() < 0.55 or not live:
            tokens = prefixes[int(rng.integers(3))][:int(rng.integers(4, 25))] + \
                rng.integers(0, 50, int(rng.integers(0, 12))).tolist()
            hashes = page_hashes(tokens, 4)[:(len(tokens) - 1) // 4]
            hits = alloc.lookup(hashes)
            alloc.share(step, hits)
            try:
                alloc.ensure(step, len(tokens))
            except OutOfPagesError:
                alloc.free(step)
                continue
            for i in range(len(hits), len(tokens) // 4):
                alloc.register(step, i, page_hashes(tokens, 4)[i])
            live[step] = alloc.pages(step)
        else:
            sid = int(rng.choice(list(live)))
            alloc.free(sid)
            del live[sid]
        held = {p for pages in live.values() for p in pages}
        assert SCRATCH_PAGE not in held
        assert alloc.num_used == len(held)  # a shared page counts once
        for pages in live.values():
            assert len(pages) == len(set(pages))
    for sid in list(live):
        alloc.free(sid)
    assert alloc.num_used == 0
    alloc.clear_cache()
    assert alloc.num_free == 39 and alloc.num_cached == 0
