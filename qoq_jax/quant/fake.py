"""Fake quantization in JAX: what a tensor becomes after the W4A8KV4 formats round it.

The transform searches score each candidate by the error the real formats would make, many
candidates at a time under jit, so they need the formats as differentiable-free float functions
of float inputs. Each function here follows the definition it mirrors (same scale rounding to
fp16, same clamps, round half to even) and a test checks it against that definition:

- ``w4_per_channel``  packing.quantize_per_channel, with the range [r * min, r * max] per row
- ``w4_group``        packing.quantize_group (progressive: INT8 level per row, UINT4 per group)
- ``int8_per_token``  pallas_kernels.quantize (per-token symmetric INT8, fp16 scale)
- ``kv4``             pallas_kernels.kv4 (per token and head, UINT4 with fp16 scale and zero)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv4 import RANGE_RATIOS, dequantize_kv4, quantize_kv4
from pallas_kernels.packing import PROTECTIVE_RANGE, WeightFormat
from pallas_kernels.quantize import quantize_per_token
from qoq_jax.quant.hadamard import rotation_matrix


def _fp16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float16).astype(jnp.float32)


def w4_per_channel(w: jax.Array, ratio: jax.Array | float = 1.0) -> jax.Array:
    """w [N, K] -> its per-channel W4 values, the range of each row shrunk by `ratio`
    (a scalar or [N])."""
    w = w.astype(jnp.float32)
    r = jnp.asarray(ratio, jnp.float32).reshape(-1, 1) if jnp.ndim(ratio) else ratio
    lo = jnp.minimum(w.min(axis=1, keepdims=True), 0.0) * r
    hi = jnp.maximum(w.max(axis=1, keepdims=True), 0.0) * r
    s = _fp16((hi - lo) / 15.0)
    s = jnp.where(s == 0, 1.0, s)
    z = jnp.clip(jnp.round(-lo / s), 0, 15)
    q = jnp.clip(jnp.round(w / s) + z, 0, 15)
    return q * s - _fp16(z * s)


def w4_group(w: jax.Array, group_size: int, ratio: jax.Array | float = 1.0) -> jax.Array:
    """w [N, K] -> its progressive-group W4 values (group_size already resolved for K), the
    range of each group shrunk by `ratio` (a scalar or [N, K / group_size])."""
    w = w.astype(jnp.float32)
    n, k = w.shape
    p = float(PROTECTIVE_RANGE)
    s1 = _fp16(jnp.abs(w).max(axis=1, keepdims=True) / p)
    s1 = jnp.where(s1 == 0, 1.0, s1)
    w1 = jnp.clip(w / s1, -p, p).reshape(n, k // group_size, group_size)
    r = jnp.asarray(ratio, jnp.float32)[..., None] if jnp.ndim(ratio) else ratio
    lo = jnp.clip(jnp.minimum(w1.min(axis=2, keepdims=True), 0.0) * r, -p, 0.0)
    hi = jnp.clip(jnp.maximum(w1.max(axis=2, keepdims=True), 0.0) * r, 0.0, p)
    s2 = jnp.clip(jnp.round((hi - lo) / 15.0), 1, 127)
    z = jnp.clip(jnp.round(-lo / s2), 0, 15)
    q = jnp.clip(jnp.round(w1 / s2) + z, 0, 15)
    return ((q - z) * s2).reshape(n, k) * s1


def w4(w: jax.Array, fmt: WeightFormat) -> jax.Array:
    """w [N, K] in the W4 format `fmt` (resolved for K: see WeightFormat.for_input_size)."""
    fmt = fmt.for_input_size(w.shape[1])
    return w4_group(w, fmt.group_size) if fmt.is_group else w4_per_channel(w)


def int8_per_token(x: jax.Array) -> jax.Array:
    """x [..., K] -> its per-token INT8 values (symmetric, amax / 127 scale in fp16)."""
    act = quantize_per_token(x.reshape(-1, x.shape[-1]).astype(jnp.float32), backend="xla")
    y = act.values.astype(jnp.float32) * act.scale.astype(jnp.float32)[:, None]
    return y.reshape(x.shape)


def kv4(x: jax.Array, rotated: bool = False,
        ratios: tuple[float, ...] = RANGE_RATIOS, key_scale: jax.Array | None = None) -> jax.Array:
    """x [..., H, D] (one token and head per row) -> its KV4 values. rotated: the cache stores x
    rotated by the head's Hadamard (ModelConfig.key_rotation), and divided per channel by
    key_scale [H, D] if given (ModelConfig.key_scale); the values come back in x's basis.
    ratios: the quantizer's candidate ranges (the cache's ``range_ratios``)."""
    if not rotated:
        return dequantize_kv4(*quantize_kv4(x, ratios))
    r = jnp.asarray(rotation_matrix(x.shape[-1]), jnp.float32)
    s = jnp.ones(x.shape[-2:], jnp.float32) if key_scale is None else key_scale
    return (dequantize_kv4(*quantize_kv4(x.astype(jnp.float32) @ r / s, ratios)) * s) @ r.T
