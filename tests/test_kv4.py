"""KV4 format and the fused RoPE + KV4 quantize + paged write: Pallas vs XLA vs NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100, numpy_kv4, on_gpu

from pallas_kernels.kv4 import RANGE_RATIOS, dequantize_kv4, kv4_write, quantize_kv4
from qoq_jax.kv_cache import PagedKV4Cache


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratios", [RANGE_RATIOS, (1.0,)], ids=["searched", "qserve"])
def test_quantize_matches_numpy_and_error_bound(d, ratios):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((50, 4, d)) * rng.uniform(0.1, 10, (50, 4, 1))).astype(np.float32)
    x[0, 0] = 3.0  # a constant row: reproduced exactly
    codes, scale, zero = quantize_kv4(jnp.asarray(x), ratios)
    q, s, z, xhat = numpy_kv4(x, ratios)
    got_q = np.concatenate([np.asarray(codes) & 15, np.asarray(codes) >> 4], axis=-1)
    np.testing.assert_array_equal(got_q, q)
    np.testing.assert_array_equal(np.asarray(scale), s)
    np.testing.assert_array_equal(np.asarray(zero), z)
    back = np.asarray(dequantize_kv4(codes, scale, zero))
    np.testing.assert_allclose(back, xhat, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back[0, 0], 3.0)
    err = np.square(back - x).sum(-1)
    if ratios == (1.0,):  # min/max range: half a step, plus the fp16 rounding of scale and zero
        step = s.astype(np.float32)[..., None]
        assert (np.abs(back - x) <= step * (0.5 + 0.02)).all()
    else:  # never worse than QServe's range; better on Gaussian rows
        qserve = np.square(numpy_kv4(x, (1.0,))[3] - x).sum(-1)
        assert (err <= qserve).all() and err.sum() < 0.95 * qserve.sum(), err.sum() / qserve.sum()


def _pools(L, N, H, P, D):
    return PagedKV4Cache.zeros(L, N, P, H, D)._pools()


@pytest.mark.parametrize("d,hkv", [(64, 3), (128, 2)])
def test_fused_write_matches_xla_and_lands_in_place(d, hkv):
    rng = np.random.default_rng(d + hkv)
    L, N, P, B, T = 2, 9, 8, 2, 5
    k = jnp.asarray(rng.standard_normal((B, T, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, hkv, d)) * 3, jnp.float32)
    ang = rng.uniform(0, 20, (B, T, d // 2))
    cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
    page = jnp.asarray([[3, 3, 3, 7, 7], [1, 1, 0, 0, 0]], jnp.int32)  # 0: scratch (padding)
    slot = jnp.asarray([[5, 6, 7, 0, 1], [2, 3, 0, 0, 0]], jnp.int32)
    pools = _pools(L, N, hkv, P, d)
    ref = kv4_write(pools, jnp.int32(1), k, v, cos, sin, page, slot, backend="xla")
    got = kv4_write(pools, jnp.int32(1), k, v, cos, sin, page, slot, **PALLAS)
    if on_gpu():
        # A code may differ on a .5 boundary, and a near-tie of two candidate ranges may go the
        # other way: every stored value within one step of the reference's.
        for i in (0, 3):
            da, db = (np.asarray(dequantize_kv4(p[i][1, 1:], p[i + 1][1, 1:], p[i + 2][1, 1:]))
                      for p in (ref, got))
            step = np.maximum(np.asarray(ref[i + 1][1, 1:], np.float32),
                              np.asarray(got[i + 1][1, 1:], np.float32))[..., None]
            assert (np.abs(da - db) <= 1.05 * step).all()
    for name, a, b in zip(("kq", "ks", "kz", "vq", "vs", "vz"), ref, got):
        a, b = np.array(a), np.array(b)
        a[:, 0], b[:, 0] = 0, 0  # the scratch page's content is unspecified
        if on_gpu():
            assert (a != b).mean() < 0.02, name  # few rows differ (checked by value above)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    # the keys were roped before quantization: compare with NumPy rope + quantization
    kn = np.asarray(k)
    c, s = np.asarray(cos)[:, :, None], np.asarray(sin)[:, :, None]
    lo, hi = kn[..., :d // 2], kn[..., d // 2:]
    roped = np.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)
    _, _, _, xhat = numpy_kv4(roped)
    stored = np.asarray(dequantize_kv4(got[0][1, 3, :, 5], got[1][1, 3, :, 5], got[2][1, 3, :, 5]))
    np.testing.assert_allclose(stored, xhat[0, 0], atol=1e-5)
    # untouched pages stay as they were
    assert not np.asarray(got[0])[0].any() and not np.asarray(got[0])[1, 2].any()


def test_fused_write_lowers_for_h100():
    pools = _pools(2, 9, 8, 16, 128)
    k = jnp.zeros((4, 16, 8, 128), jnp.bfloat16)
    cs = jnp.zeros((4, 16, 64), jnp.float32)
    idx = jnp.zeros((4, 16), jnp.int32)
    text = lower_for_h100(lambda p, k, v, c, s, pg, sl: kv4_write(
        p, jnp.int32(1), k, v, c, s, pg, sl, backend="pallas"), pools, k, k, cs, cs, idx, idx)
    assert TRITON_CALL in text


def test_diagnosis_script_quantizers_agree_with_the_kernel_formats():
    """scripts/kv4_diagnosis.py's quantizers (docs/ACCURACY.md's KV4 table): "searched" and
    "minmax" are the two cache kinds' quantizers, "search:0.5:21" re-derives the searched one
    and "clip:1.0" the min/max one."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("kv4_diagnosis",
                                                  REPO / "scripts" / "kv4_diagnosis.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    x = np.random.default_rng(9).standard_normal((40, 3, 64)).astype(np.float32) ** 3
    run = lambda name: np.asarray(diag.quantizer(name)(jnp.asarray(x)))  # noqa: E731
    np.testing.assert_allclose(run("searched"), numpy_kv4(x)[3], atol=1e-6)
    np.testing.assert_allclose(run("minmax"), numpy_kv4(x, (1.0,))[3], atol=1e-6)
    np.testing.assert_allclose(run("search:0.5:21"), run("searched"), atol=1e-5)
    np.testing.assert_allclose(run("clip:1.0"), run("minmax"), atol=1e-5)
    assert np.square(run("asym:0.7:4") - x).sum() < np.square(run("minmax") - x).sum()
    assert (run("none") == x).all()
