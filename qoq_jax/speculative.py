"""Speculative decoding's proposals: what a proposer is asked (``ProposalRequest``), n-gram
(prompt lookup) proposals from a sequence's own tokens, and the engine's acceptance statistics.
Draft-model proposals (a second, smaller model) live in qoq_jax/draft.py.

A decoding sequence's last ``n`` tokens (``ngram_max`` down to ``ngram_min``) are looked up in
its earlier tokens (prompt and output); the tokens that followed the most recent earlier
occurrence of the longest n-gram that occurs are proposed, up to ``k`` (a match fewer than k
tokens back is continued periodically: a repetition proposes its own continuation). The
target model then verifies the proposals in one ragged step (qoq_jax/runner.py): every
proposed position is scored, and the sequence keeps the tokens the target itself samples
there for as long as they equal the proposals, plus the target's next token. Because the
kept tokens are the target's own choices at every index (greedy: the argmax; sampling: the
draw of its (seed, index) key), the output is identical with and without speculation; only
the number of forward passes changes.

Plain Python and NumPy, no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SPECULATIVE_KINDS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class ProposalRequest:
    """One decoding sequence's ask for proposals (the scheduler makes these; a proposer
    answers all of an iteration's at once, so a draft model runs them as one batch)."""

    seq_id: int
    slot: int  # its decode slot (a draft model keeps its own state in the same row)
    tokens: Sequence[int]  # prompt + output, every token read back
    k: int  # the most tokens to propose (already capped by its budget and the step's)


@dataclasses.dataclass(frozen=True)
class NgramProposer:
    """Prompt-lookup proposals (see the module docstring)."""

    k: int  # the most tokens proposed per step
    ngram_max: int = 4
    ngram_min: int = 2

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.k}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and "
                             f"{self.ngram_max}")

    def propose(self, tokens, k: int | None = None) -> list[int]:
        """Up to k (default self.k) tokens following the most recent earlier occurrence of the
        longest suffix n-gram of `tokens` (ngram_max down to ngram_min); [] if none occurs."""
        k = self.k if k is None else min(k, self.k)
        n_tok = len(tokens)
        if k <= 0 or n_tok <= self.ngram_min:
            return []
        arr = np.asarray(tokens, np.int64)
        for n in range(min(self.ngram_max, n_tok - 1), self.ngram_min - 1, -1):
            # windows starting at i < n_tok - n (an earlier occurrence, followed by >= 1 token)
            hay = arr[:n_tok - 1]
            if len(hay) < n:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(hay, n)
            hits = np.flatnonzero(np.all(windows == arr[n_tok - n:], axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                out = arr[start:start + k].tolist()
                # a match closer than k tokens back continues as the repetition it is part of
                period = n_tok - start
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []

    def propose_many(self, requests: Sequence[ProposalRequest]) -> list[list[int]]:
        """Proposals for each request, in order (each independent: a lookup in its tokens)."""
        return [self.propose(r.tokens, r.k) for r in requests]

    def release(self, seq_id: int) -> None:
        """A sequence left its slot (finished or preempted): n-gram proposals keep no state."""

    def reset(self) -> None:
        """Forget every sequence (after an internal error)."""


class SpeculativeStats:
    """Proposed and accepted tokens, in total and by position (0: the first proposed token)."""

    def __init__(self, k: int):
        self.k = k
        self.steps = 0  # verification rows (a sequence's proposals checked once)
        self.proposed = np.zeros((k,), np.int64)
        self.accepted = np.zeros((k,), np.int64)

    def record(self, proposed: int, accepted: int) -> None:
        self.steps += 1
        self.proposed[:proposed] += 1
        self.accepted[:accepted] += 1

    def as_dict(self) -> dict:
        p, a = int(self.proposed.sum()), int(self.accepted.sum())
        return {"verify_rows": self.steps, "proposed": p, "accepted": a,
                "acceptance_rate": a / p if p else 0.0,
                "proposed_per_position": self.proposed.tolist(),
                "accepted_per_position": self.accepted.tolist(),
                "acceptance_rate_per_position": [
                    float(x / y) if y else 0.0 for x, y in zip(self.accepted, self.proposed)]}
