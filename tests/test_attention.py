"""Attention over 16-bit and KV4 pages, for decode steps and prefill chunks: Pallas (interpret
mode on CPU) vs the XLA reference vs NumPy; batch invariance of the XLA path; and lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100

from pallas_kernels.kv4 import dequantize_kv4, quantize_kv4
from pallas_kernels.paged_attention import default_splits, paged_attention


def numpy_attention(q, k, v, mask):
    """q [Hq, D], k/v [S, Hkv, D], mask [S] -> [Hq, D]; float64."""
    hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros((hq, d))
    for h in range(hq):
        s = k[:, h // g].astype(np.float64) @ q[h].astype(np.float64) / np.sqrt(d)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[h] = p @ v[:, h // g]
    return out


def _case(seed, nq, g, hkv, d, page, starts, layers=2, spare=3):
    """Pools, a shuffled non-contiguous page table, and queries [B, nq, Hq, D] at starts."""
    rng = np.random.default_rng(seed)
    lens = [s + nq for s in starts]
    max_pages = max(-(-n // page) for n in lens) + 1  # one unused column (the scratch page)
    b = len(starts)
    n_pages = 1 + b * max_pages + spare
    k = rng.standard_normal((layers, n_pages, hkv, page, d)).astype(np.float32)
    v = rng.standard_normal((layers, n_pages, hkv, page, d)).astype(np.float32)
    perm = rng.permutation(np.arange(1, n_pages))
    table = np.zeros((b, max_pages), np.int32)
    for i, n in enumerate(lens):
        need = -(-n // page)
        table[i, :need] = perm[i * max_pages:i * max_pages + need]
    q = rng.standard_normal((b, nq, hkv * g, d)).astype(np.float32)
    return q, k, v, table, np.asarray(starts, np.int32), np.asarray(lens, np.int32)


def _numpy(q, k, v, table, starts, lens, layer):
    b, nq, _, _ = q.shape
    out = np.zeros(q.shape)
    for i in range(b):
        kk = k[layer, table[i]].transpose(0, 2, 1, 3).reshape(-1, k.shape[2], k.shape[4])
        vv = v[layer, table[i]].transpose(0, 2, 1, 3).reshape(-1, v.shape[2], v.shape[4])
        pos = np.arange(kk.shape[0])
        for t in range(nq):
            mask = (pos <= starts[i] + t) & (pos < lens[i])
            out[i, t] = numpy_attention(q[i, t], kk, vv, mask)
    return out


# (queries per sequence, GQA ratio, KV heads, head_dim, page size, start positions): decode
# steps (1 query) at lengths not multiples of the page, prefill chunks from position 0 and
# from the middle of a sequence (a later chunk, attending to pages written before).
CASES = [
    (1, 4, 1, 64, 16, [0, 16, 39]),
    (1, 3, 3, 64, 16, [4, 99, 32]),  # the default model's 9 heads over 3
    (1, 4, 2, 128, 32, [63, 0, 94]),
    (1, 7, 1, 64, 16, [49, 2]),
    (1, 8, 2, 128, 16, [199, 8]),
    (16, 3, 3, 64, 16, [0, 37]),
    (32, 1, 4, 64, 16, [300, 5]),
    (16, 4, 2, 128, 32, [64, 0]),
]


@pytest.mark.parametrize("nq,g,hkv,d,page,starts", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_16bit(nq, g, hkv, d, page, starts, dtype):
    q, k, v, table, st, lens = _case(g + d + nq, nq, g, hkv, d, page, starts)
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.int32(1),
            jnp.asarray(table), jnp.asarray(st), jnp.asarray(lens))
    expect = _numpy(np.asarray(args[0], np.float64), np.asarray(args[1], np.float64),
                    np.asarray(args[2], np.float64), table, st, lens, 1)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    ref = np.asarray(paged_attention(*args, backend="xla"), np.float64)
    np.testing.assert_allclose(ref, expect, atol=tol)
    for splits in ((1, 2, 4) if nq == 1 else (1,)):
        got = np.asarray(paged_attention(*args, splits=splits, **PALLAS), np.float64)
        np.testing.assert_allclose(got, expect, atol=tol, err_msg=f"splits={splits}")


@pytest.mark.parametrize("nq,g,hkv,d,page,starts", CASES[1::2])
def test_kv4(nq, g, hkv, d, page, starts):
    q, k, v, table, st, lens = _case(10 * g + d + nq, nq, g, hkv, d, page, starts)
    kq, ks, kz = quantize_kv4(jnp.asarray(k))
    vq, vs, vz = quantize_kv4(jnp.asarray(v))
    scales = (ks, kz, vs, vz)
    qb = jnp.asarray(q, jnp.bfloat16)
    args = (qb, kq, vq, jnp.int32(0), jnp.asarray(table), jnp.asarray(st), jnp.asarray(lens))
    # NumPy on the dequantized cache: what the kernel must compute
    kd = np.asarray(dequantize_kv4(kq, ks, kz), np.float64)
    vd = np.asarray(dequantize_kv4(vq, vs, vz), np.float64)
    expect = _numpy(np.asarray(qb, np.float64), kd, vd, table, st, lens, 0)
    ref = np.asarray(paged_attention(*args, kv4_scales=scales, backend="xla"), np.float64)
    np.testing.assert_allclose(ref, expect, atol=3e-2)
    for splits in ((1, 3) if nq == 1 else (1,)):
        got = np.asarray(paged_attention(*args, kv4_scales=scales, splits=splits, **PALLAS),
                         np.float64)
        np.testing.assert_allclose(got, expect, atol=3e-2, err_msg=f"splits={splits}")
        np.testing.assert_allclose(got, ref, atol=2e-2)
    # and KV4 stays close to attention over the unquantized cache, once a query averages over
    # a few keys (at position 0 it returns one dequantized value, off by up to half a step)
    exact = _numpy(np.asarray(qb, np.float64), k, v, table, st, lens, 0)
    averaged = (st[:, None] + np.arange(nq)[None]) >= 15
    assert np.abs(ref - exact)[averaged].max() < 0.35


def test_chunks_equal_one_pass():
    """A prompt attended in chunks (each chunk over the pages before it) equals one pass."""
    q, k, v, table, _, _ = _case(5, 64, 3, 3, 64, 16, [0])
    args = (jnp.asarray(k), jnp.asarray(v), jnp.int32(0), jnp.asarray(table))
    whole = np.asarray(paged_attention(jnp.asarray(q), *args, jnp.asarray([0]),
                                       jnp.asarray([64]), backend="xla"))
    for c0 in (0, 16, 32, 48):
        part = paged_attention(jnp.asarray(q[:, c0:c0 + 16]), *args, jnp.asarray([c0]),
                               jnp.asarray([c0 + 16]), backend="xla")
        np.testing.assert_allclose(np.asarray(part), whole[:, c0:c0 + 16], atol=2e-6)


def test_xla_rows_are_batch_invariant():
    """A row's result is bit-identical alone and in a batch with longer, shorter and more
    sequences (the block loop runs longer; the dots are batched wider): batch invariance."""
    q, k, v, table, st, lens = _case(7, 1, 3, 3, 64, 16, [40, 300, 5, 170, 90])
    fn = jax.jit(lambda q, t, s, n: paged_attention(q, jnp.asarray(k), jnp.asarray(v), 0, t, s,
                                                    n, backend="xla"))
    together = np.asarray(fn(jnp.asarray(q), jnp.asarray(table), jnp.asarray(st),
                             jnp.asarray(lens)))
    for i in range(len(st)):
        alone = np.asarray(fn(jnp.asarray(q[i:i + 1]), jnp.asarray(table[i:i + 1]),
                              jnp.asarray(st[i:i + 1]), jnp.asarray(lens[i:i + 1])))
        assert np.array_equal(alone[0], together[i])
    # prefill chunks: a chunk of 16 alone and beside a longer chunk's rows
    q, k, v, table, st, lens = _case(8, 32, 3, 3, 64, 16, [0, 64])
    k, v = jnp.asarray(k), jnp.asarray(v)
    both = np.asarray(paged_attention(jnp.asarray(q), k, v, 0, jnp.asarray(table),
                                      jnp.asarray(st), jnp.asarray(lens), backend="xla"))
    one = np.asarray(paged_attention(jnp.asarray(q[:1, :16]), k, v, 0, jnp.asarray(table[:1]),
                                     jnp.asarray(st[:1]), jnp.asarray([16]), backend="xla"))
    assert np.array_equal(one[0], both[0, :16])


def test_default_splits():
    assert default_splits(max_pages=256, max_batch=1, kv_heads=8) == 64  # 512 programs >= 264
    assert default_splits(max_pages=4, max_batch=1, kv_heads=8) == 4
    assert default_splits(max_pages=256, max_batch=64, kv_heads=8) == 1


@pytest.mark.parametrize("d,g", [(64, 3), (128, 4), (128, 8)])
@pytest.mark.parametrize("nq", [1, 64])
def test_attention_kernels_lower_for_h100(d, g, nq):
    hkv, page, b = 2, 64, 4
    q = jnp.zeros((b, nq, hkv * g, d), jnp.bfloat16)
    k16 = jnp.zeros((2, 33, hkv, page, d), jnp.bfloat16)
    kq = jnp.zeros((2, 33, hkv, page, d // 2), jnp.uint8)
    st = jnp.zeros((2, 33, hkv, page), jnp.float16)
    table = jnp.zeros((b, 8), jnp.int32)
    start = jnp.zeros((b,), jnp.int32)
    lens = jnp.ones((b,), jnp.int32)
    splits = 4 if nq == 1 else 1
    t16 = lower_for_h100(lambda q, k, v, t, s, n: paged_attention(
        q, k, v, jnp.int32(1), t, s, n, splits=splits, backend="pallas"),
        q, k16, k16, table, start, lens)
    t4 = lower_for_h100(lambda q, k, v, t, s, n, sc: paged_attention(
        q, k, v, jnp.int32(1), t, s, n, kv4_scales=sc, splits=splits, backend="pallas"),
        q, kq, kq, table, start, lens, (st, st, st, st))
    assert TRITON_CALL in t16 and TRITON_CALL in t4


# ----------------------------------------------------------------------------------------------
# ragged batches: decode rows and prefill chunks of several sequences on one flat token axis


def _ragged_case(seed, q_lens, starts, g=3, hkv=3, d=64, page=16):
    """A ragged batch: sequence s has q_lens[s] queries at positions starts[s] + i; returns
    (q [T, Hq, D], pools, per-sequence arrays, the NumPy answer [T, Hq, D])."""
    q, k, v, table, st, lens = _case(seed, max(q_lens), g, hkv, d, page, starts)
    flat = np.concatenate([q[i, :n] for i, n in enumerate(q_lens)])
    expect_rows = _numpy(q, k, v, table, st, lens, 1)
    expect = np.concatenate([expect_rows[i, :n] for i, n in enumerate(q_lens)])
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)
    seqs = dict(q_start=q_start, q_len=np.asarray(q_lens, np.int32),
                q_pos0=np.asarray(starts, np.int32),
                kv_len=(np.asarray(starts) + np.asarray(q_lens)).astype(np.int32),
                page_table=table)
    return flat, k, v, seqs, expect


@pytest.mark.parametrize("block_q", [1, 16])
def test_ragged_batch_of_decode_rows_and_chunks(block_q):
    """Decode rows (1 query) and chunks (37 and 16 queries, one of them later in its prompt)
    in one call: the Pallas kernel (interpret mode) and the XLA reference equal NumPy, for
    items of 1 and of 16 queries; tokens past the batch's real ones come out zero."""
    from pallas_kernels.paged_attention import ragged_layout, ragged_paged_attention

    q_lens, starts = [1, 37, 1, 16], [40, 0, 99, 64]
    flat, k, v, seqs, expect = _ragged_case(3, q_lens, starts)
    t = len(flat) + 5  # padding tokens at the end of the flat axis
    qf = np.zeros((t,) + flat.shape[1:], np.float32)
    qf[:len(flat)] = flat
    layout = ragged_layout(*(jnp.asarray(seqs[n]) for n in
                             ("q_start", "q_len", "q_pos0", "kv_len", "page_table")),
                           num_tokens=t, block_q=block_q)
    for kw in ({"backend": "xla"}, PALLAS):
        got = np.asarray(ragged_paged_attention(jnp.asarray(qf), jnp.asarray(k), jnp.asarray(v),
                                                jnp.int32(1), layout, **kw))
        np.testing.assert_allclose(got[:len(flat)], expect, atol=2e-5, err_msg=str(kw))
        assert not got[len(flat):].any()


def test_ragged_rows_do_not_depend_on_the_batch_or_the_cut():
    """A query's result is bit-identical as a decode row alone, in a ragged batch beside
    chunks, and inside a chunk cut into items of 16: what keeps a request's tokens the same
    whatever its chunking and whatever shares its step (XLA path)."""
    from pallas_kernels.paged_attention import ragged_layout, ragged_paged_attention

    q_lens, starts = [1, 40, 1], [70, 30, 5]
    flat, k, v, seqs, _ = _ragged_case(9, q_lens, starts)

    def run(q, seqs, block_q):
        layout = ragged_layout(*(jnp.asarray(seqs[n]) for n in
                                 ("q_start", "q_len", "q_pos0", "kv_len", "page_table")),
                               num_tokens=len(q), block_q=block_q)
        return np.asarray(jax.jit(lambda q: ragged_paged_attention(
            q, jnp.asarray(k), jnp.asarray(v), 1, layout, backend="xla"))(jnp.asarray(q)))

    mixed = run(flat, seqs, 16)
    for s in (0, 2):  # each decode row alone (padded with one idle row)
        one = {n: a[s:s + 1] for n, a in seqs.items()}
        one["q_start"] = np.zeros(1, np.int32)
        alone = run(np.concatenate([flat[seqs["q_start"][s]][None]] * 2), one, 1)
        assert np.array_equal(alone[0], mixed[seqs["q_start"][s]])
    # the chunk as 40 decode-like items of one query each
    chunk = {n: a[1:2] for n, a in seqs.items()}
    chunk["q_start"] = np.zeros(1, np.int32)
    lo = seqs["q_start"][1]
    assert np.array_equal(run(flat[lo:lo + 40], chunk, 1), mixed[lo:lo + 40])


@pytest.mark.parametrize("kv4", [False, True])
def test_ragged_attention_lowers_for_h100(kv4):
    from pallas_kernels.paged_attention import ragged_layout, ragged_paged_attention

    hkv, g, d, page, t, s = 2, 4, 128, 16, 64, 8
    q = jnp.zeros((t, hkv * g, d), jnp.bfloat16)
    shape = (2, 33, hkv, page, d // 2 if kv4 else d)
    pool = jnp.zeros(shape, jnp.uint8 if kv4 else jnp.bfloat16)
    sc = jnp.zeros(shape[:-1], jnp.float16)
    z = jnp.zeros((s,), jnp.int32)

    def fn(q, k, v, table, z, *scales):
        layout = ragged_layout(z, z, z, z, table, num_tokens=t, block_q=16)
        return ragged_paged_attention(q, k, v, jnp.int32(1), layout, backend="pallas",
                                      kv4_scales=scales or None)

    hlo = lower_for_h100(fn, q, pool, pool, jnp.zeros((s, 8), jnp.int32), z,
                         *((sc,) * 4 if kv4 else ()))
    assert TRITON_CALL in hlo
