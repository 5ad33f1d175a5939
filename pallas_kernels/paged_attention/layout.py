"""The ragged batch's attention layout: which query tokens of the flat axis form which work item.

A ragged batch is a flat axis of T query tokens holding S sequences one after the other:
sequence s has ``q_len[s]`` tokens from ``q_start[s]`` on, at positions ``q_pos0[s] + i``, and
``kv_len[s]`` keys in the cache once this batch's K/V are written (its last query's position + 1).
Decode rows are sequences of one token; prefill chunks, of many; both mix freely.

The attention kernels work on *items*: up to ``block_q`` consecutive query tokens of one
sequence. A sequence of n tokens is cut into ceil(n / block_q) items, always from its first
token, so the cut depends on the sequence alone (never on what shares the batch). Items are
laid out sequence by sequence, so the number of items is at most
``min(T, T // block_q + S)``: a static bound (``max_items``) that fixes the kernels' grid. Items
past the real count are empty (no query, no key) and cost one masked block.

Everything here is a handful of integer ops on [S] and [I] arrays, computed once per forward
pass (outside the layer loop) and shared by every layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def max_items(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """The most items a ragged batch of this shape can have (the kernels' static grid size)."""
    return max(1, min(num_tokens, num_tokens // block_q + num_seqs))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedLayout:
    """Where each work item's queries are, and what each may see. All int32, [I] unless said.

    token0: index in the flat axis of the item's first query
    num_q: its real queries (<= block_q; 0 for an empty item)
    pos0: position of its first query (query i sits at pos0 + i)
    kv_len: keys of its sequence in the cache (a query at p sees keys j <= p, j < kv_len)
    page_table: [I, max_pages] its sequence's pages
    block_q: queries per item (static)
    """

    token0: jax.Array
    num_q: jax.Array
    pos0: jax.Array
    kv_len: jax.Array
    page_table: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True), default=1)

    @property
    def num_items(self) -> int:
        return self.token0.shape[0]

    def query_index(self, num_tokens: int) -> tuple[jax.Array, jax.Array]:
        """(flat index [I, block_q] of each item query (clamped into range), valid mask)."""
        i = jnp.arange(self.block_q, dtype=jnp.int32)[None, :]
        valid = i < self.num_q[:, None]
        return jnp.minimum(self.token0[:, None] + i, num_tokens - 1), valid


def ragged_layout(q_start: jax.Array, q_len: jax.Array, q_pos0: jax.Array, kv_len: jax.Array,
                  page_table: jax.Array, *, num_tokens: int, block_q: int) -> RaggedLayout:
    """Items of a ragged batch: sequences [S] (q_start, q_len, q_pos0, kv_len; page_table
    [S, max_pages]) over a flat axis of num_tokens queries, cut into items of block_q."""
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    s = q_len.shape[0]
    n_items = max_items(num_tokens, s, block_q)
    q_len = q_len.astype(jnp.int32)
    blocks = (q_len + block_q - 1) // block_q  # items per sequence
    ends = jnp.cumsum(blocks)  # exclusive end of each sequence's items
    item = jnp.arange(n_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, item, side="right"), s - 1).astype(jnp.int32)
    j = item - (ends[seq] - blocks[seq])  # the item's index within its sequence
    real = item < ends[-1]
    num_q = jnp.where(real, jnp.minimum(block_q, q_len[seq] - j * block_q), 0)
    return RaggedLayout(
        token0=jnp.where(real, q_start[seq] + j * block_q, 0).astype(jnp.int32),
        num_q=num_q.astype(jnp.int32),
        pos0=jnp.where(real, q_pos0[seq] + j * block_q, 0).astype(jnp.int32),
        kv_len=jnp.where(real, kv_len[seq], 0).astype(jnp.int32),
        page_table=page_table[seq].astype(jnp.int32),
        block_q=block_q)


def gather_queries(q: jax.Array, layout: RaggedLayout) -> jax.Array:
    """q [T, Hq, D] -> [I, block_q, Hq, D] (padding queries repeat a real one; masked later)."""
    idx, _ = layout.query_index(q.shape[0])
    return q[idx]


def scatter_outputs(out: jax.Array, layout: RaggedLayout, num_tokens: int) -> jax.Array:
    """Item outputs [I, block_q, Hq, D] -> the flat axis [T, Hq, D]. Every real query belongs
    to exactly one item; tokens no item covers (padding of the flat axis) come out zero."""
    idx, valid = layout.query_index(num_tokens)
    idx = jnp.where(valid, idx, num_tokens)  # out of range: dropped
    flat = jnp.zeros((num_tokens,) + out.shape[2:], out.dtype)
    return flat.at[idx.reshape(-1)].set(out.reshape((-1,) + out.shape[2:]), mode="drop")
