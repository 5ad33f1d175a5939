"""Per-token INT8 activation quantization, plain and fused with RMSNorm or SiLU(gate) * up.

For each row (token) m of the float activation v:
    amax = max_k |v[m, k]|,  x_q[m, k] = round_half_even(v[m, k] * (127 / amax))   (int8)
    scale[m] = fp16(amax / 127)  (rounded to 16 bits before the GEMM uses it)
    row_sum[m] = sum_k v[m, k]  (float32; only the per-channel GEMM's zero correction needs it)
Rows that are all zero get scale 0 and codes 0.

Fusions (QServe fuses them the same way, section 3.3 of qserve_spec.md):
- ``rmsnorm_quantize``: v = x * rsqrt(mean(x^2) + eps) * weight, in float32.
- ``silu_mul_quantize``: v = silu(gate) * up, in float32.

Each op has the Pallas (Triton) kernel, an XLA reference with identical numerics, and a public
wrapper that picks one (``backend="auto" | "pallas" | "xla"``, ``interpret=True`` runs the kernel
on CPU). The kernel handles one row per program and walks the row in power-of-two column blocks
with masked loads, so any K works.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import fixed_order_sum, next_power_of_2, round_half_even, use_pallas

_MAX_BLOCK = 4096


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedActivation:
    values: Any  # int8 [M, K]
    scale: Any  # fp16 [M]
    row_sum: Any = None  # float32 [M], or None


# ----------------------------------------------------------------------------------------------
# XLA reference


def _prologue_xla(mode: str, a: jax.Array, b: jax.Array | None, eps: float) -> jax.Array:
    a = a.astype(jnp.float32)
    if mode == "plain":
        return a
    if mode == "rmsnorm":
        mean_sq = fixed_order_sum(a * a, axis=-1, keepdims=True) / a.shape[-1]
        rstd = lax.rsqrt(mean_sq + eps)
        return a * rstd * b.astype(jnp.float32)
    if mode == "silu_mul":
        return jax.nn.sigmoid(a) * a * b.astype(jnp.float32)
    raise ValueError(mode)


def _quantize_rows_xla(v: jax.Array, with_sum: bool, axis_name=None) -> QuantizedActivation:
    amax = jnp.max(jnp.abs(v), axis=-1)
    if axis_name is not None:  # the row is split over a mesh axis: its amax is every shard's
        amax = lax.pmax(amax, axis_name)
    inv = jnp.where(amax > 0, 127.0 / amax, 0.0)
    q = jnp.clip(round_half_even(v * inv[:, None]), -127, 127).astype(jnp.int8)
    scale = (amax / 127.0).astype(jnp.float16)
    return QuantizedActivation(q, scale, fixed_order_sum(v, axis=-1) if with_sum else None)


def _xla(mode, a, b, eps, with_sum):
    return _quantize_rows_xla(_prologue_xla(mode, a, b, eps), with_sum)


# ----------------------------------------------------------------------------------------------
# Pallas kernel: one row per program (the wrapper vmaps the call over rows)


def _row_kernel(*refs, mode: str, n_col: int, block: int, eps: float, with_sum: bool):
    n_in = 1 if mode == "plain" else 2
    a_ref = refs[0]
    b_ref = refs[1] if n_in == 2 else None
    q_ref, scale_ref = refs[n_in], refs[n_in + 1]
    sum_ref = refs[n_in + 2] if with_sum else None
    n_blocks = pl.cdiv(n_col, block)

    def cols(i):
        idx = i * block + jnp.arange(block)
        return idx, idx < n_col

    def load(ref, i):
        idx, mask = cols(i)
        return plt.load(ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)

    rstd = None
    if mode == "rmsnorm":
        def sumsq(i, acc):
            a = load(a_ref, i)
            return acc + a * a
        ss = lax.fori_loop(0, n_blocks, sumsq, jnp.zeros((block,), jnp.float32)).sum()
        rstd = lax.rsqrt(ss / n_col + eps)

    def values(i):
        a = load(a_ref, i)
        if mode == "plain":
            return a
        b = load(b_ref, i)
        if mode == "rmsnorm":
            return a * rstd * b
        return jax.nn.sigmoid(a) * a * b  # silu(gate) * up; masked lanes give 0

    def stats(i, carry):
        amax, total = carry
        v = values(i)
        return jnp.maximum(amax, jnp.abs(v)), total + v

    zeros = jnp.zeros((block,), jnp.float32)
    amax, total = lax.fori_loop(0, n_blocks, stats, (zeros, zeros))
    amax = amax.max()
    inv = jnp.where(amax > 0, 127.0 / amax, 0.0)

    def store(i, carry):
        idx, mask = cols(i)
        q = jnp.clip(round_half_even(values(i) * inv), -127.0, 127.0).astype(jnp.int8)
        plt.store(q_ref.at[idx], q, mask=mask)
        return carry

    lax.fori_loop(0, n_blocks, store, 0)
    scale_ref[...] = (amax / 127.0).astype(scale_ref.dtype)
    if with_sum:
        sum_ref[...] = total.sum()


def _pallas(mode, a, b, eps, with_sum, interpret):
    m, k = a.shape
    block = min(next_power_of_2(k), _MAX_BLOCK)
    kernel = functools.partial(_row_kernel, mode=mode, n_col=k, block=block, eps=eps,
                               with_sum=with_sum)
    out_shape = [jax.ShapeDtypeStruct((k,), jnp.int8), jax.ShapeDtypeStruct((), jnp.float16)]
    if with_sum:
        out_shape.append(jax.ShapeDtypeStruct((), jnp.float32))
    call = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(), interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=4 if block <= 2048 else 8, num_stages=1),
        name=f"quantize_{mode}")
    if mode == "plain":
        outs = jax.vmap(call)(a)
    elif mode == "rmsnorm":
        outs = jax.vmap(call, in_axes=(0, None))(a, b)
    else:
        outs = jax.vmap(call)(a, b)
    return QuantizedActivation(outs[0], outs[1], outs[2] if with_sum else None)


# ----------------------------------------------------------------------------------------------
# Public wrappers


def _run(mode, a, b, eps, with_sum, backend, interpret) -> QuantizedActivation:
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    b2 = None if b is None else (b if mode == "rmsnorm" else b.reshape(-1, b.shape[-1]))
    if use_pallas(backend, interpret):
        out = _pallas(mode, a2, b2, eps, with_sum, interpret)
    else:
        out = _xla(mode, a2, b2, eps, with_sum)
    if lead == (a2.shape[0],):
        return out
    return QuantizedActivation(
        out.values.reshape(*lead, -1), out.scale.reshape(lead),
        None if out.row_sum is None else out.row_sum.reshape(lead))


def quantize_per_token(x: jax.Array, *, with_sum: bool = False, backend: str = "auto",
                       interpret: bool = False) -> QuantizedActivation:
    """x [..., K] float -> per-token symmetric INT8 (see the module docstring)."""
    return _run("plain", x, None, 0.0, with_sum, backend, interpret)


def rmsnorm_quantize(x: jax.Array, weight: jax.Array, eps: float, *, with_sum: bool = False,
                     backend: str = "auto", interpret: bool = False) -> QuantizedActivation:
    """RMSNorm(x) * weight, quantized per token, in one pass over x."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {weight.shape} does not match x's last dim {x.shape[-1]}")
    return _run("rmsnorm", x, weight, eps, with_sum, backend, interpret)


def silu_mul_quantize(gate: jax.Array, up: jax.Array, *, with_sum: bool = False,
                      backend: str = "auto", interpret: bool = False) -> QuantizedActivation:
    """SiLU(gate) * up (the SwiGLU product feeding down_proj), quantized per token."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    return _run("silu_mul", gate, up, 0.0, with_sum, backend, interpret)


def quantize_sharded_rows(x: jax.Array, axis_name, *, up: jax.Array | None = None,
                          with_sum: bool = False) -> QuantizedActivation:
    """Per-token INT8 of rows whose columns are split over the mesh axis `axis_name` (inside
    shard_map): the input of a row-parallel (K-split) W4A8 GEMM under tensor parallelism.

    The scale is the *whole* row's (the max of every shard's amax, one pmax of [M] floats), so
    each shard's codes are exactly the codes quantize_per_token gives the unsplit row, and the
    INT32 partial products add up to the unsplit GEMM's. row_sum is this shard's part only: the
    per-channel GEMM's zero-point correction (szero[n] * row_sum[m]) is linear in it, so the
    shards' epilogues add up to the unsplit one. Same formula as the XLA reference above.
    With `up`, the rows are SiLU(x) * up (the down_proj input, as silu_mul_quantize fuses it).
    """
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1])
    v = _prologue_xla("plain" if up is None else "silu_mul", a,
                      None if up is None else up.reshape(a.shape), 0.0)
    out = _quantize_rows_xla(v, with_sum, axis_name)
    return QuantizedActivation(
        out.values.reshape(*lead, -1), out.scale.reshape(lead),
        None if out.row_sum is None else out.row_sum.reshape(lead))
