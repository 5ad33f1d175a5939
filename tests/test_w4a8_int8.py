"""The W4A8 GEMM's CPU route: packing.to_int8 (the INT8 operand unpacked once, W4Int8) and the
XLA int8 x int8 -> int32 dot on it, against the packed formats' XLA reference (bit for bit) and
an independent NumPy int64 reference; K slices (row-parallel tensor parallelism); the dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_w4a8_matmul import (_act, _unit_scales, _weights, numpy_accumulators, numpy_codes,
                              numpy_output)

from pallas_kernels import packing
from pallas_kernels.packing import FormatError, W4Group, W4Int8, W4PerChannel, to_int8
from pallas_kernels.quantize import QuantizedActivation, quantize_per_token
from pallas_kernels.w4a8_matmul import w4a8_matmul, w4a8_matmul_xla

# (N, K, group): the default model's shapes (SmolLM2-135M: K = 576 has groups of 64) and g128.
FORMATS = [
    pytest.param(192, 576, None, id="pc-192x576"),
    pytest.param(192, 576, 64, id="g64-192x576"),
    pytest.param(576, 1536, 64, id="g64-576x1536"),
    pytest.param(256, 1024, 128, id="g128-256x1024"),
]
MS = [1, 2, 3, 17, 64, 300]

_xla = jax.jit(w4a8_matmul_xla, static_argnums=2)
_route = jax.jit(lambda a, w, dt: w4a8_matmul(a, w, dt, backend="xla"), static_argnums=2)


def numpy_int8(w) -> np.ndarray:
    """Independent: the INT8 operand [N, K] the GEMM multiplies (codes, or q * s2 - szero)."""
    q = numpy_codes(w.qweight)
    if isinstance(w, W4Group):
        g = w.group_size
        q = (q * np.repeat(np.asarray(w.s2, np.int64).T, g, axis=1)
             - np.repeat(np.asarray(w.szero, np.int64).T, g, axis=1))
    return q


@pytest.mark.parametrize("n,k,group", FORMATS)
def test_to_int8_is_the_gemm_operand(n, k, group):
    w = _weights(n, k, group, seed=n + k)
    w8 = jax.jit(to_int8)(w)
    assert isinstance(w8, W4Int8) and w8.shape == (n, k)
    assert w8.values.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(w8.values, np.int64), numpy_int8(w))
    if group is None:
        assert w8.per_channel
        np.testing.assert_array_equal(np.asarray(w8.scale), np.asarray(w.scale))
        np.testing.assert_array_equal(np.asarray(w8.szero), np.asarray(w.szero))
        assert np.asarray(w8.values).min() >= 0 and np.asarray(w8.values).max() <= 15
        deq = (np.asarray(w8.values, np.float32) * np.asarray(w.scale, np.float32)[:, None]
               - np.asarray(w.szero, np.float32)[:, None])
    else:
        assert not w8.per_channel and w8.szero is None
        np.testing.assert_array_equal(np.asarray(w8.scale), np.asarray(w.s1))
        deq = np.asarray(w8.values, np.float32) * np.asarray(w.s1, np.float32)[:, None]
    np.testing.assert_array_equal(deq, packing.dequantize(jax.tree.map(np.asarray, w)))
    assert to_int8(w8) is w8


@pytest.mark.parametrize("group", [None, 64])
def test_to_int8_keeps_leading_axes(group):
    """Stacked layers [L, N, K/2] (the model's scan layout) convert in one call, layer by layer
    the same as each layer alone."""
    layers = [_weights(128, 576, group, seed=i) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    w8 = jax.jit(to_int8)(stacked)
    assert w8.values.shape == (3, 128, 576) and w8.shape == (128, 576)
    for i, w in enumerate(layers):
        one = to_int8(w)
        np.testing.assert_array_equal(np.asarray(w8.values[i]), np.asarray(one.values))
        np.testing.assert_array_equal(np.asarray(w8.scale[i]), np.asarray(one.scale))


@pytest.mark.parametrize("n,k,group", FORMATS)
def test_int32_accumulators_are_exact(n, k, group):
    w = _unit_scales(_weights(n, k, group, seed=n))
    act = _act(17, k, seed=k)
    act = QuantizedActivation(act.values, jnp.ones_like(act.scale), jnp.zeros_like(act.row_sum))
    expected = numpy_accumulators(act.values, w)
    assert 1000 < np.abs(expected).max() < 2 ** 24
    got = np.asarray(_route(act, to_int8(w), jnp.float32)).astype(np.int64)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n,k,group", FORMATS)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_bit_identical_to_the_reference(n, k, group, out_dtype):
    """Every M (decode rows to prefill chunks), jitted and eager: the same bits as the packed
    reference, and the float64 NumPy output within rounding."""
    w = _weights(n, k, group, seed=k)
    w8 = jax.jit(to_int8)(w)
    rtol = 1e-5 if out_dtype == jnp.float32 else 2 ** -8
    for m in MS:
        act = _act(m, k, seed=m)
        ref = np.asarray(_xla(act, w, out_dtype))
        got = np.asarray(_route(act, w8, out_dtype))
        assert got.dtype == ref.dtype == np.dtype(out_dtype)
        np.testing.assert_array_equal(got, ref, err_msg=f"M={m}")
        if m in (1, 17):  # eager against eager (jit fuses the epilogue: it may contract to FMA)
            np.testing.assert_array_equal(np.asarray(w4a8_matmul(act, w8, out_dtype)),
                                          np.asarray(w4a8_matmul_xla(act, w, out_dtype)))
        exact = numpy_output(act, w)
        np.testing.assert_allclose(got.astype(np.float64), exact, rtol=rtol,
                                   atol=rtol * np.abs(exact).max(), err_msg=f"M={m}")


def _k_slice_packed(w, k0, k1):
    """The packed weight's K slice [k0, k1) (k0, k1 on chunk and group boundaries)."""
    qw = w.qweight[:, k0 // 2:k1 // 2]
    if isinstance(w, W4PerChannel):
        return dataclasses.replace(w, qweight=qw)
    g = w.group_size
    return dataclasses.replace(w, qweight=qw, s2=w.s2[k0 // g:k1 // g],
                               szero=w.szero[k0 // g:k1 // g])


@pytest.mark.parametrize("group", [None, 64, 128])
@pytest.mark.parametrize("shards", [2, 3])
def test_k_slices_are_row_parallel_partials(group, shards):
    """Row-parallel tensor parallelism: each device holds a K slice of the weight (values[:, k0:
    k1], scale and szero unchanged) and of the activation codes (the whole row's scale), with
    the slice's own row sum. Its partial product is the packed slice's bit for bit, and the
    partials add up to the unsplit product (the per-channel zero correction is linear in the
    row sum)."""
    n, k = 192, 768 if group != 128 else 1536
    w = _weights(n, k, group, seed=shards)
    w8 = to_int8(w)
    x = np.random.default_rng(shards).standard_normal((5, k)).astype(np.float32)
    full = quantize_per_token(jnp.asarray(x), with_sum=True, backend="xla")
    bounds = np.linspace(0, k, shards + 1).astype(int)
    total = np.zeros((5, n), np.float64)
    acc_total = np.zeros((5, n), np.int64)
    for k0, k1 in zip(bounds[:-1], bounds[1:]):
        part = QuantizedActivation(full.values[:, k0:k1], full.scale,
                                   jnp.asarray(x[:, k0:k1].sum(axis=1)))
        w8_part = W4Int8(w8.values[:, k0:k1], w8.scale, w8.szero)
        got = np.asarray(_route(part, w8_part, jnp.float32))
        np.testing.assert_array_equal(got, np.asarray(_xla(part, _k_slice_packed(w, k0, k1),
                                                           jnp.float32)))
        total += got
        unit = W4Int8(w8_part.values, jnp.ones_like(w8.scale),
                      None if group else jnp.zeros_like(w8.szero))
        ones = QuantizedActivation(part.values, jnp.ones_like(part.scale),
                                   jnp.zeros_like(part.row_sum))
        acc_total += np.asarray(_route(ones, unit, jnp.float32)).astype(np.int64)
    np.testing.assert_array_equal(acc_total, np.asarray(full.values, np.int64) @ numpy_int8(w).T)
    unsplit = np.asarray(_route(full, w8, jnp.float32), np.float64)
    np.testing.assert_allclose(total, unsplit, rtol=1e-5, atol=1e-5 * np.abs(unsplit).max())


@pytest.mark.parametrize("group", [None, 64])
def test_any_k_slice_is_exact(group):
    """W4Int8 has no chunk layout: a slice off the chunk and group boundaries is exact too."""
    w = _weights(128, 576, group, seed=4)
    w8 = to_int8(w)
    act = _act(3, 576, seed=4)
    k0, k1 = 37, 501
    part = QuantizedActivation(act.values[:, k0:k1], jnp.ones_like(act.scale),
                               jnp.zeros_like(act.row_sum))
    unit = W4Int8(w8.values[:, k0:k1], jnp.ones_like(w8.scale),
                  None if group else jnp.zeros_like(w8.szero))
    got = np.asarray(_route(part, unit, jnp.float32)).astype(np.int64)
    np.testing.assert_array_equal(
        got, np.asarray(part.values, np.int64) @ numpy_int8(w)[:, k0:k1].T)


def test_scan_over_stacked_layers_matches_the_reference():
    """The model's shape of use: lax.scan over stacked layers, W4Int8 slices per step."""
    layers = [_weights(192, 576, 64, seed=10 + i) for i in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    act = _act(4, 576, seed=1)

    def run(ws):
        def body(carry, w):
            return carry, w4a8_matmul(act, w, jnp.float32, backend="xla")
        return jax.lax.scan(body, 0, ws)[1]

    np.testing.assert_array_equal(np.asarray(jax.jit(run)(to_int8(stacked))),
                                  np.asarray(jax.jit(run)(stacked)))


def test_errors():
    w = _weights(64, 256, None, seed=1)
    w8 = to_int8(w)
    act = _act(3, 256, seed=1)
    for backend in ("triton", "mosaic", "pallas"):
        with pytest.raises(TypeError, match="W4Int8.*'xla'"):
            w4a8_matmul(act, w8, backend=backend)
    with pytest.raises(TypeError, match="W4Int8"):
        w4a8_matmul(act, w8, interpret=True)
    with pytest.raises(ValueError, match="row sums"):
        w4a8_matmul(QuantizedActivation(act.values, act.scale, None), w8, backend="xla")
    with pytest.raises(FormatError, match="K=128 but the weight has K=256"):
        w4a8_matmul(_act(3, 128, seed=1), w8, backend="xla")
    with pytest.raises(TypeError, match="to_int8 takes"):
        to_int8(jnp.zeros((4, 4)))
    # a group W4Int8 needs no row sums
    g8 = to_int8(_weights(64, 256, 128, seed=1))
    w4a8_matmul(QuantizedActivation(act.values, act.scale, None), g8, backend="xla")
