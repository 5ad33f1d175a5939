"""The W4A8 GEMM for Hopper (sm_90) in Pallas Mosaic GPU: TMA pipeline, s8 wgmma, s32 accumulators.

Same math and epilogue as the XLA reference ``xla.w4a8_matmul_xla`` (formats:
pallas_kernels/packing.py):

    y[m, n] = epilogue(sum_k x_q[m, k] * w_int[n, k])
    per-channel: w_int = q (0..15);          y = acc * s_x[m] * scale[n] - szero[n] * row_sum[m]
    group g128/g64: w_int = q * s2 - szero;  y = acc * s_x[m] * s1[n]

Design (LiquidGEMM/QServe-style transposed product, y^T = W . x^T):

* wgmma's M is fixed at 64, its N is anything from 8 to 256 in steps of 8. So the *weights* take
  the M side (64-row slabs of N) and the *activations* take wgmma's N side: a decode batch of
  M = 1 runs as an 8-wide wgmma instead of being padded to 64.
* Per CTA: a tile of ``block_n`` weight rows x ``block_m`` activation rows. ``plgpu.emit_pipeline``
  streams K in steps of ``block_k`` through ``max_concurrent_steps`` shared-memory stages by TMA:
  the packed weight bytes [block_n, block_k / 2] (uint8, unchanged checkpoint layout), the INT8
  activations [block_m, block_k], and for the group format the step's rows of s2 and szero.
* Each step loads the packed bytes into registers, splits them into nibbles (``& 15``, ``>> 4``
  in 32-bit lanes: Mosaic rejects 8-bit arithmetic), forms the group level exactly in INT8
  (``q * s2 - szero``) and truncates to s8; that s8 array is wgmma's *A operand in registers*
  (``plgpu.wgmma(acc, a_regs, x_smem.T)``, acc: ``plgpu.ACC`` int32); the activations are the B
  operand straight from the swizzled shared-memory stage. No float math in the K loop.
* Epilogue in fp32 in registers in the reference's operation order, cast to the output dtype and
  stored as the transposed tile y^T[n, m]; the wrapper transposes [N, M] back to [M, N].
* Split-K (``split_k``, chosen from the SM count when None) fills the 132 SMs at decode sizes:
  each split writes its raw INT32 accumulators, XLA adds them (exact) and applies the reference
  epilogue function itself, so the result is bit-identical to ``w4a8_matmul_xla`` by construction.

The nibble layout and the activations. A wgmma A operand in registers must be [64, S] with S the
B operand's swizzle width in bytes (64 or 128; ``swizzle`` in the config; S = 32 is refused for
s8 A in registers in jax 0.11.2, see ``mosaic/gpu/wgmma.py``: a ptxas 12.8 miscompile). The low
nibbles of S consecutive packed bytes are S k-values (k = 64c + j, j < 32, for the S / 32 chunks
c the bytes cover), the high nibbles the S values 32 above. Instead of interleaving nibbles in
registers (no concatenation along the minor dimension in Mosaic's register layouts) the wrapper
permutes the *activations'* K order once per call, which leaves the dot product unchanged: within
each "super-chunk" of 2S k-values it puts the S low-nibble k's first and the S high-nibble k's
second (``permute_activations``). Then the B operand of each nibble half is a contiguous,
swizzle-aligned [block_m, S] slice of the activation stage. Cost: one XLA pass over x (M x K
bytes; negligible at decode, a few % of a prefill GEMM; a fused quantize kernel could emit the
permuted order directly). Checkpoints and the weight layout are unchanged.
Groups inside one A slab: the S bytes cover S / 32 chunks; with g64 (or g128 and S = 128) they
belong to several groups, so s2/szero are selected per column with an iota compare.

What jax 0.11.2 does and does not support (checked on CPU, no GPU):

* Lowering (abstract H100, ``custom_call @mosaic_gpu_v2``): all of the above, including the s8
  register A operand under Warpgroup lowering semantics.
* GPU interpret mode (``InterpretGPUParams``) runs TMA, barriers, ``emit_pipeline``, i8 wgmma
  from shared memory exactly, but its wgmma callback only accepts *shared-memory* A operands
  (``interpret/gpu_callbacks.py``: ``HostAllocationKey.from_array`` on the A operand; a register
  array fails with "Expected shape (6,) but got (64, ...)"). So the kernel has a second A path,
  ``a_operand="smem"``: the same unpacked s8 slab is stored to a swizzled shared-memory buffer
  and wgmma reads A from there (the "SS" variant). Interpret mode always uses it; on a GPU it is
  a config option. Everything but the register hand-off is therefore checked on CPU; the
  register path is checked by lowering only (and by the GPU tests when a GPU is lent).
* Not used yet: warp specialisation (a producer warpgroup for TMA), 2 consumer warpgroups,
  clusters/multicast, a TMA-store epilogue, persistent scheduling; each wgmma group is waited
  for (``wgmma_wait(0)``) at the end of its pipeline step.

Configs: ``MGPU_GEMM_CONFIGS`` (by M bucket) is UNTUNED: no GPU was available when it was
written; sizes follow wgmma/TMA constraints and register/shared-memory budgets only.
benchmarks/gemm.py --mgpu-sweep times alternatives on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.packing import CHUNK, FormatError, W4Group, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation
from pallas_kernels.w4a8_matmul.xla import _check, _epilogue

H100_NUM_SMS = 132
WGMMA_M = 64  # Hopper's fixed wgmma M


@dataclasses.dataclass(frozen=True)
class MgpuGemmConfig:
    """One CTA computes y^T[block_n, block_m]; K advances block_k per pipeline step.

    block_n: weight rows per CTA (multiple of 64; one wgmma M slab per 64 rows).
    block_m: activation rows per CTA = wgmma N (multiple of 8, <= 256).
    block_k: K per pipeline step (multiple of 2 * swizzle).
    swizzle: bytes of the shared-memory swizzle = K per wgmma A slab (64 or 128).
    max_concurrent_steps: pipeline stages in flight (TMA runs that many steps ahead).
    split_k: K splits (None: chosen so that the CTAs fill the GPU's SMs).
    a_operand: "registers" (unpacked s8 weights go from registers to wgmma) or "smem" (they are
      stored to shared memory first; the only path GPU interpret mode can run).
    """

    block_n: int = 128
    block_m: int = 128
    block_k: int = 256
    swizzle: int = 128
    max_concurrent_steps: int = 4
    split_k: int | None = None
    a_operand: str = "registers"


# (largest M of the bucket, config). UNTUNED (no GPU lent when written): decode buckets use the
# narrowest wgmma N that holds M, 64-row weight slabs, deep K steps and auto split-K so ~132 CTAs
# run; prefill buckets use 128 x 128 tiles (128 int32 accumulator registers per thread).
MGPU_GEMM_CONFIGS: tuple[tuple[int, MgpuGemmConfig], ...] = (
    (8, MgpuGemmConfig(block_n=64, block_m=8, block_k=512, max_concurrent_steps=4)),
    (16, MgpuGemmConfig(block_n=64, block_m=16, block_k=512, max_concurrent_steps=4)),
    (32, MgpuGemmConfig(block_n=64, block_m=32, block_k=512, max_concurrent_steps=4)),
    (64, MgpuGemmConfig(block_n=64, block_m=64, block_k=256, max_concurrent_steps=4)),
    (128, MgpuGemmConfig(block_n=128, block_m=64, block_k=256, max_concurrent_steps=4)),
    (256, MgpuGemmConfig(block_n=128, block_m=128, block_k=256, max_concurrent_steps=3)),
    (1 << 62, MgpuGemmConfig(block_n=128, block_m=128, block_k=256, max_concurrent_steps=3,
                             split_k=1)),
)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def default_num_sms() -> int:
    """SMs of the default GPU; 132 (H100 SXM) when there is none (interpret mode, lowering)."""
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(dev.core_count)
    except Exception:  # noqa: BLE001 - no backend: lowering for an abstract device
        pass
    return H100_NUM_SMS


def config_for(m: int, n: int, k: int, num_sms: int = H100_NUM_SMS,
               base: MgpuGemmConfig | None = None) -> MgpuGemmConfig:
    """The config for an [m, k] x [n, k] GEMM, fitted to the shape (block sizes that divide it,
    split_k resolved to an integer)."""
    if base is None:
        for limit, base in MGPU_GEMM_CONFIGS:
            if m <= limit:
                break
    cfg = base
    swizzle = cfg.swizzle
    if swizzle == 128 and k % 256:
        swizzle = 64  # smaller slabs instead of padding K
    block_m = min(cfg.block_m, _round_up(m, 8))
    block_n = cfg.block_n
    while n % block_n:
        block_n //= 2
    if block_n % WGMMA_M:
        raise FormatError(f"N={n} is not a multiple of {WGMMA_M}")
    k_pad = _round_up(k, 2 * swizzle)
    block_k = max(cfg.block_k, 2 * swizzle)
    while k_pad % block_k:
        block_k //= 2
    steps = k_pad // block_k
    split = cfg.split_k
    if split is None:
        tiles = (n // block_n) * (_round_up(m, block_m) // block_m)
        split = 1
        for s in range(1, steps + 1):  # the most splits that still fit one wave, >= 2 steps each
            if steps % s == 0 and tiles * s <= num_sms and steps // s >= 2:
                split = s
    if steps % split:
        raise FormatError(f"split_k={split} does not divide the {steps} K steps")
    return dataclasses.replace(cfg, block_n=block_n, block_m=block_m, block_k=block_k,
                               swizzle=swizzle, split_k=split)


def permute_activations(x: jax.Array, swizzle: int) -> jax.Array:
    """x [M, K] -> the K order the kernel's nibble slabs expect (K % (2 * swizzle) == 0).

    Within each super-chunk of 2S k-values (S = swizzle, S / 32 packed chunks): first the low
    nibbles' k = 64c + j (j < 32) of its chunks in byte order, then the high nibbles' k + 32.
    """
    m, k = x.shape
    sup = 2 * swizzle
    x = x.reshape(m, k // sup, sup // CHUNK, 2, CHUNK // 2)
    return x.transpose(0, 1, 3, 2, 4).reshape(m, k)


def _transforms(swizzle: int):
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def _kernel(*refs, per_channel: bool, cfg: MgpuGemmConfig, k_steps: int, group: int,
            out_kind: str, interpret: bool):
    bn, bm, bk, sw = cfg.block_n, cfg.block_m, cfg.block_k, cfg.swizzle
    if per_channel:
        (w_gmem, x_gmem, sx_gmem, scale_gmem, szero_gmem, rsum_gmem, o_gmem, *scratch) = refs
        s2_gmem = sz_gmem = None
    else:
        (w_gmem, x_gmem, sx_gmem, s1_gmem, s2_gmem, sz_gmem, o_gmem, *scratch) = refs
    ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
    n_sl = pl.ds(ni * bn, bn)
    m_sl = pl.ds(mi * bm, bm)
    k0 = si * k_steps  # first K step of this split
    a_smem = scratch[0] if cfg.a_operand == "smem" else None
    n_slabs, pieces = bn // WGMMA_M, (bk // 2) // sw
    groups_per_step = bk // group

    def step(_, w_smem, x_smem, *grp, acc_ref):
        if not per_channel:
            s2_smem, sz_smem = grp
        for r in range(n_slabs):
            rows = pl.ds(r * WGMMA_M, WGMMA_M)
            for pc in range(pieces):
                packed = w_smem[rows, pl.ds(pc * sw, sw)].astype(jnp.int32)  # [64, S] bytes
                if not per_channel:
                    # the piece's S / 32 chunks: chunk i has k = pc * 2S + 64 i + ... in the step
                    chunks = sw // (CHUNK // 2)
                    col = lax.broadcasted_iota(jnp.int32, (WGMMA_M, sw), 1)
                    s2 = sz = None
                    for i in range(chunks):
                        g = (pc * 2 * sw + CHUNK * i) // group
                        if s2 is not None and g == prev:
                            continue
                        s2_i = s2_smem[g, rows].astype(jnp.int32)[:, None]
                        sz_i = sz_smem[g, rows].astype(jnp.int32)[:, None]
                        if s2 is None:
                            s2, sz = s2_i, sz_i
                        else:
                            first = col >= i * (CHUNK // 2)
                            s2, sz = jnp.where(first, s2_i, s2), jnp.where(first, sz_i, sz)
                        prev = g
                for h in range(2):
                    q = packed & 0xF if h == 0 else packed >> 4
                    a = (q if per_channel else q * s2 - sz).astype(jnp.int8)
                    b = x_smem.at[:, pl.ds(pc * 2 * sw + h * sw, sw)].T
                    acc = acc_ref.at[rows]
                    if a_smem is not None:
                        a_smem[...] = a
                        plgpu.commit_smem()
                        plgpu.wgmma(acc, a_smem, b)
                        plgpu.wgmma_wait(0)
                    else:
                        plgpu.wgmma(acc, a, b)
        plgpu.wgmma_wait(0)  # the stage's buffers are released when the step returns

    in_specs = [
        plgpu.BlockSpec((bn, bk // 2), lambda k: (0, k), transforms=_transforms(sw)),
        plgpu.BlockSpec((bm, bk), lambda k: (0, k), transforms=_transforms(sw)),
    ]
    gmem = [w_gmem.at[n_sl, pl.ds(k0 * (bk // 2), k_steps * (bk // 2))],
            x_gmem.at[m_sl, pl.ds(k0 * bk, k_steps * bk)]]
    if not per_channel:
        in_specs += [plgpu.BlockSpec((groups_per_step, bn), lambda k: (k, 0))] * 2
        g_sl = pl.ds(k0 * groups_per_step, k_steps * groups_per_step)
        gmem += [s2_gmem.at[g_sl, n_sl], sz_gmem.at[g_sl, n_sl]]

    def run(acc_ref):
        pipeline = plgpu.emit_pipeline(
            functools.partial(step, acc_ref=acc_ref), grid=(k_steps,), in_specs=in_specs,
            max_concurrent_steps=cfg.max_concurrent_steps)
        pipeline(*gmem)
        return acc_ref[...]

    if out_kind == "acc":  # split-K partials: the wrapper adds them and applies the epilogue
        acc = pl.run_scoped(run, plgpu.ACC((bn, bm), jnp.int32))  # [bn, bm] int32
        o_gmem[si, n_sl, m_sl] = acc
        return
    # The epilogue's vectors go to shared memory by TMA while the main loop runs (Mosaic loads
    # registers from shared memory only).
    if per_channel:
        vecs = [(sx_gmem, m_sl), (rsum_gmem, m_sl), (scale_gmem, n_sl), (szero_gmem, n_sl)]
    else:
        vecs = [(sx_gmem, m_sl), (s1_gmem, n_sl)]
    vec_smem, bar = scratch[-2], scratch[-1]
    for i, (src, sl) in enumerate(vecs):
        plgpu.copy_gmem_to_smem(src.at[sl], vec_smem[i], bar.at[i])
    acc = pl.run_scoped(run, plgpu.ACC((bn, bm), jnp.int32))  # [bn, bm] int32
    for i in range(len(vecs)):
        plgpu.barrier_wait(bar.at[i])
    f32 = lambda i: vec_smem[i][...].astype(jnp.float32)
    # in the order of xla._epilogue: acc * s_x, then * scale, then - szero * row_sum
    y = acc.astype(jnp.float32) * f32(0)[None, :]
    if per_channel:
        y = y * f32(2)[:, None]
        y = y - f32(3)[:, None] * f32(1)[None, :]
    else:
        y = y * f32(1)[:, None]
    o_gmem[n_sl, m_sl] = y.astype(o_gmem.dtype)


def _pad_k(w, x, k: int, k_pad: int):
    """Slow path for K not a multiple of 2 * swizzle: zero-pad K of x and of the weights (a copy
    of the weights per call). Zero activations make the padded products zero whatever the
    weights' padded codes; groups get s2 = 1, szero = 0."""
    extra = k_pad - k
    x = jnp.pad(x, ((0, 0), (0, extra)))
    qw = jnp.pad(w.qweight, ((0, 0), (0, extra // 2)))
    if isinstance(w, W4PerChannel):
        return dataclasses.replace(w, qweight=qw), x
    ng = extra // w.group_size
    s2 = jnp.pad(w.s2, ((0, ng), (0, 0)), constant_values=1)
    sz = jnp.pad(w.szero, ((0, ng), (0, 0)))
    return dataclasses.replace(w, qweight=qw, s2=s2, szero=sz), x


def w4a8_matmul_mgpu(act: QuantizedActivation, w: W4PerChannel | W4Group,
                     out_dtype=jnp.bfloat16, *, config: MgpuGemmConfig | None = None,
                     interpret: bool = False, num_sms: int | None = None) -> jax.Array:
    """y [M, N] = x_q [M, K] . W4^T with QServe's epilogue, by the Mosaic GPU kernel.

    config: a base config (block sizes are fitted to the shape); default from
    MGPU_GEMM_CONFIGS. interpret=True runs Mosaic GPU's interpret mode on CPU (A from smem).
    num_sms: SMs to fill with split-K (default: the GPU's, 132 without one).
    """
    m, n, k = _check(act, w)
    per_channel = isinstance(w, W4PerChannel)
    group = CHUNK if per_channel else w.group_size
    cfg = config_for(m, n, k, num_sms or default_num_sms(), config)
    if interpret:
        cfg = dataclasses.replace(cfg, a_operand="smem")
    if cfg.a_operand not in ("registers", "smem"):
        raise ValueError(f"a_operand must be 'registers' or 'smem', not {cfg.a_operand!r}")
    bn, bm, bk, sw = cfg.block_n, cfg.block_m, cfg.block_k, cfg.swizzle
    if not (8 <= bm <= 256 and bm % 8 == 0) or bn % WGMMA_M or bk % (2 * sw) or bk % group:
        raise FormatError(f"unsupported Mosaic GEMM config {cfg}")
    x = act.values
    k_pad = _round_up(k, 2 * sw)
    if k_pad != k:
        w, x = _pad_k(w, x, k, k_pad)
    m_pad = _round_up(m, bm)
    x = permute_activations(jnp.pad(x, ((0, m_pad - m), (0, 0))), sw)
    sx = jnp.pad(act.scale, (0, m_pad - m))
    split = cfg.split_k
    k_steps = k_pad // bk // split
    out_kind = "acc" if split > 1 else "y"
    if per_channel:
        rsum = jnp.pad(act.row_sum.astype(jnp.float32), (0, m_pad - m))
        args = (w.qweight, x, sx, w.scale, w.szero, rsum)
    else:
        args = (w.qweight, x, sx, w.s1, w.s2, w.szero)
    out_type = (jax.ShapeDtypeStruct((split, n, m_pad), jnp.int32) if out_kind == "acc"
                else jax.ShapeDtypeStruct((n, m_pad), out_dtype))
    scratch = []
    if cfg.a_operand == "smem":
        scratch.append(plgpu.SMEM((WGMMA_M, sw), jnp.int8, transforms=_transforms(sw)))
    if out_kind == "y":  # the epilogue's vectors in shared memory, and their TMA barriers
        vec_types = ([(bm, act.scale.dtype), (bm, jnp.float32), (bn, w.scale.dtype),
                      (bn, w.szero.dtype)] if per_channel else
                     [(bm, act.scale.dtype), (bn, w.s1.dtype)])
        scratch.append([plgpu.SMEM((size,), dt) for size, dt in vec_types])
        scratch.append(plgpu.Barrier(num_barriers=len(vec_types)))
    interpret_params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        interpret_params = InterpretGPUParams()
    kernel = plgpu.kernel(
        functools.partial(_kernel, per_channel=per_channel, cfg=cfg, k_steps=k_steps,
                          group=group, out_kind=out_kind, interpret=interpret),
        out_type=out_type,
        scratch_types=scratch,
        grid=(n // bn, m_pad // bm, split),
        grid_names=("n", "m", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params,
    )
    out = kernel(*args)
    if out_kind == "acc":  # exact INT32 sum of the splits, then the reference epilogue itself
        acc = out.sum(axis=0, dtype=jnp.int32).T[:m]
        return _epilogue(acc, act.scale, w, act.row_sum, out_dtype)
    return out.T[:m]
