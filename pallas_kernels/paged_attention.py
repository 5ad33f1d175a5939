"""Attention over a paged KV cache (16-bit or KV4), for decode steps and prefill chunks alike.

Sequence b owns pages ``page_table[b, :]`` (int32) of every layer's pool (``[L, num_pages, Hkv,
page_size, D]`` for 16 bits; the KV4 layout is in kv4.py); the layer index is an input, so no
per-layer copy of a pool is ever made. Its ``Q`` query tokens sit at positions
``start[b] + i``; query i attends to the cached keys at positions ``j <= start[b] + i`` with
``j < kv_lens[b]``. A decode step is ``Q = 1`` (start = the token's position); a chunk of a long
prompt is ``Q = chunk`` and sees the pages earlier chunks wrote, so prefill memory is bounded by
the chunk, not the prompt. The K/V of the tokens being processed are written to the cache
before attention reads it, so every query sees keys exactly as the cache stores them (KV4:
quantized), in prefill as in decode.

Kernel (Pallas, Triton backend), grid (B, Hkv, row blocks, splits): the query rows of one KV
group are (query, head) pairs, ``row = query * g + head``; a program takes a block of rows (for a
decode step, the whole GQA group padded to 16 rows for the tensor-core dot) and walks the pages
up to its last row's position, dequantizing KV4 tiles in registers, scores and the online
softmax in fp32. Channels d and d + D/2 are handled as two halves (the KV4 nibble pairing), so
nothing is concatenated in-kernel. A long decode context can be split along its pages; the
split of a sequence depends on its own length and the fixed ``splits`` only, and the partials
are combined in a fixed order, so a row's result never depends on the rest of the batch.

XLA reference (every backend but a GPU): the same blocked online softmax, in blocks of
``block_tokens`` keys with a dynamic trip count, so its memory is O(Q x block), never
O(Q x context). A fully masked block is an exact no-op (alpha = 1, p = 0), the dots compute a
row the same way whatever the other rows (see paged_attention_xla) and sums use a fixed order,
so a row's result is bit-identical alone or in any batch: what makes generation
batch-invariant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import fixed_order_sum, next_power_of_2, use_pallas
from pallas_kernels.kv4 import dequantize_kv4

_NEG_INF = float("-inf")


def _check(q, k_pool, page_table, start, kv_lens):
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, queries, heads, head_dim], got shape {q.shape}")
    b, _, hq, d = q.shape
    hkv = k_pool.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if page_table.shape[0] != b or start.shape != (b,) or kv_lens.shape != (b,):
        raise ValueError(f"page_table {page_table.shape}, start {start.shape} and kv_lens "
                         f"{kv_lens.shape} must all have the batch size {b} first")
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")


# ----------------------------------------------------------------------------------------------
# XLA reference


def _block_pages(page_size: int, block_tokens: int) -> int:
    return max(1, block_tokens // page_size)


def paged_attention_xla(q, k_pool, v_pool, layer, page_table, start, kv_lens, *, scale=None,
                        kv4_scales=None, block_tokens: int = 128):
    """q [B, Q, Hq, D]; 16-bit pools [L, N, Hkv, P, D], or KV4 codes with
    kv4_scales = (k_scale, k_zero, v_scale, v_zero); -> [B, Q, Hq, D] in q's dtype.

    Rows are the (query, head) pairs of a KV group, as in the kernel; every dot is batched over
    (sequence, KV head) with the rows as its M dimension. XLA:CPU computes a row of such a dot
    the same way for any number of rows >= 2 (a single row takes a matrix-vector kernel), so a
    lone row is padded with a copy of itself.
    """
    _check(q, k_pool, page_table, start, kv_lens)
    b, nq, hq, d = q.shape
    hkv, page_size = k_pool.shape[2], k_pool.shape[3]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    n_rows = nq * g
    qr = q.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, n_rows, d)
    rows = max(2, n_rows)
    if rows != n_rows:
        qr = jnp.concatenate([qr, qr], axis=2)
    q_pos = start[:, None, None] + (jnp.arange(rows) % n_rows)[None, None, :] // g  # [B, 1, R]

    bp = _block_pages(page_size, block_tokens)
    width = bp * page_size
    max_pages = page_table.shape[1]
    padded = -(-max_pages // bp) * bp
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, padded - max_pages)))
    kv4 = kv4_scales is not None

    def block(pool, j):
        """[B, Hkv, width, ...] of every sequence's j-th block of pages."""
        cols = lax.dynamic_slice_in_dim(table, j * bp, bp, axis=1)  # [B, bp]
        x = pool[layer, cols]  # [B, bp, Hkv, P, ...]
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(b, hkv, width, *x.shape[4:])

    def kv_block(j):
        if not kv4:
            return block(k_pool, j).astype(q.dtype), block(v_pool, j).astype(q.dtype)
        ks, kz, vs, vz = (block(a, j) for a in kv4_scales)
        return (dequantize_kv4(block(k_pool, j), ks, kz, q.dtype),
                dequantize_kv4(block(v_pool, j), vs, vz, q.dtype))

    def body(j, carry):
        o, m, l = carry
        k, v = kv_block(j)
        s = jnp.einsum("bhrd,bhsd->bhrs", qr, k, preferred_element_type=jnp.float32) * scale
        k_pos = j * width + jnp.arange(width)
        ok = (k_pos <= q_pos[..., None]) & (k_pos < kv_lens[:, None, None, None])
        s = jnp.where(ok, s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen no key yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l = l * alpha + fixed_order_sum(p, axis=-1)
        pv = jnp.einsum("bhrs,bhsd->bhrd", p.astype(q.dtype), v,
                        preferred_element_type=jnp.float32)
        return o * alpha[..., None] + pv, m_new, l

    n_blocks = -(-jnp.max(kv_lens) // width)
    init = (jnp.zeros((b, hkv, rows, d), jnp.float32),
            jnp.full((b, hkv, rows), _NEG_INF, jnp.float32),
            jnp.zeros((b, hkv, rows), jnp.float32))
    o, _, l = lax.fori_loop(0, n_blocks, body, init)
    o = (o / jnp.where(l > 0, l, 1.0)[..., None])[:, :, :n_rows]
    o = o.reshape(b, hkv, nq, g, d).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, nq, hq, d).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Pallas kernel


def _kernel(q_ref, pt_ref, start_ref, len_ref, layer_ref, k_ref, v_ref, *rest, kv4: bool,
            page_size: int, group: int, half: int, splits: int, sm_scale: float):
    k_sz, v_sz = ((rest[0], rest[1]), (rest[2], rest[3])) if kv4 else ((None, None), (None, None))
    olo_ref, ohi_ref, m_ref, l_ref = rest[-4:]
    h, row_block, split = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    start, length, layer = start_ref[0], len_ref[0], layer_ref[0]
    rows = q_ref.shape[0]
    q_lo = q_ref[:, pl.ds(0, half)]
    q_hi = q_ref[:, pl.ds(half, half)]
    dtype = q_lo.dtype
    q_pos = start + (row_block * rows + jnp.arange(rows)) // group
    # pages this block of rows needs, and this split's share of the sequence's pages (a
    # function of the sequence's own length: the batch never changes a row's reduction order)
    last_pos = start + (row_block * rows + rows - 1) // group
    n_needed = pl.cdiv(jnp.minimum(length, last_pos + 1), page_size)
    per_split = pl.cdiv(pl.cdiv(length, page_size), splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, n_needed)

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
        k_pos = i * page_size + jnp.arange(page_size)
        ok = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < length)
        s = jnp.where(ok, s, _NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new > _NEG_INF, m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
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


def default_splits(max_pages: int, max_batch: int, kv_heads: int,
                   target_programs: int = 264) -> int:
    """Splits along a decode context: enough for ~2 programs per SM (H100: 132) at the largest
    batch a caller runs. A caller fixes it once (an engine per its slot count), never per batch:
    a row's reduction order must not depend on how many other rows share its step."""
    splits = 1
    while max_batch * kv_heads * splits < target_programs and splits * 2 <= max_pages:
        splits *= 2
    return splits


def paged_attention_pallas(q, k_pool, v_pool, layer, page_table, start, kv_lens, *, scale=None,
                           kv4_scales=None, splits: int = 1, block_rows: int = 64,
                           num_warps: int = 4, interpret: bool = False):
    _check(q, k_pool, page_table, start, kv_lens)
    b, nq, hq, d = q.shape
    hkv, page_size = k_pool.shape[2], k_pool.shape[3]
    g = hq // hkv
    half = d // 2
    max_pages = page_table.shape[1]
    n_rows = nq * g
    # >= 16 rows for the tensor-core dot; a decode step's GQA group is one block
    rows = max(16, min(block_rows, next_power_of_2(n_rows)))
    row_blocks = pl.cdiv(n_rows, rows)
    qr = q.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, n_rows, d)
    if row_blocks * rows != n_rows:
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, row_blocks * rows - n_rows), (0, 0)))
    whole = pl.BlockSpec(memory_space=pl.ANY)
    kv4 = kv4_scales is not None
    pools = (k_pool, v_pool) + (tuple(kv4_scales) if kv4 else ())
    part = pl.BlockSpec((None, None, None, rows, half), lambda i, h, r, s: (i, h, s, r, 0))
    stat = pl.BlockSpec((None, None, None, rows), lambda i, h, r, s: (i, h, s, r))
    per_seq = pl.BlockSpec((1,), lambda i, h, r, s: (i,))
    kernel = functools.partial(
        _kernel, kv4=kv4, page_size=page_size, group=g, half=half, splits=splits,
        sm_scale=d ** -0.5 if scale is None else scale)
    padded_rows = row_blocks * rows
    o_lo, o_hi, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, row_blocks, splits),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, h, r, s: (i, h, r, 0)),
                  pl.BlockSpec((None, max_pages), lambda i, h, r, s: (i, 0)),
                  per_seq, per_seq,
                  pl.BlockSpec((1,), lambda i, h, r, s: (0,))] + [whole] * len(pools),
        out_specs=[part, part, stat, stat],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, padded_rows, half), jnp.float32)] * 2
                  + [jax.ShapeDtypeStruct((b, hkv, splits, padded_rows), jnp.float32)] * 2,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="paged_attention_kv4" if kv4 else "paged_attention",
    )(qr, page_table.astype(jnp.int32), start.astype(jnp.int32), kv_lens.astype(jnp.int32),
      jnp.reshape(layer, (1,)).astype(jnp.int32), *pools)
    o = _combine_splits(jnp.concatenate([o_lo, o_hi], axis=-1), m, l)  # [B, Hkv, R, D]
    o = o[:, :, :n_rows].reshape(b, hkv, nq, g, d).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, nq, hq, d).astype(q.dtype)


def _combine_splits(o, m, l):
    """Partials o [B, Hkv, S, R, D], m/l [B, Hkv, S, R] -> [B, Hkv, R, D], in a fixed order."""
    m_max = m.max(axis=2, keepdims=True)
    w = jnp.where(m > _NEG_INF, jnp.exp(m - jnp.where(m_max > _NEG_INF, m_max, 0.0)), 0.0)
    denom = fixed_order_sum(w * l, axis=2)
    num = fixed_order_sum(w[..., None] * o, axis=2)
    return num / jnp.where(denom > 0, denom, 1.0)[..., None]


def paged_attention(q, k_pool, v_pool, layer, page_table, start, kv_lens, *, scale=None,
                    kv4_scales=None, splits: int = 1, backend: str = "auto",
                    interpret: bool = False) -> jax.Array:
    """Public entry point: 16-bit pools, or KV4 pools with kv4_scales=(ks, kz, vs, vz).

    q [B, Q, Hq, D]; page_table [B, max_pages] int32; start, kv_lens [B] int32 (see the module
    docstring). ``splits`` splits long decode contexts on a GPU (the XLA path ignores it).
    """
    if use_pallas(backend, interpret):
        return paged_attention_pallas(q, k_pool, v_pool, layer, page_table, start, kv_lens,
                                      scale=scale, kv4_scales=kv4_scales, splits=splits,
                                      interpret=interpret)
    return paged_attention_xla(q, k_pool, v_pool, layer, page_table, start, kv_lens,
                               scale=scale, kv4_scales=kv4_scales)
