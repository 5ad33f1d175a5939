"""Decode attention over 16-bit and KV4 pages, and prefill attention: Pallas vs XLA vs NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100

from pallas_kernels.kv4 import dequantize_kv4, quantize_kv4
from pallas_kernels.paged_attention import default_splits, paged_decode_attention
from pallas_kernels.prefill_attention import prefill_attention


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


def _case(seed, b, g, hkv, d, page, lengths, L=2, spare=3):
    rng = np.random.default_rng(seed)
    max_pages = max(-(-n // page) for n in lengths)
    n_pages = 1 + b * max_pages + spare
    k = rng.standard_normal((L, n_pages, hkv, page, d)).astype(np.float32)
    v = rng.standard_normal((L, n_pages, hkv, page, d)).astype(np.float32)
    # non-contiguous, shuffled page tables; unused entries point at the scratch page
    perm = rng.permutation(np.arange(1, n_pages))
    table = np.zeros((b, max_pages), np.int32)
    for i, n in enumerate(lengths):
        need = -(-n // page)
        table[i, :need] = perm[i * max_pages:i * max_pages + need]
    q = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
    return q, k, v, table, np.asarray(lengths, np.int32)


def _numpy_decode(q, k, v, table, lengths, layer):
    out = []
    for i, n in enumerate(lengths):
        kk = k[layer, table[i]].transpose(0, 2, 1, 3).reshape(-1, k.shape[2], k.shape[4])
        vv = v[layer, table[i]].transpose(0, 2, 1, 3).reshape(-1, v.shape[2], v.shape[4])
        out.append(numpy_attention(q[i], kk, vv, np.arange(kk.shape[0]) < n))
    return np.stack(out)


# GQA ratios 1, 3, 4, 7, 8; head_dim 64 and 128; lengths not multiples of the page size,
# short and long sequences mixed in one batch.
CASES = [
    (1, 4, 64, 16, [1, 17, 40]),
    (3, 3, 64, 16, [5, 100, 33]),  # the default model's 9 heads over 3
    (4, 2, 128, 32, [64, 1, 95]),
    (7, 1, 64, 16, [50, 3]),
    (8, 2, 128, 16, [200, 9]),
]


@pytest.mark.parametrize("g,hkv,d,page,lengths", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_16bit(g, hkv, d, page, lengths, dtype):
    q, k, v, table, lens = _case(g + d, len(lengths), g, hkv, d, page, lengths)
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.int32(1),
            jnp.asarray(table), jnp.asarray(lens))
    ref = np.asarray(paged_decode_attention(*args, backend="xla"), np.float64)
    expect = _numpy_decode(np.asarray(args[0], np.float64), np.asarray(args[1], np.float64),
                           np.asarray(args[2], np.float64), table, lens, 1)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ref, expect, atol=tol)
    for splits in (1, 2, 4):
        got = np.asarray(paged_decode_attention(*args, splits=splits, **PALLAS), np.float64)
        np.testing.assert_allclose(got, expect, atol=tol, err_msg=f"splits={splits}")


@pytest.mark.parametrize("g,hkv,d,page,lengths", CASES)
def test_decode_kv4(g, hkv, d, page, lengths):
    q, k, v, table, lens = _case(10 * g + d, len(lengths), g, hkv, d, page, lengths)
    kq, ks, kz = quantize_kv4(jnp.asarray(k))
    vq, vs, vz = quantize_kv4(jnp.asarray(v))
    scales = (ks, kz, vs, vz)
    qb = jnp.asarray(q, jnp.bfloat16)
    args = (qb, kq, vq, jnp.int32(0), jnp.asarray(table), jnp.asarray(lens))
    # NumPy on the dequantized cache: what the kernel must compute
    kd = np.asarray(dequantize_kv4(kq, ks, kz), np.float64)
    vd = np.asarray(dequantize_kv4(vq, vs, vz), np.float64)
    expect = _numpy_decode(np.asarray(qb, np.float64), kd, vd, table, lens, 0)
    ref = np.asarray(paged_decode_attention(*args, kv4_scales=scales, backend="xla"), np.float64)
    np.testing.assert_allclose(ref, expect, atol=3e-2)
    for splits in (1, 3):
        got = np.asarray(paged_decode_attention(*args, kv4_scales=scales, splits=splits,
                                                **PALLAS), np.float64)
        np.testing.assert_allclose(got, expect, atol=3e-2, err_msg=f"splits={splits}")
        np.testing.assert_allclose(got, ref, atol=2e-2)
    # and KV4 stays close to attention over the unquantized cache
    exact = _numpy_decode(np.asarray(qb, np.float64), k, v, table, lens, 0)
    assert np.abs(ref - exact).max() < 0.35


def test_default_splits():
    assert default_splits(max_pages=256, batch=1, kv_heads=8) == 64  # 512 programs >= 264
    assert default_splits(max_pages=4, batch=1, kv_heads=8) == 4
    assert default_splits(max_pages=256, batch=64, kv_heads=8) == 1


@pytest.mark.parametrize("b,t,hq,hkv,d,lengths", [
    (3, 128, 9, 3, 64, [1, 70, 128]),
    (2, 64, 8, 1, 128, [64, 17]),
    (2, 16, 4, 4, 64, [16, 5]),
])
def test_prefill(b, t, hq, hkv, d, lengths):
    rng = np.random.default_rng(t + hq)
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    lens = jnp.asarray(lengths, jnp.int32)
    ref = np.asarray(prefill_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lens,
                                       backend="xla"))
    got = np.asarray(prefill_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lens,
                                       **PALLAS))
    for i, n in enumerate(lengths):
        for pos in sorted({0, n // 2, n - 1}):
            mask = np.arange(t) <= pos
            mask &= np.arange(t) < n
            expect = numpy_attention(q[i, pos], k[i], v[i], mask)
            np.testing.assert_allclose(ref[i, pos], expect, atol=1e-5)
            np.testing.assert_allclose(got[i, pos], expect, atol=1e-5)
        np.testing.assert_allclose(got[i, :n], ref[i, :n], atol=1e-5)


@pytest.mark.parametrize("d,g", [(64, 3), (128, 4), (128, 8)])
def test_attention_kernels_lower_for_h100(d, g):
    hkv, page, b = 2, 64, 4
    q = jnp.zeros((b, hkv * g, d), jnp.bfloat16)
    k16 = jnp.zeros((2, 33, hkv, page, d), jnp.bfloat16)
    kq = jnp.zeros((2, 33, hkv, page, d // 2), jnp.uint8)
    st = jnp.zeros((2, 33, hkv, page), jnp.float16)
    table = jnp.zeros((b, 8), jnp.int32)
    lens = jnp.ones((b,), jnp.int32)
    t16 = lower_for_h100(lambda q, k, v, t, n: paged_decode_attention(
        q, k, v, jnp.int32(1), t, n, backend="pallas"), q, k16, k16, table, lens)
    t4 = lower_for_h100(lambda q, k, v, t, n, s: paged_decode_attention(
        q, k, v, jnp.int32(1), t, n, kv4_scales=s, backend="pallas"),
        q, kq, kq, table, lens, (st, st, st, st))
    qp = jnp.zeros((b, 128, hkv * g, d), jnp.bfloat16)
    kp = jnp.zeros((b, 128, hkv, d), jnp.bfloat16)
    tp = lower_for_h100(lambda q, k, v, n: prefill_attention(q, k, v, n, backend="pallas"),
                        qp, kp, kp, lens)
    assert all(TRITON_CALL in t for t in (t16, t4, tp))
