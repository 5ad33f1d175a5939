"""Draft-model proposals for speculative decoding (``EngineConfig(speculative="draft")``).

A second, smaller model with the target's tokenizer proposes up to k tokens for each decoding
sequence by greedy decoding from KV pages of its own. The QoQ W4A8KV4 copy of the target is
such a draft of the float target: the same vocabulary, and its greedy tokens are mostly the
target's (on a GPU it is also several times cheaper per token).

What it owns: a ``DeviceRunner`` of its own (the draft's compiled programs, KV pools, slot
state and page table) and a ``PageAllocator`` for its pages. A sequence has the same slot row
in the draft as in the target. Per sequence the proposer remembers which tokens its pages
hold K/V for, in order; after the target verified a proposal, the draft's K/V stay valid as
far as the target's tokens agree with what the draft fed (the accepted proposals), so the
next round feeds only what the draft has not seen: usually one or two tokens (the target's own
token after the accepted ones), the whole context the first time (a prompt the draft never
saw: cut into steps under the step budget). Pages are trimmed to the valid tokens, grown for
the round, and freed when the sequence leaves its slot (``release``: finished or preempted).

One round for every asking sequence at once, on the draft's device:
1. a ragged step of catch-up chunks whose final chunk samples the first proposal (greedy);
2. one decode dispatch of up to k - 1 more greedy steps (each row stops at its own k, its
   ``max_new_tokens``).
The proposals are then read back: the scheduler plans the verification step with them.

Proposals are the draft's argmax. The target keeps a proposed token when its own choice at that
index (greedy, or the draw of the request's (seed, index) key) equals it (runner._spec_step):
for a deterministic proposal that is rejection sampling exactly (t accepted with probability
p(t); otherwise a draw from p without t, renormalised), and the output is identical with and
without speculation, whatever the draft proposes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from qoq_jax.pages import SCRATCH_PAGE, OutOfPagesError, PageAllocator
from qoq_jax.runner import DeviceRunner, fetch
from qoq_jax.speculative import ProposalRequest

# a round feeds one or two tokens per sequence, for a few sequences: small step buckets
DRAFT_MIN_STEP_TOKENS = 4


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(diff[0]) if diff.size else n


@dataclasses.dataclass
class _DraftSequence:
    slot: int
    tokens: list[int]  # the tokens whose K/V the draft's pages hold, in order


class DraftProposer:
    """Proposals from a draft model (see the module docstring).

    k: the most tokens proposed per sequence and round; slots: the target's decode slots (the
    same rows here); num_pages / page_size: the draft's KV pool; max_context: the longest
    sequence the target serves (positions past the draft's own context are never proposed
    from); max_batch_tokens: the draft's step budget (a long catch-up is cut to it).
    """

    def __init__(self, model, *, k: int, slots: int, page_size: int, num_pages: int,
                 max_context: int, kv_cache: str = "16bit", max_batch_tokens: int = 512,
                 kernels: str | None = None):
        self.k = k
        self.model_config = model.config
        self.max_context = min(model.config.max_position_embeddings, max_context)
        self.page_size = page_size
        self.max_pages_per_seq = -(-self.max_context // page_size)
        self.runner = DeviceRunner(
            model, kv_cache=kv_cache, num_pages=num_pages, page_size=page_size, slots=slots,
            max_pages_per_seq=self.max_pages_per_seq, max_batch_tokens=max_batch_tokens,
            max_logprobs=0, max_stop_ids=1, max_logit_bias=1, kernels=kernels,
            min_step_tokens=min(DRAFT_MIN_STEP_TOKENS, max_batch_tokens))
        self.num_pages = num_pages
        self.allocator = PageAllocator(num_pages, page_size)
        self._seqs: dict[int, _DraftSequence] = {}
        self._table = np.full((self.runner.slots, self.max_pages_per_seq), SCRATCH_PAGE,
                              np.int32)
        # rounds, catch-up steps, decode dispatches, tokens fed in catch-up steps, sequences
        # that got no proposal for want of draft pages
        self.stats: collections.Counter = collections.Counter()

    # ------------------------------------------------------------------------------------------
    # the proposer interface (qoq_jax.scheduler)

    def propose_many(self, requests: Sequence[ProposalRequest]) -> list[list[int]]:
        """Greedy draft tokens for each request (fewer than its k, or none, where the draft's
        context or pages end), in one round for all of them."""
        out: list[list[int]] = [[] for _ in requests]
        work = []  # (index, request, first token to feed, k)
        for i, r in enumerate(requests):
            n = len(r.tokens)
            # the round writes K/V at positions up to n + k - 2
            k = min(r.k, self.k, self.max_context - n + 1)
            if k <= 0:
                continue
            st = self._seqs.get(r.seq_id)
            if st is None or st.slot != r.slot:
                if st is not None:
                    self.release(r.seq_id)
                st = self._seqs[r.seq_id] = _DraftSequence(r.slot, [])
            # what the pages hold and the target kept; the last token is always fed again:
            # its logits give the first proposal
            known = min(common_prefix(st.tokens, r.tokens), n - 1)
            del st.tokens[known:]
            self.allocator.trim(r.seq_id, known)
            try:
                self.allocator.ensure(r.seq_id, n + k - 1)
            except OutOfPagesError:
                self.stats["no_pages"] += 1
                continue
            work.append((i, r, known, k))
        if not work:
            return out
        self.stats["rounds"] += 1
        self.runner.allocate()
        self._sync_table()
        firsts = self._catch_up(work)
        k_max = max(k for _, _, _, k in work)
        decoded = None
        if k_max > 1:
            rows = self.runner.buckets.decode_rows(1 + max(r.slot for _, r, _, _ in work))
            decoded = self.runner.decode(rows, k_max - 1, np.zeros((self.runner.slots,), bool))
            self.stats["decode_dispatches"] += 1
        fetched = {id(o): fetch(o).token for _, o, _ in firsts}
        first_of = {i: fetched[id(o)][row] for i, o, row in firsts}
        rest = fetch(decoded).token if decoded is not None else None
        for i, r, _, k in work:
            proposal = [int(first_of[i])]
            if rest is not None:
                proposal += [int(t) for t in rest[r.slot, :k - 1]]
            if -1 in proposal:  # non-finite draft logits: propose what came before
                proposal = proposal[:proposal.index(-1)]
            out[i] = proposal
            # the draft fed every proposal but the last (each decode step feeds the one before)
            st = self._seqs[r.seq_id]
            st.tokens = list(r.tokens) + proposal[:-1]
        return out

    def release(self, seq_id: int) -> None:
        """The sequence left its slot (finished or preempted): free its draft pages."""
        if self._seqs.pop(seq_id, None) is not None and seq_id in self.allocator.owners:
            self.allocator.free(seq_id)

    def reset(self) -> None:
        """Forget every sequence and the device state (after an internal error)."""
        self._seqs.clear()
        self.allocator = PageAllocator(self.num_pages, self.page_size)
        self.runner.reset()

    def warmup(self) -> int:
        """Compile the draft's programs ahead of time; returns how many were compiled."""
        return self.runner.warmup()

    # ------------------------------------------------------------------------------------------

    def _sync_table(self) -> None:
        table = self._table
        table[:] = SCRATCH_PAGE
        for sid, st in self._seqs.items():
            pages = self.allocator.pages(sid)
            table[st.slot, :len(pages)] = pages
        self.runner.set_page_table(table)

    def _catch_up(self, work) -> list:
        """Feed each sequence its tokens from `known` on, in ragged steps under the step budget;
        each one's final chunk samples its first proposal. Returns (index, step output, row)
        of those samples (device outputs, copying to the host)."""
        budget = self.runner.buckets.max_tokens
        cursor = {i: known for i, _, known, _ in work}
        firsts = []
        while True:
            rows, total = [], 0
            for i, r, _, k in work:
                left = len(r.tokens) - cursor[i]
                take = min(left, budget - total)
                if left == 0 or take <= 0:
                    continue
                rows.append((i, r, cursor[i], take, k))
                total += take
                cursor[i] += take
            if not rows:
                return firsts
            x = self.runner.empty_inputs(self.runner.buckets.step_tokens(total))
            pos = 0
            for row, (i, r, start, take, k) in enumerate(rows):
                x.slot[row], x.start[row], x.length[row], x.pos0[row] = r.slot, pos, take, start
                x.tokens[pos:pos + take] = r.tokens[start:start + take]
                x.token_seq[pos:pos + take] = row
                pos += take
                if start + take == len(r.tokens):  # the final chunk: the first proposal
                    x.sample[row] = True
                    x.params.max_new[row] = k  # the row's decode steps stop at its k
            out = self.runner.step(x)
            self.stats["steps"] += 1
            self.stats["fed_tokens"] += total
            firsts += [(i, out, row) for row, (i, r, start, take, _) in enumerate(rows)
                       if start + take == len(r.tokens)]
