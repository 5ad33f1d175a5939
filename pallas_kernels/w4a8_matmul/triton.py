"""The W4A8 GEMM as a Pallas kernel on the Triton backend (any CUDA GPU; interpret mode on CPU).

Same math and epilogue as the XLA reference (xla.py; formats: pallas_kernels/packing.py):

    y[m, n] = epilogue(sum_k x_q[m, k] * w_int[n, k])
    per-channel: w_int = q (0..15);          y = acc * s_x[m] * scale[n] - szero[n] * row_sum[m]
    group g128/g64: w_int = q * s2 - szero;  y = acc * s_x[m] * s1[n]

The main loop multiplies INT8 by INT8 only: no floating-point rescaling inside the K loop,
which is QServe's point (section 3.2 of qserve_spec.md).

Kernel structure: grid (M / BM, N / BN); each program walks K in the packed format's chunks of
64: it loads the chunk's 32 bytes per output row, splits them with a mask and a shift into the
two [BN, 32] halves (k = 64c + 0..31 and 64c + 32..63), slices the matching halves of the
activation *ref*, and issues two INT8 dots into an INT32 accumulator. Block sizes come from
``GEMM_CONFIGS``, a table keyed by M bucket that benchmarks/gemm.py retunes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.packing import CHUNK, HALF, FormatError, W4Group, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation
from pallas_kernels.w4a8_matmul.xla import _check


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# (largest M of the bucket, config). Not yet tuned on a GPU: sizes follow the usual Triton
# int8 GEMM choices (a 16-row tile for decode-sized M, growing to 128x128 for prefill).
GEMM_CONFIGS: tuple[tuple[int, GemmConfig], ...] = (
    (16, GemmConfig(16, 64, num_warps=4, num_stages=4)),
    (64, GemmConfig(64, 64, num_warps=4, num_stages=4)),
    (256, GemmConfig(128, 128, num_warps=8, num_stages=3)),
    (1 << 62, GemmConfig(128, 128, num_warps=8, num_stages=3)),
)


def config_for(m: int, n: int) -> GemmConfig:
    for limit, cfg in GEMM_CONFIGS:
        if m <= limit:
            break
    block_n = cfg.block_n
    while n % block_n:
        block_n //= 2
    return dataclasses.replace(cfg, block_n=block_n)


def _kernel(x_ref, w_ref, sx_ref, *rest, per_channel: bool, k: int, group: int, out_dtype):
    if per_channel:
        scale_ref, szero_ref, rsum_ref, o_ref = rest
    else:
        s1_ref, s2_ref, sz_ref, o_ref = rest
    bm, bn = o_ref.shape

    def body(c, acc):
        packed = w_ref[:, pl.ds(c * HALF, HALF)].astype(jnp.int32)  # [BN, 32]
        lo, hi = packed & 0xF, packed >> 4
        if not per_channel:
            g = (c * CHUNK) // group
            s2 = s2_ref[pl.ds(g, 1), :].astype(jnp.int32).T  # [BN, 1]
            sz = sz_ref[pl.ds(g, 1), :].astype(jnp.int32).T
            lo, hi = lo * s2 - sz, hi * s2 - sz  # exact INT8 values (the format guarantees it)
        xa = x_ref[:, pl.ds(c * CHUNK, HALF)]
        xb = x_ref[:, pl.ds(c * CHUNK + HALF, HALF)]
        dims = (((1,), (1,)), ((), ()))
        acc += lax.dot_general(xa, lo.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
        acc += lax.dot_general(xb, hi.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
        return acc

    acc = lax.fori_loop(0, k // CHUNK, body, jnp.zeros((bm, bn), jnp.int32))
    y = acc.astype(jnp.float32) * sx_ref[...].astype(jnp.float32)[:, None]
    if per_channel:
        y = y * scale_ref[...].astype(jnp.float32)[None, :]
        y = y - szero_ref[...].astype(jnp.float32)[None, :] * rsum_ref[...][:, None]
    else:
        y = y * s1_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = y.astype(out_dtype)


def w4a8_matmul_pallas(act: QuantizedActivation, w: W4PerChannel | W4Group,
                       out_dtype=jnp.bfloat16, *, config: GemmConfig | None = None,
                       interpret: bool = False) -> jax.Array:
    """y [M, N] = x_q [M, K] . W4^T with QServe's epilogue, by the Triton kernel.

    config: block sizes (default: the M bucket's entry of GEMM_CONFIGS, block_n fitted to N).
    interpret=True runs the kernel in Pallas' CPU interpret mode.
    """
    m, n, k = _check(act, w)
    cfg = config or config_for(m, n)
    bm, bn = cfg.block_m, cfg.block_n
    if n % bn:
        raise FormatError(f"block_n={bn} does not divide N={n}")
    m_pad = pl.cdiv(m, bm) * bm
    x, sx = act.values, act.scale
    rsum = act.row_sum.astype(jnp.float32) if act.row_sum is not None else None
    if m_pad != m:  # keeps every load and store of the kernel in bounds
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        sx = jnp.pad(sx, (0, m_pad - m))
        rsum = None if rsum is None else jnp.pad(rsum, (0, m_pad - m))
    per_channel = isinstance(w, W4PerChannel)
    row = pl.BlockSpec((bm,), lambda i, j: (i,))
    col = pl.BlockSpec((bn,), lambda i, j: (j,))
    specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
             pl.BlockSpec((bn, k // 2), lambda i, j: (j, 0)), row]
    if per_channel:
        args = (x, w.qweight, sx, w.scale, w.szero, rsum)
        specs += [col, col, row]
        group = CHUNK
    else:
        n_groups = k // w.group_size
        args = (x, w.qweight, sx, w.s1, w.s2, w.szero)
        grp = pl.BlockSpec((n_groups, bn), lambda i, j: (0, j))
        specs += [col, grp, grp]
        group = w.group_size
    kernel = functools.partial(_kernel, per_channel=per_channel, k=k, group=group,
                               out_dtype=out_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(m_pad // bm, n // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="w4a8_per_channel" if per_channel else f"w4a8_g{group}",
    )(*args)
    return out[:m] if m_pad != m else out


w4a8_matmul_triton = w4a8_matmul_pallas  # the backend's name in w4a8_matmul(backend="triton")
