"""Decode attention: our KV4 kernel vs our 16-bit-cache kernel vs jax's own Pallas paged
attention (bf16), side by side on one GPU.

Batch 64, contexts 1k..16k, Llama-3-8B heads (32 query, 8 KV, head_dim 128), one layer's pool,
random data, shuffled page tables. Achieved bandwidth counts the bytes each kernel must read
(K and V pages, plus KV4's fp16 scales and zeros). Then the engine's ragged step as the model
calls it (ragged_paged_attention, items of PREFILL_BLOCK_Q queries): `batch` decode rows at 4k
context and one 1024-token prompt chunk in one call. A page-size sweep at 4k picks the default
(not with --quick).

    PYTHONPATH=. python benchmarks/attention.py [--quick]
    .venv/bin/python benchmarks/attention.py --smoke     # CPU: batch 2, short contexts, interpret
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import header, save, time_fn  # noqa: E402

from pallas_kernels.paged_attention import (default_splits, paged_attention,  # noqa: E402
                                            ragged_layout, ragged_paged_attention)

HQ, HKV, D = 32, 8, 128


def setup(batch, ctx, page, seed=0):
    rng = np.random.default_rng(seed)
    per = ctx // page
    n_pages = 1 + batch * per
    table = (1 + rng.permutation(batch * per)).reshape(batch, per).astype(np.int32)
    key = jax.random.key(seed)
    kq = jax.random.randint(key, (1, n_pages, HKV, page, D // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    vq = jax.random.randint(jax.random.fold_in(key, 1), kq.shape, 0, 256, jnp.int32).astype(jnp.uint8)
    st = [jax.random.uniform(jax.random.fold_in(key, 2 + i), kq.shape[:-1], jnp.float32, 0.01, 0.1
                             ).astype(jnp.float16) for i in range(4)]
    q = jax.random.normal(jax.random.fold_in(key, 9), (batch, 1, HQ, D), jnp.bfloat16)
    return q, kq, vq, st, jnp.asarray(table), jnp.full((batch,), ctx, jnp.int32)


def ragged_step(table, ctx, chunk, block_q, seed=0):
    """A ragged step's queries and layout: one decode row per row of `table` (at position
    ctx - 1) and then one prompt chunk of `chunk` tokens (positions 0.., a new sequence)."""
    rows = table.shape[0]
    seqs = rows + 1
    q_start = jnp.arange(seqs, dtype=jnp.int32)
    q_len = jnp.concatenate([jnp.ones((rows,), jnp.int32), jnp.array([chunk], jnp.int32)])
    q_pos0 = jnp.concatenate([jnp.full((rows,), ctx - 1, jnp.int32), jnp.zeros((1,), jnp.int32)])
    kv_len = jnp.concatenate([jnp.full((rows,), ctx, jnp.int32), jnp.array([chunk], jnp.int32)])
    pages = jnp.concatenate([table, table[:1]])  # the chunk's keys: any pages of the pool
    t = rows + chunk
    layout = ragged_layout(q_start, q_len, q_pos0, kv_len, pages, num_tokens=t, block_q=block_q)
    q = jax.random.normal(jax.random.key(seed + 11), (t, HQ, D), jnp.bfloat16)
    return q, layout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode (CPU)")
    args = ap.parse_args(argv)
    batch, ctxs, iters, kernel = 64, [1024, 2048, 4096, 8192, 16384], 20, dict(backend="pallas")
    if args.quick:
        ctxs, iters = [1024, 4096, 16384], 10
    if args.smoke:  # a context >= 4k, which the summary's target reads
        batch, ctxs, iters, kernel = 2, [256, 4096], 1, dict(interpret=True)
    page = 64 if not args.smoke else 16
    ragged_ctx, chunk = (4096, 1024) if not args.smoke else (256, 32)

    # splits as an engine with `batch` slots and a 32k-token context would fix them
    splits = default_splits(32768 // page, batch, HKV)

    def ours(q, k, v, t, n, s=None):  # a decode step: one query at position n - 1
        return paged_attention(q, k, v, 0, t, n - 1, n, kv4_scales=s, splits=splits, **kernel)

    kv4 = jax.jit(lambda q, k, v, t, n, s: ours(q, k, v, t, n, s))
    b16 = jax.jit(lambda q, k, v, t, n: ours(q, k, v, t, n))
    theirs = None
    if not args.smoke:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu import paged_attention as jpa
        theirs = jax.jit(lambda q, k, v, t, n: jpa.paged_attention(q[:, 0], k, v, t, n,
                                                                   pages_per_compute_block=4))
    rows = []
    print("| ctx | KV4 us | bf16 us | jax bf16 us | bf16/KV4 | KV4 GB/s | bf16 GB/s |")
    print("|---|---|---|---|---|---|---|")
    for ctx in ctxs:
        q, kq, vq, st, table, lens = setup(batch, ctx, page)
        k16 = jax.random.normal(jax.random.key(3), kq.shape[:-1] + (D,), jnp.bfloat16)
        v16 = jax.random.normal(jax.random.key(4), k16.shape, jnp.bfloat16)
        t4 = time_fn(kv4, [(q, kq, vq, table, lens, tuple(st))], iters)
        t16 = time_fn(b16, [(q, k16, v16, table, lens)], iters)
        tj = float("nan")
        if theirs is not None:
            kh, vh = jnp.moveaxis(k16[0], 1, 0), jnp.moveaxis(v16[0], 1, 0)  # [Hkv, N, P, D]
            try:
                tj = time_fn(theirs, [(q, kh, vh, table, lens)], iters)
            except Exception as e:  # noqa: BLE001 - report, keep measuring ours
                print(f"jax paged_attention failed at ctx {ctx}: {type(e).__name__}: {e}"[:300])
            del kh, vh
        bytes4 = batch * ctx * HKV * 2 * (D // 2 + 4)
        bytes16 = batch * ctx * HKV * 2 * D * 2
        rows.append(dict(ctx=ctx, kv4_us=t4 * 1e6, bf16_us=t16 * 1e6, jax_bf16_us=tj * 1e6,
                         kv4_GBps=bytes4 / t4 / 1e9, bf16_GBps=bytes16 / t16 / 1e9))
        print(f"| {ctx} | {t4 * 1e6:.0f} | {t16 * 1e6:.0f} | {tj * 1e6:.0f} | {t16 / t4:.2f}x | "
              f"{bytes4 / t4 / 1e9:.0f} | {bytes16 / t16 / 1e9:.0f} |", flush=True)
        del k16, v16, kq, vq
    from qoq_jax.model import PREFILL_BLOCK_Q

    print(f"ragged step (the engine's prefill program): {batch} decode rows at ctx {ragged_ctx} "
          f"+ one {chunk}-token chunk, items of {PREFILL_BLOCK_Q} queries:", end=" ")
    q, kq, vq, st, table, _ = setup(batch, ragged_ctx, page)
    qr, layout = ragged_step(table, ragged_ctx, chunk, PREFILL_BLOCK_Q)
    k16 = jax.random.normal(jax.random.key(3), kq.shape[:-1] + (D,), jnp.bfloat16)
    v16 = jax.random.normal(jax.random.key(4), k16.shape, jnp.bfloat16)
    r4 = jax.jit(lambda q, k, v, lay, s: ragged_paged_attention(q, k, v, 0, lay, kv4_scales=s,
                                                                splits=splits, **kernel))
    r16 = jax.jit(lambda q, k, v, lay: ragged_paged_attention(q, k, v, 0, lay, splits=splits,
                                                              **kernel))
    t4 = time_fn(r4, [(qr, kq, vq, layout, tuple(st))], iters)
    t16 = time_fn(r16, [(qr, k16, v16, layout)], iters)
    ragged = dict(rows=batch, ctx=ragged_ctx, chunk=chunk, block_q=PREFILL_BLOCK_Q,
                  kv4_us=t4 * 1e6, bf16_us=t16 * 1e6)
    print(f"KV4 {t4 * 1e6:.0f} us, bf16 {t16 * 1e6:.0f} us ({t16 / t4:.2f}x)", flush=True)
    del k16, v16, kq, vq
    sweep = []
    if not args.smoke and not args.quick:
        print("page-size sweep, KV4, ctx 4096:", end=" ")
        for p in (16, 32, 64, 128):
            q, kq, vq, st, table, lens = setup(batch, 4096, p)
            t = time_fn(kv4, [(q, kq, vq, table, lens, tuple(st))], iters)
            sweep.append(dict(page=p, kv4_us=t * 1e6))
            print(f"{p}: {t * 1e6:.0f} us", end="; ", flush=True)
        print()
    save("attention", {**header(), "batch": batch, "page": page, "splits": splits, "rows": rows,
                       "ragged_step": ragged, "sweep": sweep})


if __name__ == "__main__":
    main()
