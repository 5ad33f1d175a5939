"""KV4: 4-bit keys and values in a paged cache, and the fused RoPE + quantize + paged write.

Format (docs/FORMATS.md; QServe section 1.6 of qserve_spec.md): per (token, KV head), over the
head's D channels, asymmetric UINT4 with a 16-bit scale and a 16-bit (non-integer) zero:
    scale = fp16((hi - lo) / 15)              (1 when hi == lo)
    zero  = fp16(-lo / scale)                 (= -15 lo / (hi - lo), in code units)
    q     = clamp(round_half_even(x / scale + zero), 0, 15)
    x_hat = (q - zero) * scale
QServe takes [lo, hi] = [min, max] of the row. Ours searches the range as it writes: the row's
[min, max] shrunk about its midpoint by each ratio r of ``RANGE_RATIOS`` (1.0 first, QServe's
range), and the candidate whose x_hat is closest to x (squared error; the first wins ties) is
stored. Clipping a few outliers buys a finer step for the rest (on the default model the
keys' error is most of what KV4 costs; docs/ACCURACY.md measures the gain). The stored format
and the attention kernels are unchanged; ``ratios=(1.0,)`` is QServe's quantizer.
Keys are quantized after RoPE. Pools, one per model for each of K and V (all layers):
    codes  uint8   [L, num_pages, Hkv, page_size, D/2]   byte d: channel d (low nibble) and
                                                         channel d + D/2 (high nibble)
    scale  float16 [L, num_pages, Hkv, page_size]
    zero   float16 [L, num_pages, Hkv, page_size]
Pairing channel d with d + D/2 matches rotate-half RoPE (which mixes exactly those two halves)
and lets a kernel work on the two halves as separate [.., D/2] tiles: no interleaving, no
concatenation. A (page, head) tile is contiguous: page_size * D/2 bytes.

``kv4_write`` applies RoPE to the new keys (cos/sin precomputed, so any rope scaling works),
quantizes keys and values, and writes them at (page, slot) of layer ``layer``, in place (the
pools are aliased to the outputs). Positions that must not be stored (padding, finished
sequences) are given the scratch page 0 by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import round_half_even, use_pallas


# The candidate ranges of a row: [min, max] shrunk about the midpoint by r (1.0 = QServe's).
RANGE_RATIOS: tuple[float, ...] = tuple(1.0 - i / 40 for i in range(21))  # 1.0, 0.975, .., 0.5


def _scale_zero(mx: jax.Array, mn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp16 scale and zero from a row's range [mn, mx] (float32), degenerate rows included."""
    rng = mx - mn
    scale = jnp.where(rng > 0, rng / 15.0, 1.0).astype(jnp.float16)
    zero = (-mn / scale.astype(jnp.float32)).astype(jnp.float16)
    return scale, zero


def _codes(x: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """float32 x, fp16 scale/zero (broadcastable) -> float32 codes 0..15."""
    inv = 1.0 / scale.astype(jnp.float32)
    return jnp.clip(round_half_even(x * inv + zero.astype(jnp.float32)), 0.0, 15.0)


def _searched_scale_zero(parts, ratios, row_max, row_min, row_sum):
    """fp16 (scale, zero) of the candidate range with the smallest squared error over a row
    given as `parts` (float32 arrays; the row is all of them together). row_max/min/sum reduce
    one part over the row's axis, keeping what broadcasts back against it, so one definition
    serves the XLA reference ([..., D] rows) and the kernel (two [D/2] halves)."""
    mx = functools.reduce(jnp.maximum, [row_max(p) for p in parts])
    mn = functools.reduce(jnp.minimum, [row_min(p) for p in parts])
    mid, half_range = (mx + mn) * 0.5, (mx - mn) * 0.5
    best = None
    for r in ratios:  # static: unrolled, a handful of elementwise passes over D values
        scale, zero = (_scale_zero(mx, mn) if r == 1.0 else
                       _scale_zero(mid + half_range * r, mid - half_range * r))
        s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
        err = sum(row_sum(jnp.square((_codes(p, scale, zero) - z32) * s32 - p)) for p in parts)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = tuple(jnp.where(better, a, b) for a, b in zip((err, scale, zero), best))
    return best[1], best[2]


def quantize_kv4(x: jax.Array, ratios: tuple[float, ...] = RANGE_RATIOS
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., D] float -> (codes uint8 [..., D/2], scale fp16 [...], zero fp16 [...]), the
    range searched over `ratios` (see the module docstring)."""
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    scale, zero = _searched_scale_zero(
        (x,), ratios, lambda p: p.max(axis=-1, keepdims=True),
        lambda p: p.min(axis=-1, keepdims=True), lambda p: p.sum(axis=-1, keepdims=True))
    q = _codes(x, scale, zero).astype(jnp.uint8)
    return q[..., :half] | (q[..., half:] << 4), scale[..., 0], zero[..., 0]


def dequantize_kv4(codes: jax.Array, scale: jax.Array, zero: jax.Array,
                   dtype=jnp.float32) -> jax.Array:
    """The inverse: codes [..., D/2], scale/zero [...] -> x_hat [..., D]."""
    q = jnp.concatenate([codes & 0xF, codes >> 4], axis=-1).astype(jnp.float32)
    s = scale.astype(jnp.float32)[..., None]
    return ((q - zero.astype(jnp.float32)[..., None]) * s).astype(dtype)


def rope_halves(lo, hi, cos, sin):
    """Rotate-half RoPE on the two halves of a head: (lo, hi) -> (lo c - hi s, hi c + lo s)."""
    return lo * cos - hi * sin, hi * cos + lo * sin


def _rope_f32(k, cos, sin):
    """k [..., H, D] before RoPE, cos/sin [..., D/2] -> roped k in float32."""
    half = k.shape[-1] // 2
    kf = k.astype(jnp.float32)
    lo, hi = rope_halves(kf[..., :half], kf[..., half:], cos[..., None, :], sin[..., None, :])
    return jnp.concatenate([lo, hi], axis=-1)


# ----------------------------------------------------------------------------------------------
# XLA reference


def kv4_write_xla(pools, layer, k, v, cos, sin, page, slot, ratios=RANGE_RATIOS):
    """pools = (kq, ks, kz, vq, vs, vz); k/v [..., Hkv, D] (k before RoPE; any leading token
    dims: [T] for a ragged batch); cos/sin [..., D/2]; page/slot [...] int32; layer: int32
    scalar. Returns the updated pools."""
    kq, ks, kz, vq, vs, vz = pools
    k_codes, k_scale, k_zero = quantize_kv4(_rope_f32(k, cos, sin), ratios)
    v_codes, v_scale, v_zero = quantize_kv4(v, ratios)
    # (layer, page, :, slot) indexing puts the token dims first: values are [..., Hkv, ...].
    at = (layer, page, slice(None), slot)
    return (kq.at[at].set(k_codes), ks.at[at].set(k_scale), kz.at[at].set(k_zero),
            vq.at[at].set(v_codes), vs.at[at].set(v_scale), vz.at[at].set(v_zero))


# ----------------------------------------------------------------------------------------------
# Pallas kernel: one (token, KV head) per program


def _write_kernel(k_ref, v_ref, cos_ref, sin_ref, page_ref, slot_ref, layer_ref,
                  kq_in, ks_in, kz_in, vq_in, vs_in, vz_in,
                  kq_ref, ks_ref, kz_ref, vq_ref, vs_ref, vz_ref, *, half: int,
                  ratios: tuple[float, ...]):
    del kq_in, ks_in, kz_in, vq_in, vs_in, vz_in  # aliased to the outputs
    h = pl.program_id(1)
    page, slot, layer = page_ref[0], slot_ref[0], layer_ref[0]
    lo = k_ref[pl.ds(0, half)].astype(jnp.float32)
    hi = k_ref[pl.ds(half, half)].astype(jnp.float32)
    lo, hi = rope_halves(lo, hi, cos_ref[...], sin_ref[...])

    def put(lo, hi, q_ref, s_ref, z_ref):
        scale, zero = _searched_scale_zero((lo, hi), ratios, jnp.max, jnp.min, jnp.sum)
        q_lo = _codes(lo, scale, zero).astype(jnp.int32)
        q_hi = _codes(hi, scale, zero).astype(jnp.int32)
        q_ref[layer, page, h, slot, :] = (q_lo | (q_hi << 4)).astype(jnp.uint8)
        s_ref[layer, page, h, slot] = scale
        z_ref[layer, page, h, slot] = zero

    put(lo, hi, kq_ref, ks_ref, kz_ref)
    put(v_ref[pl.ds(0, half)].astype(jnp.float32), v_ref[pl.ds(half, half)].astype(jnp.float32),
        vq_ref, vs_ref, vz_ref)


def kv4_write_pallas(pools, layer, k, v, cos, sin, page, slot, *, interpret: bool = False,
                     ratios: tuple[float, ...] = RANGE_RATIOS):
    *lead, hkv, d = k.shape
    half = d // 2
    n = 1
    for size in lead:
        n *= size
    token = lambda i, h: (i, h, 0)  # noqa: E731
    scalar = pl.BlockSpec((1,), lambda i, h: (i,))
    whole = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_write_kernel, half=half, ratios=tuple(ratios))
    return tuple(pl.pallas_call(
        kernel,
        grid=(n, hkv),
        in_specs=[pl.BlockSpec((None, None, d), token), pl.BlockSpec((None, None, d), token),
                  pl.BlockSpec((None, half), lambda i, h: (i, 0)),
                  pl.BlockSpec((None, half), lambda i, h: (i, 0)),
                  scalar, scalar, pl.BlockSpec((1,), lambda i, h: (0,))] + [whole] * 6,
        out_specs=[whole] * 6,
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={7 + i: i for i in range(6)},
        compiler_params=plt.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="rope_kv4_write",
    )(k.reshape(n, hkv, d), v.reshape(n, hkv, d), cos.reshape(n, half).astype(jnp.float32),
      sin.reshape(n, half).astype(jnp.float32), page.reshape(n).astype(jnp.int32),
      slot.reshape(n).astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32), *pools))


def kv4_write(pools, layer, k, v, cos, sin, page, slot, *, backend: str = "auto",
              interpret: bool = False, ratios: tuple[float, ...] = RANGE_RATIOS):
    """Fused RoPE(k) + KV4 quantization of k and v + paged write (see the module docstring);
    ratios: the candidate ranges ((1.0,): QServe's min/max quantizer)."""
    if k.shape != v.shape or k.shape[-1] % 2:
        raise ValueError(f"k {k.shape} and v {v.shape} must match, with an even head_dim")
    if not ratios or ratios[0] != 1.0 or not all(0 < r <= 1 for r in ratios):
        raise ValueError(f"ratios must start at 1.0 and lie in (0, 1], got {ratios}")
    if use_pallas(backend, interpret):
        return kv4_write_pallas(pools, layer, k, v, cos, sin, page, slot, interpret=interpret,
                                ratios=ratios)
    return kv4_write_xla(pools, layer, k, v, cos, sin, page, slot, ratios)
