"""Per-token INT8 activation quantization: Pallas (interpret mode on CPU, compiled on a GPU) vs
XLA vs an independent NumPy reference."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100, on_gpu

from pallas_kernels._common import round_half_even
from pallas_kernels.quantize import quantize_per_token, rmsnorm_quantize, silu_mul_quantize


def numpy_quantize(v):
    """Independent reference: float64 statistics, numpy's round-half-even."""
    v = np.asarray(v, np.float64)
    amax = np.abs(v).max(axis=-1)
    safe = np.where(amax > 0, amax, 1.0)
    q = np.clip(np.rint(v * (127.0 / safe)[:, None]), -127, 127)
    q = np.where(amax[:, None] > 0, q, 0).astype(np.int8)
    return q, (amax / 127.0).astype(np.float16), v.sum(axis=-1)


def _data(m, k, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * rng.uniform(0.1, 30, (m, 1))
    x[:, rng.integers(0, k, 3)] *= 20  # outlier channels, as real activations have
    return x.astype(dtype)


def _assert_matches_numpy(out, v):
    q, scale, total = numpy_quantize(v)
    got = np.asarray(out.values).astype(np.int32)
    # float32 vs float64 statistics may move a value sitting on a .5 boundary by one code.
    diff = np.abs(got - q)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(np.asarray(out.scale, np.float32), scale.astype(np.float32),
                               rtol=1e-3)
    if out.row_sum is not None:
        np.testing.assert_allclose(np.asarray(out.row_sum), total, rtol=1e-4,
                                   atol=1e-3 * np.abs(v).sum(-1).max())


def _assert_same(a, b):
    if on_gpu():  # the GPU's float32 division may move a value on a .5 boundary by one code
        diff = np.abs(np.asarray(a.values, np.int32) - np.asarray(b.values, np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    else:
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    if a.row_sum is not None:
        np.testing.assert_allclose(np.asarray(a.row_sum), np.asarray(b.row_sum), rtol=1e-5,
                                   atol=1e-3)


def test_round_half_even_matches_numpy():
    v = np.concatenate([np.arange(-130, 130, 0.5), np.random.default_rng(0).uniform(-200, 200, 1000)])
    v = v.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(round_half_even(jnp.asarray(v))), np.rint(v))
    import jax
    np.testing.assert_array_equal(np.asarray(jax.jit(round_half_even)(jnp.asarray(v))), np.rint(v))


@pytest.mark.parametrize("m,k", [(1, 576), (7, 1536), (64, 4096), (300, 576), (3, 14336)])
@pytest.mark.parametrize("with_sum", [False, True])
def test_plain(m, k, with_sum):
    x = _data(m, k, seed=m + k)
    xla = quantize_per_token(jnp.asarray(x), with_sum=with_sum, backend="xla")
    pal = quantize_per_token(jnp.asarray(x), with_sum=with_sum, **PALLAS)
    _assert_same(xla, pal)
    _assert_matches_numpy(pal, x)
    assert (pal.row_sum is not None) == with_sum


@pytest.mark.parametrize("m,k", [(5, 576), (64, 4096)])
def test_rmsnorm_fused(m, k):
    x = _data(m, k, seed=3)
    w = np.random.default_rng(4).uniform(0.5, 1.5, k).astype(np.float32)
    xla = rmsnorm_quantize(jnp.asarray(x), jnp.asarray(w), 1e-5, with_sum=True, backend="xla")
    pal = rmsnorm_quantize(jnp.asarray(x), jnp.asarray(w), 1e-5, with_sum=True, **PALLAS)
    _assert_same(xla, pal)
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    _assert_matches_numpy(pal, normed)


@pytest.mark.parametrize("m,k", [(5, 1536), (33, 4096)])
def test_silu_mul_fused(m, k):
    g, u = _data(m, k, seed=5) / 10, _data(m, k, seed=6) / 10
    xla = silu_mul_quantize(jnp.asarray(g), jnp.asarray(u), with_sum=True, backend="xla")
    pal = silu_mul_quantize(jnp.asarray(g), jnp.asarray(u), with_sum=True, **PALLAS)
    _assert_same(xla, pal)
    g64 = g.astype(np.float64)
    _assert_matches_numpy(pal, g64 / (1 + np.exp(-g64)) * u)


def test_zero_rows_and_leading_dims():
    x = _data(6, 576, seed=9).reshape(2, 3, 576)
    x[1, 2] = 0
    for kw in (dict(backend="xla"), dict(**PALLAS)):
        out = quantize_per_token(jnp.asarray(x), with_sum=True, **kw)
        assert out.values.shape == (2, 3, 576) and out.scale.shape == (2, 3)
        assert float(out.scale[1, 2]) == 0 and not np.asarray(out.values[1, 2]).any()


def test_bf16_input():
    x = _data(8, 1024, seed=10)
    xb = jnp.asarray(x, jnp.bfloat16)
    _assert_same(quantize_per_token(xb, backend="xla"), quantize_per_token(xb, **PALLAS))


def test_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        silu_mul_quantize(jnp.zeros((2, 64)), jnp.zeros((2, 32)))
    with pytest.raises(ValueError, match="does not match"):
        rmsnorm_quantize(jnp.zeros((2, 64)), jnp.zeros(32), 1e-5)
    with pytest.raises(ValueError, match="backend"):
        quantize_per_token(jnp.zeros((2, 64)), backend="cuda")


@pytest.mark.parametrize("k", [576, 4096, 14336])
def test_kernels_lower_for_h100(k):
    x = jnp.zeros((7, k), jnp.bfloat16)
    w = jnp.zeros((k,), jnp.bfloat16)
    for fn, args in [
        (functools.partial(quantize_per_token, with_sum=True, backend="pallas"), (x,)),
        (functools.partial(rmsnorm_quantize, eps=1e-5, backend="pallas"), (x, w)),
        (functools.partial(silu_mul_quantize, with_sum=True, backend="pallas"), (x, x)),
    ]:
        assert TRITON_CALL in lower_for_h100(fn, *args)
