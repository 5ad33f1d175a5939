"""The W4A8 GEMM: INT8 activations x packed UINT4 weights, INT32 accumulation over all of K.

    y[m, n] = epilogue(sum_k x_q[m, k] * w_int[n, k])

- per-channel (W4PerChannel): w_int = q (raw codes 0..15, already valid INT8 operands);
  epilogue: y = acc * s_x[m] * scale[n] - szero[n] * row_sum[m]   (row_sum: sum of float x)
- progressive group (W4Group): w_int = q * s2[g, n] - szero[g, n], formed in registers before the
  dot and exact in INT8; epilogue: y = acc * s_x[m] * s1[n]

The main loop multiplies INT8 by INT8 only: no floating-point rescaling inside the K loop,
which is QServe's point (section 3.2 of qserve_spec.md). Formats: pallas_kernels/packing.py.

Kernel structure (Pallas, Triton backend): grid (M / BM, N / BN); each program walks K in the
packed format's chunks of 64: it loads the chunk's 32 bytes per output row, splits them with a
mask and a shift into the two [BN, 32] halves (k = 64c + 0..31 and 64c + 32..63), slices the
matching halves of the activation *ref*, and issues two INT8 dots into an INT32 accumulator.
Block sizes come from ``GEMM_CONFIGS``, a table keyed by M bucket that benchmarks/gemm.py retunes.

``w4a8_matmul`` dispatches between this kernel ("triton"), the Hopper Mosaic GPU kernel
(``w4a8_matmul_mgpu``, "mosaic") and the XLA reference ("xla"); see its docstring.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import gemm_backend, resolve_gemm_backend  # noqa: F401
from pallas_kernels.packing import CHUNK, HALF, FormatError, W4Group, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation


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


def _check(act: QuantizedActivation, w) -> tuple[int, int, int]:
    m, k = act.values.shape
    n, kw = w.shape
    if kw != k:
        raise FormatError(f"activation has K={k} but the weight has K={kw}")
    if k % CHUNK or n % 64:
        raise FormatError(f"W4A8 GEMM needs K % {CHUNK} == 0 and N % 64 == 0, got N={n}, K={k}")
    if isinstance(w, W4Group) and k % w.group_size:
        raise FormatError(f"K={k} is not a multiple of the group size {w.group_size}")
    if isinstance(w, W4PerChannel) and act.row_sum is None:
        raise ValueError("the per-channel GEMM needs the activation's row sums "
                         "(quantize with with_sum=True)")
    return m, n, k


# ----------------------------------------------------------------------------------------------
# XLA reference (same integer math, same epilogue order)


def _unpack_xla(qweight: jax.Array) -> jax.Array:
    """uint8 [N, K/2] -> int32 codes [N, K] (chunked nibble layout)."""
    n, k2 = qweight.shape
    c = qweight.astype(jnp.int32).reshape(n, k2 // HALF, 1, HALF)
    return jnp.concatenate([c & 0xF, c >> 4], axis=2).reshape(n, 2 * k2)


def _int8_weights_xla(w) -> jax.Array:
    q = _unpack_xla(w.qweight)
    if isinstance(w, W4PerChannel):
        return q.astype(jnp.int8)
    n, k = q.shape
    g = w.group_size
    s2 = w.s2.astype(jnp.int32).T[:, :, None]
    sz = w.szero.astype(jnp.int32).T[:, :, None]
    return (q.reshape(n, k // g, g) * s2 - sz).reshape(n, k).astype(jnp.int8)


def _epilogue(acc, s_x, w, row_sum, out_dtype):
    y = acc.astype(jnp.float32) * s_x.astype(jnp.float32)[:, None]
    if isinstance(w, W4PerChannel):
        y = y * w.scale.astype(jnp.float32)[None, :]
        y = y - w.szero.astype(jnp.float32)[None, :] * row_sum.astype(jnp.float32)[:, None]
    else:
        y = y * w.s1.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)


def w4a8_matmul_xla(act: QuantizedActivation, w, out_dtype=jnp.bfloat16) -> jax.Array:
    _check(act, w)
    acc = lax.dot_general(act.values, _int8_weights_xla(w), (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    return _epilogue(acc, act.scale, w, act.row_sum, out_dtype)


# ----------------------------------------------------------------------------------------------
# Pallas kernel


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


def w4a8_matmul_pallas(act: QuantizedActivation, w, out_dtype=jnp.bfloat16, *,
                       config: GemmConfig | None = None, interpret: bool = False) -> jax.Array:
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


def w4a8_matmul(act: QuantizedActivation, w: W4PerChannel | W4Group, out_dtype=jnp.bfloat16, *,
                backend: str = "auto", interpret: bool = False, config=None) -> jax.Array:
    """y [M, N] = x_q [M, K] · W4ᵀ with QServe's epilogue.

    backend: "mosaic" (Mosaic GPU kernel, sm_90: w4a8_matmul_mgpu), "triton" (the Pallas Triton
    kernel above), "xla" (the reference), "pallas" (the best Pallas kernel for the device) or
    "auto" (the best for the device: mosaic on H100/H200, triton on other GPUs, xla on CPU);
    see _common.resolve_gemm_backend, which a model uses to fix the choice once, statically.
    interpret=True runs the chosen kernel in its CPU interpret mode. config: a GemmConfig for
    "triton", an MgpuGemmConfig for "mosaic" (None: the shape's entry of the config table).
    """
    name = gemm_backend(backend, interpret)
    if name == "mosaic":
        from pallas_kernels.w4a8_matmul_mgpu import MgpuGemmConfig, w4a8_matmul_mgpu
        if config is not None and not isinstance(config, MgpuGemmConfig):
            raise TypeError(f"the mosaic GEMM takes an MgpuGemmConfig, not {config!r}")
        return w4a8_matmul_mgpu(act, w, out_dtype, config=config, interpret=interpret)
    if name == "triton":
        if config is not None and not isinstance(config, GemmConfig):
            raise TypeError(f"the triton GEMM takes a GemmConfig, not {config!r}")
        return w4a8_matmul_pallas(act, w, out_dtype, config=config, interpret=interpret)
    return w4a8_matmul_xla(act, w, out_dtype)
