"""XLA reference of paged attention over items (the oracle of the kernels, and the CPU path).

Items (layout.py) are up to Q query tokens of one sequence at positions ``start[b] + i``; each
attends to the cached keys at positions ``j <= start[b] + i`` with ``j < kv_lens[b]``, read
through its row of the page table. The softmax is online over blocks of ``block_tokens`` keys
with a dynamic trip count, so memory is O(Q x block), never O(Q x context). A fully masked
block is an exact no-op (alpha = 1, p = 0), the dots compute a row the same way whatever the
other rows (see paged_attention_xla) and sums use a fixed order, so a row's result is
bit-identical alone or in any batch, in a decode step or a prefill chunk: what makes
generation batch-invariant.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import fixed_order_sum, pair_lone_rows
from pallas_kernels.kv4 import dequantize_kv4

_NEG_INF = float("-inf")

# Keys per step of the online softmax. A constant of the op, not a tuning knob: a query's
# result depends on how its keys are blocked, so every program (decode step, prefill chunk,
# scoring) must use the same value for a request's tokens to come out the same way.
BLOCK_TOKENS = 128


def check_inputs(q, k_pool, page_table, start, kv_lens):
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




def _block_pages(page_size: int, block_tokens: int) -> int:
    return max(1, block_tokens // page_size)


def paged_attention_xla(q, k_pool, v_pool, layer, page_table, start, kv_lens, *, scale=None,
                        kv4_scales=None, block_tokens: int = BLOCK_TOKENS):
    """q [B, Q, Hq, D]; 16-bit pools [L, N, Hkv, P, D], or KV4 codes with
    kv4_scales = (k_scale, k_zero, v_scale, v_zero); -> [B, Q, Hq, D] in q's dtype.

    Rows are the (query, head) pairs of a KV group, as in the kernel; every dot is batched over
    (sequence, KV head) with the rows as its M dimension. XLA:CPU computes a row of such a dot
    the same way for any number of rows >= 2 (a single row takes a matrix-vector kernel), so a
    lone row is padded with a copy of itself.
    """
    check_inputs(q, k_pool, page_table, start, kv_lens)
    b, nq, hq, d = q.shape
    hkv, page_size = k_pool.shape[2], k_pool.shape[3]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    n_rows = nq * g
    qr = q.reshape(b, nq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, n_rows, d)
    qr = pair_lone_rows(qr, axis=2)
    rows = qr.shape[2]
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


