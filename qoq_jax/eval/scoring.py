"""Teacher-forced log-probabilities through a serving engine (what perplexity is made of).

Windows run through the engine's own pools, kernels and chunked prefill (the runner's ``score``
verb over ragged batches), attending to K/V as the cache stores them (KV4: quantized), exactly as
generation does. Uses only the engine's public parts: its runner, allocator and limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

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
                lp = runner.score(*_chunk_batch(rows, table, c0, c)).logprob
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


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """Of each token of a prompt given the tokens before it: its log-probability (None for the
    first token, which nothing predicts) and the n most likely tokens at its place, as
    (id, log-probability) pairs (empty for the first)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


def prompt_logprobs(engine, token_ids: Sequence[int], n_top: int = 0) -> PromptLogprobs:
    """Teacher-forced log-probabilities of one prompt (what OpenAI's `echo` with `logprobs`
    and vLLM's `prompt_logprobs` report), through the engine's score program.

    Unlike score(), it does not need an idle engine: call it from the thread that steps the
    engine, between steps (Engine does, for submit_prompt_logprobs). Its pages are borrowed
    from the free ones and returned; QueueFullError if too few are free now."""
    from qoq_jax.errors import ContextLengthError, QueueFullError
    from qoq_jax.pages import OutOfPagesError

    ids = np.asarray(token_ids, np.int32)
    t = len(ids)
    if t == 0:
        raise ValueError("the prompt is empty")
    if t > engine.max_context:
        raise ContextLengthError(f"the prompt has {t} tokens, more than the engine's context "
                                 f"of {engine.max_context}")
    runner, allocator = engine.runner, engine.allocator
    runner.allocate()
    owner = -1 - (1 << 40)  # never a request id, nor one of score()'s owners
    try:
        pages = allocator.ensure(owner, t)
    except OutOfPagesError:
        raise QueueFullError(f"too few free KV-cache pages to score {t} prompt tokens now; "
                             f"try again later") from None
    logprobs: list[float | None] = [None]
    top: list[list[tuple[int, float]]] = [[]]
    try:
        table = np.full((1, engine.max_pages_per_seq), SCRATCH_PAGE, np.int32)
        table[0, :len(pages)] = pages
        chunk = max(16, min(engine.prefill_chunk, LOGITS_BYTES // (4 * engine.model_config.vocab_size)))
        for c0 in range(0, t, chunk):
            c = min(chunk, t - c0)
            out = runner.score(*_chunk_batch(ids[None], table, c0, c), n_top=n_top)
            lp, top_ids, top_lp = (np.asarray(a) for a in (out.logprob, out.top_ids,
                                                           out.top_logprobs))
            for j in range(min(c, t - 1 - c0)):  # position j predicts token c0 + j + 1
                logprobs.append(float(lp[j]))
                top.append([(int(i), float(v)) for i, v in zip(top_ids[j], top_lp[j])])
    finally:
        allocator.free(owner)
    return PromptLogprobs([int(x) for x in ids], logprobs, top)
