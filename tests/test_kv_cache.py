"""The page allocator: no page owned twice, none leaked, clear errors when pages run out."""

import numpy as np
import pytest

from qoq_jax.kv_cache import SCRATCH_PAGE, OutOfPagesError, PageAllocator


def test_random_allocate_extend_free_keeps_ownership_consistent():
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=64, page_size=16)
    lengths: dict[int, int] = {}
    for step in range(2000):
        op = rng.integers(3)
        if op == 0 or not lengths:  # new sequence
            sid, n = step, int(rng.integers(1, 200))
            try:
                alloc.ensure(sid, n)
                lengths[sid] = n
            except OutOfPagesError:
                assert alloc.pages(sid) == []  # a refused request holds nothing
        elif op == 1:  # extend
            sid = int(rng.choice(list(lengths)))
            n = lengths[sid] + int(rng.integers(1, 50))
            try:
                alloc.ensure(sid, n)
                lengths[sid] = n
            except OutOfPagesError:
                pass
        else:
            sid = int(rng.choice(list(lengths)))
            alloc.free(sid)
            del lengths[sid]
        owned = [p for sid in lengths for p in alloc.pages(sid)]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert SCRATCH_PAGE not in owned
        assert len(owned) + alloc.num_free == 63, "a page leaked"
        for sid, n in lengths.items():
            assert len(alloc.pages(sid)) == -(-n // 16)


def test_out_of_pages_message_and_page_table():
    alloc = PageAllocator(num_pages=5, page_size=4)
    alloc.ensure(0, 9)  # 3 pages
    with pytest.raises(OutOfPagesError, match="needs 2 more KV-cache pages of 4 tokens, but only 1"):
        alloc.ensure(1, 8)
    table = alloc.page_table([0, 7], max_pages=4)
    assert table.dtype == np.int32 and table.shape == (2, 4)
    assert list(table[0, :3]) == alloc.pages(0) and table[0, 3] == SCRATCH_PAGE
    assert (table[1] == SCRATCH_PAGE).all()
    with pytest.raises(KeyError):
        alloc.free(42)
