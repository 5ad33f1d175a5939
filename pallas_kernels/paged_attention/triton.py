"""Pallas (Triton) kernel of paged attention over items, for decode steps and prefill chunks.

Grid (item, KV head, row block, split): the query rows of one KV group are (query, head)
pairs, ``row = query * g + head``; a program takes a block of rows (for a decode step, the
whole GQA group padded to 16 rows for the tensor-core dot) and walks the pages up to its last
row's position, dequantizing KV4 tiles in registers, scores and the online softmax in fp32.
Channels d and d + D/2 are handled as two halves (the KV4 nibble pairing), so nothing is
concatenated in-kernel. A long decode context can be split along its pages; the split of a
sequence depends on its own length and the fixed ``splits`` only, and the partials are
combined in a fixed order, so a row's result never depends on the rest of the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import fixed_order_sum, next_power_of_2
from pallas_kernels.paged_attention.xla import check_inputs

_NEG_INF = float("-inf")




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
    check_inputs(q, k_pool, page_table, start, kv_lens)
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


