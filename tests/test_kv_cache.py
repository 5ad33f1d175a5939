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


@pytest.mark.parametrize("kind,ratios", [("kv4", None), ("kv4-minmax", (1.0,))])
def test_kv4_cache_kinds_store_their_quantizer(kind, ratios):
    """"kv4" writes each row with the searched range, "kv4-minmax" with QServe's min/max: both
    in the one KV4 format, each equal to the NumPy reference of its quantizer."""
    import jax.numpy as jnp
    from helpers import numpy_kv4

    from pallas_kernels.kv4 import dequantize_kv4
    from qoq_jax.kv_cache import make_cache

    rng = np.random.default_rng(3)
    k = rng.standard_normal((1, 6, 2, 16)).astype(np.float32)
    v = (rng.standard_normal((1, 6, 2, 16)) ** 3).astype(np.float32)  # heavy tails
    ones, zeros = jnp.ones((1, 6, 8)), jnp.zeros((1, 6, 8))  # identity RoPE
    page, slot = jnp.full((1, 6), 1, jnp.int32), jnp.arange(6, dtype=jnp.int32)[None]
    cache = make_cache(kind, 1, 2, 8, 2, 16, jnp.float32).write(
        0, jnp.asarray(k), jnp.asarray(v), ones, zeros, page, slot)
    for x, codes, scale, zero in ((k, cache.k, cache.k_scale, cache.k_zero),
                                  (v, cache.v, cache.v_scale, cache.v_zero)):
        got = np.asarray(dequantize_kv4(codes[0, 1, :, :6], scale[0, 1, :, :6],
                                        zero[0, 1, :, :6]))
        np.testing.assert_allclose(got, numpy_kv4(x[0].swapaxes(0, 1), ratios)[3], atol=1e-6)
    if kind == "kv4":  # the search changed some rows: the kinds are not the same quantizer
        minmax = numpy_kv4(v[0].swapaxes(0, 1), (1.0,))[3]
        assert np.abs(np.asarray(dequantize_kv4(cache.v[0, 1, :, :6], cache.v_scale[0, 1, :, :6],
                                                cache.v_zero[0, 1, :, :6])) - minmax).max() > 1e-3
