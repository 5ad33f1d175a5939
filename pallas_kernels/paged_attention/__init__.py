"""Attention over a paged KV cache (16-bit or KV4) for ragged batches: decode rows, prefill
chunks and any mix of them in one call.

Sequence s owns pages ``page_table[s, :]`` (int32) of every layer's pool (``[L, num_pages, Hkv,
page_size, D]`` for 16 bits; the KV4 layout is in kv4.py); the layer index is an input, so no
per-layer copy of a pool is ever made. The K/V of the tokens being processed are written to
the cache before attention reads it, so every query sees keys exactly as the cache stores them
(KV4: quantized), in prefill as in decode, and a long prompt's later chunks see the pages its
earlier chunks wrote: prefill memory is bounded by the chunk, not the prompt.

Entry points:
- ``ragged_paged_attention(q, k_pool, v_pool, layer, layout)``: q [T, Hq, D], the flat token
  axis of a ragged batch; ``layout`` (layout.py, built once per forward pass) cuts it into
  items of up to ``block_q`` queries of one sequence each. What the model calls.
- ``paged_attention(q, k_pool, v_pool, layer, page_table, start, kv_lens)``: the same
  attention over items already laid out as q [I, Q, Hq, D] (the building block, and the
  kernels' test surface).

Backends, one file each (the openxla/tokamax layout): ``xla.py`` (the blocked reference:
the oracle, and the CPU path) and ``triton.py`` (the Pallas kernel). ``backend="auto"`` is the
kernel on a GPU, the reference elsewhere; ``interpret=True`` runs the kernel on CPU.
"""

from __future__ import annotations

import jax

from pallas_kernels._common import use_pallas
from pallas_kernels.paged_attention.layout import (RaggedLayout, gather_queries, max_items,
                                                   ragged_layout, scatter_outputs)
from pallas_kernels.paged_attention.triton import default_splits, paged_attention_pallas
from pallas_kernels.paged_attention.xla import BLOCK_TOKENS, paged_attention_xla

__all__ = ["BLOCK_TOKENS", "RaggedLayout", "default_splits", "max_items", "paged_attention",
           "paged_attention_pallas", "paged_attention_xla", "ragged_layout",
           "ragged_paged_attention"]


def paged_attention(q, k_pool, v_pool, layer, page_table, start, kv_lens, *, scale=None,
                    kv4_scales=None, splits: int = 1, backend: str = "auto",
                    interpret: bool = False) -> jax.Array:
    """Attention of items q [I, Q, Hq, D] at positions start[i] + j over their pages.

    16-bit pools, or KV4 pools with kv4_scales=(ks, kz, vs, vz); page_table [I, max_pages]
    int32; start, kv_lens [I] int32. ``splits`` splits long decode contexts on a GPU (the XLA
    path ignores it).
    """
    if use_pallas(backend, interpret):
        return paged_attention_pallas(q, k_pool, v_pool, layer, page_table, start, kv_lens,
                                      scale=scale, kv4_scales=kv4_scales, splits=splits,
                                      interpret=interpret)
    return paged_attention_xla(q, k_pool, v_pool, layer, page_table, start, kv_lens,
                               scale=scale, kv4_scales=kv4_scales)


def ragged_paged_attention(q, k_pool, v_pool, layer, layout: RaggedLayout, *, scale=None,
                           kv4_scales=None, splits: int = 1, backend: str = "auto",
                           interpret: bool = False) -> jax.Array:
    """q [T, Hq, D] (a ragged batch's flat token axis) -> [T, Hq, D]: each query attends to
    its sequence's cached keys up to its own position (see the module docstring)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {q.shape}")
    items = gather_queries(q, layout)
    out = paged_attention(items, k_pool, v_pool, layer, layout.page_table, layout.pos0,
                          layout.kv_len, scale=scale, kv4_scales=kv4_scales, splits=splits,
                          backend=backend, interpret=interpret)
    return scatter_outputs(out, layout, q.shape[0])
