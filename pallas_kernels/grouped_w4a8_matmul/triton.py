"""The grouped W4A8 GEMM as a Pallas kernel on the Triton backend (interpret mode on CPU).

Same math as the XLA reference (xla.py): rows sorted by group, each row times its group's
W4 weight, INT8 x INT8 -> INT32 over all of K, the dense GEMM's epilogue with the group's
scales. The inner loop is the dense Triton kernel's (w4a8_matmul/triton.py): per chunk of 64
K, 32 packed bytes per output row split into two nibble halves, two INT8 dots.

Scheduling ragged groups with a static grid (so no recompilation per routing, as
megablox / tokamax's grouped matmul do): the rows are cut into blocks of BM at fixed
offsets; a *tile* is (group, row block) for every block a group's rows touch. There are at most
cdiv(M, BM) + E - 1 tiles (each group boundary inside a block adds one), so the grid is
(that bound, N / BN); the wrapper computes each tile's group, block and row range [lo, hi)
with a few vector ops, tiles past the count get an empty range. A program loads its block of
rows and its group's weight (dynamic offsets into the whole arrays) and stores only the rows of
its group (masked), so a block shared by two groups is written by two programs, each its own
rows. An expert with no tokens has no tile; its weights are never read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.grouped_w4a8_matmul.xla import _check, row_groups
from pallas_kernels.packing import CHUNK, HALF, FormatError, W4Group, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# (largest M of the bucket, config). Not tuned on a GPU yet; decode-sized M (a few tokens per
# expert) wants the small row tile, since a tile never spans two groups' work.
GROUPED_GEMM_CONFIGS: tuple[tuple[int, GroupedGemmConfig], ...] = (
    (256, GroupedGemmConfig(16, 64, num_warps=4, num_stages=4)),
    (4096, GroupedGemmConfig(64, 64, num_warps=4, num_stages=4)),
    (1 << 62, GroupedGemmConfig(128, 128, num_warps=8, num_stages=3)),
)


def config_for(m: int, n: int) -> GroupedGemmConfig:
    for limit, cfg in GROUPED_GEMM_CONFIGS:
        if m <= limit:
            break
    block_n = cfg.block_n
    while n % block_n:
        block_n //= 2
    return dataclasses.replace(cfg, block_n=block_n)


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int):
    """Per tile (static count cdiv(m, block_m) + E - 1): its group, row block and row range
    [lo, hi) (empty past the last real tile), as int32 arrays."""
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // block_m
    last = jnp.maximum(ends - 1, 0) // block_m
    count = jnp.where(sizes > 0, last - first + 1, 0)  # tiles of each group
    tile_end = jnp.cumsum(count)
    n_tiles = pl.cdiv(m, block_m) + e - 1
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32), e - 1)
    real = t < tile_end[-1]
    block = jnp.where(real, first[g] + t - (tile_end[g] - count[g]), 0)
    lo = jnp.where(real, jnp.maximum(starts[g], block * block_m), 0)
    hi = jnp.where(real, jnp.minimum(ends[g], (block + 1) * block_m), 0)
    return g, block, lo, hi


def _kernel(g_ref, b_ref, lo_ref, hi_ref, x_ref, w_ref, sx_ref, *rest, per_channel: bool,
            k: int, group: int, bm: int, bn: int, out_dtype):
    if per_channel:
        scale_ref, szero_ref, rsum_ref, o_ref = rest
    else:
        s1_ref, s2_ref, sz_ref, o_ref = rest
    g, row0 = g_ref[0], b_ref[0] * bm
    lo, hi = lo_ref[0], hi_ref[0]
    cols = pl.ds(pl.program_id(1) * bn, bn)
    rows = pl.ds(row0, bm)

    def body(c, acc):
        packed = w_ref[g, cols, pl.ds(c * HALF, HALF)].astype(jnp.int32)  # [BN, 32]
        lo4, hi4 = packed & 0xF, packed >> 4
        if not per_channel:
            gi = (c * CHUNK) // group
            s2 = s2_ref[g, pl.ds(gi, 1), cols].astype(jnp.int32).T  # [BN, 1]
            sz = sz_ref[g, pl.ds(gi, 1), cols].astype(jnp.int32).T
            lo4, hi4 = lo4 * s2 - sz, hi4 * s2 - sz  # exact INT8 values
        xa = x_ref[rows, pl.ds(c * CHUNK, HALF)]
        xb = x_ref[rows, pl.ds(c * CHUNK + HALF, HALF)]
        dims = (((1,), (1,)), ((), ()))
        acc += lax.dot_general(xa, lo4.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
        acc += lax.dot_general(xb, hi4.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
        return acc

    acc = lax.fori_loop(0, k // CHUNK, body, jnp.zeros((bm, bn), jnp.int32))
    y = acc.astype(jnp.float32) * sx_ref[rows].astype(jnp.float32)[:, None]
    if per_channel:
        y = y * scale_ref[g, cols].astype(jnp.float32)[None, :]
        y = y - szero_ref[g, cols].astype(jnp.float32)[None, :] * rsum_ref[rows][:, None]
    else:
        y = y * s1_ref[g, cols].astype(jnp.float32)[None, :]
    r = row0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    plt.store(o_ref.at[rows, cols], y.astype(out_dtype), mask=(r >= lo) & (r < hi))


def grouped_w4a8_matmul_pallas(act: QuantizedActivation, w: W4PerChannel | W4Group,
                               group_sizes: jax.Array, out_dtype=jnp.bfloat16, *,
                               config: GroupedGemmConfig | None = None,
                               interpret: bool = False) -> jax.Array:
    """y [M, N]: each row of x_q [M, K] (sorted by group) times its group's W4 weight
    [E, N, K/2], by the Triton kernel. config: block sizes (default: GROUPED_GEMM_CONFIGS)."""
    m, n, k, e = _check(act, w, group_sizes)
    cfg = config or config_for(m, n)
    bm, bn = cfg.block_m, cfg.block_n
    if n % bn:
        raise FormatError(f"block_n={bn} does not divide N={n}")
    m_pad = pl.cdiv(m, bm) * bm
    x, sx = act.values, act.scale
    rsum = act.row_sum.astype(jnp.float32) if act.row_sum is not None else None
    if m_pad != m:  # every block load in bounds
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        sx = jnp.pad(sx, (0, m_pad - m))
        rsum = None if rsum is None else jnp.pad(rsum, (0, m_pad - m))
    tiles = tile_schedule(group_sizes, m, bm)
    n_tiles = tiles[0].shape[0]
    per_channel = isinstance(w, W4PerChannel)
    if per_channel:
        args = (x, w.qweight, sx, w.scale, w.szero, rsum)
        group = CHUNK
    else:
        args = (x, w.qweight, sx, w.s1, w.s2, w.szero)
        group = w.group_size
    scalar = pl.BlockSpec((1,), lambda t, j: (t,))
    whole = [pl.BlockSpec(a.shape, lambda t, j, nd=a.ndim: (0,) * nd) for a in args]
    kernel = functools.partial(_kernel, per_channel=per_channel, k=k, group=group, bm=bm, bn=bn,
                               out_dtype=out_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(n_tiles, n // bn),
        in_specs=[scalar] * 4 + whole,
        out_specs=pl.BlockSpec((m_pad, n), lambda t, j: (0, 0)),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_w4a8_per_channel" if per_channel else f"grouped_w4a8_g{group}",
    )(*tiles, *args)[:m]
    # rows of no group were never written
    _, inside = row_groups(group_sizes, m)
    return jnp.where(inside[:, None], out, jnp.zeros((), out_dtype))


grouped_w4a8_matmul_triton = grouped_w4a8_matmul_pallas
