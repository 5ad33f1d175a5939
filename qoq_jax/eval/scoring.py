"""Teacher-forced log-probabilities through a serving engine (what perplexity is made of).

Windows run through the engine's own pools, kernels and chunked prefill (the runner's ``score``
verb over ragged batches), attending to K/V as the cache stores them (KV4: quantized), exactly as
generation does. Uses only the engine's public parts: its runner, allocator and limits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qoq_jax.kv_cache import SCRATCH_PAGE
from qoq_jax.model import TokenBatch

# all-position logits of one batch are [tokens, vocab] floats: keep them about this size
LOGITS_BYTES = 1 << 28


def score(engine, windows: np.ndarray, *, progress: Callable[[int], None] | None = None
          ) -> np.ndarray:
    """Log-probability of each next token of each window [N, T] -> [N, T - 1] (float32).

    The engine must be idle (no running requests): windows borrow its pages while they run."""
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {windows.shape}")
    if engine.has_work:
        raise RuntimeError("scoring needs an idle engine (requests are running)")
    n, t = windows.shape
    if t > engine.max_context:
        raise ValueError(f"windows of {t} tokens exceed the engine's context of "
                         f"{engine.max_context}")
    runner, allocator = engine.runner, engine.allocator
    runner.allocate()
    chunk = engine.prefill_chunk
    vocab = engine.model_config.vocab_size
    per_window = allocator.pages_for(t)
    batch = max(1, min((allocator.num_free) // per_window, n, engine.max_slots,
                       LOGITS_BYTES // (4 * chunk * vocab) or 1))
    out = np.zeros((n, t - 1), np.float32)
    for lo in range(0, n, batch):
        rows = windows[lo:lo + batch]
        b = len(rows)
        owners = [-1 - i for i in range(b)]  # never a request id
        try:
            table = np.full((b, engine.max_pages_per_seq), SCRATCH_PAGE, np.int32)
            for i, owner in enumerate(owners):
                pages = allocator.ensure(owner, t)
                table[i, :len(pages)] = pages
            for c0 in range(0, t, chunk):
                c = min(chunk, t - c0)
                lp = runner.score(*_chunk_batch(rows, table, c0, c))
                lp = np.asarray(lp)[:b * c].reshape(b, c)
                keep = min(c, t - 1 - c0)  # the last token of a window predicts nothing
                out[lo:lo + b, c0:c0 + keep] = lp[:, :keep]
        finally:
            for owner in owners:
                if owner in allocator.owners:
                    allocator.free(owner)
        if progress is not None:
            progress(b)
    return out


def _bucket(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _chunk_batch(rows: np.ndarray, table: np.ndarray, c0: int, c: int):
    """(TokenBatch, targets) of tokens [c0, c0 + c) of every window, laid out window after
    window on a flat axis padded to a power of two."""
    b, t = rows.shape
    total = _bucket(b * c)
    tokens = np.zeros((total,), np.int32)
    targets = np.full((total,), -1, np.int32)
    seq = np.full((total,), -1, np.int32)
    positions = np.zeros((total,), np.int32)
    for i in range(b):
        sl = slice(i * c, (i + 1) * c)
        tokens[sl] = rows[i, c0:c0 + c]
        nxt = rows[i, c0 + 1:c0 + c + 1]
        targets[i * c:i * c + len(nxt)] = nxt
        seq[sl] = i
        positions[sl] = c0 + np.arange(c)
    s = b
    batch = TokenBatch(tokens=tokens, positions=positions, token_seq=seq,
                       q_start=np.arange(s, dtype=np.int32) * c,
                       q_len=np.full((s,), c, np.int32),
                       kv_len=np.full((s,), c0 + c, np.int32), page_table=table)
    return batch, targets
