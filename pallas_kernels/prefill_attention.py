"""Causal attention over the 16-bit q/k/v of a batch of prompts (prefill).

As in QServe, prefill attends over the fresh, unquantized q/k/v of the prompt; the paged cache is
written (by the KV write) but not read here. Prompts of different lengths share one padded batch:
query i of sequence b sees keys j <= i with j < lengths[b].

Kernel (Pallas, Triton backend): flash attention, grid (B, Hq, T / block_q); each program keeps
one block of queries in registers and walks the key blocks up to the causal limit (and the
prompt's length), with an fp32 online softmax. GQA: query head h reads KV head h // (Hq / Hkv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import use_pallas


def prefill_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                          *, scale: float | None = None) -> jax.Array:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D], lengths [B] -> [B, T, Hq, D] (dtype of q)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    qi = jnp.arange(t)[:, None]
    kj = jnp.arange(t)[None, :]
    mask = (kj <= qi)[None] & (kj[None] < lengths[:, None, None])  # [B, T, T]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def _flash_kernel(q_ref, k_ref, v_ref, len_ref, o_ref, *, block_k: int, sm_scale: float):
    block_q = q_ref.shape[0]
    qi = pl.program_id(2)
    length = len_ref[0]
    q = q_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)
    # keys past the last query of this block, or past the prompt, are never needed
    n_blocks = pl.cdiv(jnp.minimum((qi + 1) * block_q, length), block_k)

    def body(j, carry):
        o, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * sm_scale
        k_pos = j * block_k + jnp.arange(block_k)
        ok = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < length)
        s = jnp.where(ok, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing seen yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = l * alpha + p.sum(axis=1)
        o = o * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l

    d = q.shape[1]
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    o, _, l = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def prefill_attention_pallas(q, k, v, lengths, *, scale=None, block_q: int = 64,
                             block_k: int = 64, num_warps: int = 4, interpret: bool = False):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    block_q, block_k = min(block_q, t), min(block_k, t)
    if t % block_q or t % block_k:
        raise ValueError(f"prompt length bucket T={t} must be a multiple of the blocks "
                         f"({block_q}, {block_k})")
    kernel = functools.partial(_flash_kernel, block_k=block_k,
                               sm_scale=d ** -0.5 if scale is None else scale)
    kv_spec = pl.BlockSpec((None, t, None, d), lambda i, h, j: (i, 0, h // g, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, hq, t // block_q),
        in_specs=[pl.BlockSpec((None, block_q, None, d), lambda i, h, j: (i, j, h, 0)),
                  kv_spec, kv_spec, pl.BlockSpec((1,), lambda i, h, j: (i,))],
        out_specs=pl.BlockSpec((None, block_q, None, d), lambda i, h, j: (i, j, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="prefill_attention",
    )(q, k, v, lengths.astype(jnp.int32))


def prefill_attention(q, k, v, lengths, *, scale=None, backend: str = "auto",
                      interpret: bool = False) -> jax.Array:
    """Public entry point (see the module docstring)."""
    if use_pallas(backend, interpret):
        return prefill_attention_pallas(q, k, v, lengths, scale=scale, interpret=interpret)
    return prefill_attention_xla(q, k, v, lengths, scale=scale)
