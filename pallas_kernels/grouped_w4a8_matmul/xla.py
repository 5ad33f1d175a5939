"""The grouped W4A8 GEMM's XLA reference: the oracle of the kernel, and the CPU route.

Rows of the activation are sorted by group (expert): rows [o_g, o_g + n_g) belong to group g,
o_g = n_0 + ... + n_{g-1}, n = group_sizes. Each row multiplies its own group's weight:

    y[m, n] = epilogue_g(sum_k x_q[m, k] * w_int[g, n, k])     g = the group of row m

with the dense GEMM's epilogues (w4a8_matmul/xla.py), the scales taken from the row's group.
Rows past sum(group_sizes) come back as zeros. Weights are the dense formats with a leading
group axis (packing.W4PerChannel / W4Group / W4Int8 of [E, N, ...]).

The integer core is jax.lax.ragged_dot (INT8 x INT8 -> INT32): one op for any routing, so a
program compiles once whatever the group sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.packing import CHUNK, FormatError, W4Group, W4Int8, W4PerChannel, to_int8
from pallas_kernels.quantize import QuantizedActivation

# x [M, K] . w [E, N, K] contracting K, ragged over M, grouped by w's leading axis
RAGGED_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0])


def _check(act: QuantizedActivation, w, group_sizes) -> tuple[int, int, int, int]:
    m, k = act.values.shape
    qw = w.values if isinstance(w, W4Int8) else w.qweight
    if qw.ndim != 3:
        raise FormatError(f"grouped weights are [groups, N, K...], got shape {qw.shape}")
    e, n = qw.shape[0], qw.shape[1]
    kw = qw.shape[2] if isinstance(w, W4Int8) else qw.shape[2] * 2
    if kw != k:
        raise FormatError(f"activation has K={k} but the weights have K={kw}")
    if not isinstance(w, W4Int8) and (k % CHUNK or n % 64):
        raise FormatError(f"W4A8 GEMM needs K % {CHUNK} == 0 and N % 64 == 0, got N={n}, K={k}")
    if tuple(group_sizes.shape) != (e,):
        raise FormatError(f"group_sizes must be [{e}] (one per group), got {group_sizes.shape}")
    per_channel = w.per_channel if isinstance(w, W4Int8) else isinstance(w, W4PerChannel)
    if per_channel and act.row_sum is None:
        raise ValueError("the per-channel GEMM needs the activation's row sums "
                         "(quantize with with_sum=True)")
    return m, n, k, e


def row_groups(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(group of each row [M] clamped to a valid group, whether the row is in any group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m, dtype=jnp.int32)
    g = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)
    return jnp.minimum(g, group_sizes.shape[0] - 1), rows < ends[-1]


def grouped_epilogue(acc, act: QuantizedActivation, w, group_sizes, out_dtype):
    """The dense epilogue with each row's group's scales; rows in no group -> 0."""
    g, inside = row_groups(group_sizes, acc.shape[0])
    if isinstance(w, (W4Int8, W4PerChannel)):
        scale, szero = w.scale, w.szero
    else:
        scale, szero = w.s1, None
    y = acc.astype(jnp.float32) * act.scale.astype(jnp.float32)[:, None]
    y = y * scale.astype(jnp.float32)[g]
    if szero is not None:
        y = y - szero.astype(jnp.float32)[g] * act.row_sum.astype(jnp.float32)[:, None]
    return jnp.where(inside[:, None], y, 0.0).astype(out_dtype)


def grouped_w4a8_matmul_xla(act: QuantizedActivation, w: W4PerChannel | W4Group | W4Int8,
                            group_sizes: jax.Array, out_dtype=jnp.bfloat16) -> jax.Array:
    """y [M, N]: each row of x_q [M, K] times its group's W4 weight, QServe's epilogue."""
    _check(act, w, group_sizes)
    w8 = w.values if isinstance(w, W4Int8) else to_int8(w).values  # [E, N, K]
    acc = lax.ragged_dot_general(act.values, w8, group_sizes.astype(jnp.int32), RAGGED_DIMS,
                                 preferred_element_type=jnp.int32)
    return grouped_epilogue(acc, act, w, group_sizes, out_dtype)
