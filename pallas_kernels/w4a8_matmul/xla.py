"""The W4A8 GEMM's XLA reference: the oracle every kernel is compared with, and the CPU route.

    y[m, n] = epilogue(sum_k x_q[m, k] * w_int[n, k])      (INT32 accumulation over all of K)

- per-channel (W4PerChannel): w_int = q (raw codes 0..15, already valid INT8 operands);
  epilogue: y = acc * s_x[m] * scale[n] - szero[n] * row_sum[m]   (row_sum: sum of float x)
- progressive group (W4Group): w_int = q * s2[g, n] - szero[g, n], exact in INT8;
  epilogue: y = acc * s_x[m] * s1[n]
- W4Int8 (packing.to_int8 of either): w_int given as int8 [N, K], unpacked once; the epilogue
  of the format it came from. The same int8 x int8 -> int32 dot without the per-call unpacking
  of the nibbles: the fast route on CPU, bit-identical to the packed formats' output.

Formats: pallas_kernels/packing.py. The kernels (triton.py, mosaic_gpu.py) import _check and
_epilogue from here; this module imports no kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.packing import CHUNK, FormatError, W4Group, W4Int8, W4PerChannel, to_int8
from pallas_kernels.quantize import QuantizedActivation


def _check(act: QuantizedActivation, w) -> tuple[int, int, int]:
    m, k = act.values.shape
    n, kw = w.shape
    if kw != k:
        raise FormatError(f"activation has K={k} but the weight has K={kw}")
    if not isinstance(w, W4Int8) and (k % CHUNK or n % 64):
        raise FormatError(f"W4A8 GEMM needs K % {CHUNK} == 0 and N % 64 == 0, got N={n}, K={k}")
    if isinstance(w, W4Group) and k % w.group_size:
        raise FormatError(f"K={k} is not a multiple of the group size {w.group_size}")
    per_channel = w.per_channel if isinstance(w, W4Int8) else isinstance(w, W4PerChannel)
    if per_channel and act.row_sum is None:
        raise ValueError("the per-channel GEMM needs the activation's row sums "
                         "(quantize with with_sum=True)")
    return m, n, k


def _int8_weights_xla(w) -> jax.Array:
    """The INT8 operand [N, K]: W4Int8's values, or the packed weight unpacked (to_int8)."""
    return (w if isinstance(w, W4Int8) else to_int8(w)).values


def _epilogue(acc, s_x, w, row_sum, out_dtype):
    if isinstance(w, W4Int8):
        scale, szero = w.scale, w.szero
    elif isinstance(w, W4PerChannel):
        scale, szero = w.scale, w.szero
    else:
        scale, szero = w.s1, None
    y = acc.astype(jnp.float32) * s_x.astype(jnp.float32)[:, None]
    y = y * scale.astype(jnp.float32)[None, :]
    if szero is not None:
        y = y - szero.astype(jnp.float32)[None, :] * row_sum.astype(jnp.float32)[:, None]
    return y.astype(out_dtype)


def w4a8_matmul_xla(act: QuantizedActivation, w: W4PerChannel | W4Group | W4Int8,
                    out_dtype=jnp.bfloat16) -> jax.Array:
    """y [M, N] = x_q [M, K] . W^T with QServe's epilogue, in plain XLA (int8 dot, int32 sums)."""
    _check(act, w)
    acc = lax.dot_general(act.values, _int8_weights_xla(w), (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return _epilogue(acc, act.scale, w, act.row_sum, out_dtype)
