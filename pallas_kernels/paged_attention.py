"""Decode attention over a paged KV cache (16-bit or KV4): one query token per sequence.

Pools hold every layer (``[L, num_pages, Hkv, page_size, D]`` for 16 bits; the KV4 layout is in
kv4.py); the layer index is an input, so no per-layer copy of a pool is ever made. Sequence b
owns pages ``page_table[b, :]`` (int32) and its first ``lengths[b]`` tokens are valid.

Kernel (Pallas, Triton backend), grid (B, Hkv, splits):
- one program handles every query head of one KV group (GQA), padded to at least 16 rows for
  the tensor-core dot, so the group's pages are read once for all of its query heads;
- it walks its share of the sequence's pages (a split along the sequence: long contexts get
  B * Hkv * splits programs), dequantizing each KV4 page tile in registers, with scores and the
  online softmax in fp32 and the dots in the query's 16-bit type;
- the head is processed as two halves (channels d and d + D/2, the KV4 nibble pairing), so
  nothing is concatenated in-kernel; partial outputs (o, m, l) per split are combined by a
  short XLA reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import next_power_of_2, use_pallas
from pallas_kernels.kv4 import dequantize_kv4

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# XLA reference


def _gather_pages(pool, layer, page_table):
    """pool [L, N, Hkv, P, ...] -> [B, Hkv, maxp * P, ...] for each sequence's pages."""
    x = pool[layer, page_table]  # [B, maxp, Hkv, P, ...]
    x = jnp.moveaxis(x, 2, 1)  # [B, Hkv, maxp, P, ...]
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def paged_decode_attention_xla(q, k_pool, v_pool, layer, page_table, lengths, *, scale=None,
                               kv4_scales=None):
    """q [B, Hq, D]; 16-bit pools [L, N, Hkv, P, D], or KV4 codes with
    kv4_scales = (k_scale, k_zero, v_scale, v_zero); -> [B, Hq, D] in q's dtype."""
    b, hq, d = q.shape
    hkv = k_pool.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    if kv4_scales is None:
        k = _gather_pages(k_pool, layer, page_table).astype(q.dtype)
        v = _gather_pages(v_pool, layer, page_table).astype(q.dtype)
    else:
        ks, kz, vs, vz = (_gather_pages(a, layer, page_table) for a in kv4_scales)
        k = dequantize_kv4(_gather_pages(k_pool, layer, page_table), ks, kz, q.dtype)
        v = dequantize_kv4(_gather_pages(v_pool, layer, page_table), vs, vz, q.dtype)
    qg = q.reshape(b, hkv, g, d)
    s = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    s = jnp.where(valid[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bhsd->bhgd", p.astype(q.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Pallas kernel


def _decode_kernel(q_ref, pt_ref, len_ref, layer_ref, k_ref, v_ref, *rest, kv4: bool,
                   page_size: int, pages_per_split: int, half: int, sm_scale: float):
    k_sz, v_sz = ((rest[0], rest[1]), (rest[2], rest[3])) if kv4 else ((None, None), (None, None))
    olo_ref, ohi_ref, m_ref, l_ref = rest[-4:]
    h, split = pl.program_id(1), pl.program_id(2)
    length, layer = len_ref[0], layer_ref[0]
    rows = q_ref.shape[0]
    q_lo = q_ref[:, pl.ds(0, half)]
    q_hi = q_ref[:, pl.ds(half, half)]
    dtype = q_lo.dtype
    first = split * pages_per_split
    last = jnp.minimum(first + pages_per_split, pl.cdiv(length, page_size))

    def tile(ref, s_ref, z_ref, page):
        """The (page, head) tile as two [P, D/2] halves in the query dtype."""
        if not kv4:
            return (ref[layer, page, h, :, pl.ds(0, half)].astype(dtype),
                    ref[layer, page, h, :, pl.ds(half, half)].astype(dtype))
        codes = ref[layer, page, h].astype(jnp.int32)  # [P, D/2]
        s = s_ref[layer, page, h].astype(jnp.float32)[:, None]
        z = z_ref[layer, page, h].astype(jnp.float32)[:, None]
        lo = ((codes & 0xF).astype(jnp.float32) - z) * s
        hi = ((codes >> 4).astype(jnp.float32) - z) * s
        return lo.astype(dtype), hi.astype(dtype)

    def body(i, carry):
        o_lo, o_hi, m, l = carry
        page = pt_ref[i]
        k_lo, k_hi = tile(k_ref, *k_sz, page)
        nt = (((1,), (1,)), ((), ()))
        s = (lax.dot_general(q_lo, k_lo, nt, preferred_element_type=jnp.float32)
             + lax.dot_general(q_hi, k_hi, nt, preferred_element_type=jnp.float32)) * sm_scale
        pos = i * page_size + jnp.arange(page_size)
        s = jnp.where((pos < length)[None, :], s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        v_lo, v_hi = tile(v_ref, *v_sz, page)
        pd = p.astype(dtype)
        o_lo = o_lo * alpha[:, None] + jnp.dot(pd, v_lo, preferred_element_type=jnp.float32)
        o_hi = o_hi * alpha[:, None] + jnp.dot(pd, v_hi, preferred_element_type=jnp.float32)
        return o_lo, o_hi, m_new, l

    init = (jnp.zeros((rows, half), jnp.float32), jnp.zeros((rows, half), jnp.float32),
            jnp.full((rows,), _NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o_lo, o_hi, m, l = lax.fori_loop(first, jnp.maximum(first, last), body, init)
    olo_ref[...] = o_lo
    ohi_ref[...] = o_hi
    m_ref[...] = m
    l_ref[...] = l


def default_splits(max_pages: int, batch: int, kv_heads: int, target_programs: int = 264) -> int:
    """Enough splits along the sequence to give the GPU ~2 programs per SM, and no more."""
    splits = 1
    while (batch * kv_heads * splits < target_programs and splits * 2 <= max_pages):
        splits *= 2
    return splits


def paged_decode_attention_pallas(q, k_pool, v_pool, layer, page_table, lengths, *, scale=None,
                                  kv4_scales=None, splits: int | None = None,
                                  num_warps: int = 4, interpret: bool = False):
    b, hq, d = q.shape
    hkv, page_size = k_pool.shape[2], k_pool.shape[3]
    g = hq // hkv
    half = d // 2
    max_pages = page_table.shape[1]
    splits = splits or default_splits(max_pages, b, hkv)
    pages_per_split = pl.cdiv(max_pages, splits)
    rows = max(16, next_power_of_2(g))  # tensor-core dots need >= 16 rows
    qg = q.reshape(b, hkv, g, d)
    if rows != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    whole = pl.BlockSpec(memory_space=pl.ANY)
    kv4 = kv4_scales is not None
    pools = (k_pool, v_pool) + (tuple(kv4_scales) if kv4 else ())
    part = pl.BlockSpec((None, None, None, rows, half), lambda i, h, s: (i, h, s, 0, 0))
    stat = pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0))
    kernel = functools.partial(
        _decode_kernel, kv4=kv4, page_size=page_size, pages_per_split=pages_per_split,
        half=half, sm_scale=d ** -0.5 if scale is None else scale)
    o_lo, o_hi, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
                  pl.BlockSpec((None, max_pages), lambda i, h, s: (i, 0)),
                  pl.BlockSpec((1,), lambda i, h, s: (i,)),
                  pl.BlockSpec((1,), lambda i, h, s: (0,))] + [whole] * len(pools),
        out_specs=[part, part, stat, stat],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, rows, half), jnp.float32)] * 2
                  + [jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)] * 2,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention_kv4" if kv4 else "paged_decode_attention",
    )(qg, page_table.astype(jnp.int32), lengths.astype(jnp.int32),
      jnp.reshape(layer, (1,)).astype(jnp.int32), *pools)
    # Combine the splits: rescale each partial by exp(m_split - m_max).
    m_max = m.max(axis=2, keepdims=True)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - m_max), 0.0)  # empty splits weigh nothing
    denom = (w * l).sum(axis=2)[..., None]
    o = jnp.concatenate([(w[..., None] * o_lo).sum(axis=2), (w[..., None] * o_hi).sum(axis=2)],
                        axis=-1) / denom
    return o[:, :, :g].reshape(b, hq, d).astype(q.dtype)


def paged_decode_attention(q, k_pool, v_pool, layer, page_table, lengths, *, scale=None,
                           kv4_scales=None, splits: int | None = None, backend: str = "auto",
                           interpret: bool = False) -> jax.Array:
    """Public entry point: 16-bit pools, or KV4 pools with kv4_scales=(ks, kz, vs, vz)."""
    if use_pallas(backend, interpret):
        return paged_decode_attention_pallas(q, k_pool, v_pool, layer, page_table, lengths,
                                             scale=scale, kv4_scales=kv4_scales, splits=splits,
                                             interpret=interpret)
    return paged_decode_attention_xla(q, k_pool, v_pool, layer, page_table, lengths,
                                      scale=scale, kv4_scales=kv4_scales)

