"""Speculative decoding (n-gram proposals, verified in ragged steps): the proposer, and that the
engine's output is the same with and without it (greedy and seeded sampling, logprobs,
penalties, stop ids, max_new_tokens, the KV4 cache, preemption), that rejected positions'
pages are freed, and the statistics. Tiny random models here; the real default model in the
slow tests at the end."""

import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tiny_checkpoint

from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.model import from_hf_weights
from qoq_jax.pages import PageAllocator
from qoq_jax.sampling import SamplingParams
from qoq_jax.scheduler import Scheduler, Sequence, Status
from qoq_jax.speculative import NgramProposer

# ----------------------------------------------------------------------------------------------
# the proposer (no JAX)


def test_ngram_proposes_what_followed_the_longest_most_recent_match():
    p = NgramProposer(k=3, ngram_max=3, ngram_min=1)
    # the 3-gram [1, 2, 3] occurred at 0 (followed by 4 5 6) and at 6 (followed by 9 9):
    # the most recent wins
    assert p.propose([1, 2, 3, 4, 5, 6, 1, 2, 3, 9, 9, 7, 1, 2, 3]) == [9, 9, 7]
    # only a 1-gram matches: [5] -> what followed the last 5
    assert p.propose([5, 8, 1, 5]) == [8, 1, 5]
    assert p.propose([1, 2, 3, 4]) == []  # nothing recurs
    assert p.propose([1, 2, 1, 2], k=1) == [1]  # a budget cap
    # a match closer than k back continues periodically
    assert p.propose([4, 7, 7, 7]) == [7, 7, 7]
    assert NgramProposer(k=5, ngram_max=2, ngram_min=2).propose([3, 1, 2, 1, 2]) == [1, 2, 1, 2, 1]
    # ngram_min: a 1-gram is not enough
    assert NgramProposer(k=2, ngram_max=3, ngram_min=2).propose([5, 8, 1, 5]) == []
    with pytest.raises(ValueError):
        NgramProposer(k=0)
    with pytest.raises(ValueError):
        NgramProposer(k=2, ngram_max=1, ngram_min=2)


def test_a_sequence_near_its_budget_proposes_fewer():
    """The scheduler caps each proposal at what the sequence may still make (minus the token
    its own step makes), and gives it pages for them."""
    alloc = PageAllocator(64, 4)
    sched = Scheduler(alloc, max_slots=4, max_batch_tokens=64, prefill_chunk=64, decode_steps=4,
                      proposer=NgramProposer(k=6, ngram_max=2, ngram_min=1))
    seqs = [Sequence(i, [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_new_tokens=n))
            for i, n in enumerate((20, 3, 1))]
    for s in seqs:
        sched.add(s)
    sched.schedule()  # admitted and prefilled: now decoding
    for s in seqs:
        s.output.append(3)  # the first token, read back
    plan = sched.schedule()
    assert plan.ragged and [len(plan.proposals.get(s.seq_id, [])) for s in seqs] == [6, 1, 0]
    assert plan.proposals[0] == [1, 2, 3, 1, 2, 3]
    for s in seqs[:2]:  # pages for the last token and the proposals
        assert len(alloc.pages(s.seq_id)) * 4 >= s.kv_tokens + len(plan.proposals[s.seq_id])
    # two of six kept: the sequence moves on by 1 + 2 positions, the rest's pages are freed
    sched.on_tokens(seqs[0], [1, 2, 5])
    sched.on_verified(seqs[0], 2)
    assert seqs[0].kv_tokens == len(seqs[0].prompt) + 3
    assert len(alloc.pages(0)) == alloc.pages_for(seqs[0].kv_tokens)
    assert seqs[0].status == Status.DECODING
    # speculative_max_batch: no proposals while more sequences than that decode
    sched.speculative_max_batch = 2
    for s in seqs:
        s.output.append(3)
    assert not sched.schedule().proposals


# ----------------------------------------------------------------------------------------------
# the engine on a tiny model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "qwen2", "qwen2", seed=3)
    return from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)


KW = {"page_size": 8, "decode_steps": 4, "max_slots": 8, "prefill_chunk": 32, "num_pages": 160}


class FlakyProposer(NgramProposer):
    """n-gram proposals with every third proposal replaced by a wrong token (on the tiny
    model's loops nearly everything is accepted; this exercises rejection at every position)."""

    def propose(self, tokens, k=None):
        out = super().propose(tokens, k)
        return [(t + 1) % 100 if (len(tokens) + i) % 3 == 0 else t for i, t in enumerate(out)]


def _spec_engine(model, flaky=True, **kw):
    kw = {"speculative_max_batch": 0, **kw}  # speculate in full batches too
    eng = Engine(model, **{**KW, **kw}, speculative="ngram", num_speculative_tokens=3,
                 ngram_min=1)
    if flaky:
        eng.scheduler.proposer = FlakyProposer(3, 4, 1)
    return eng


@pytest.fixture(scope="module")
def base(model):
    return Engine(model, **KW)


@pytest.fixture(scope="module")
def spec(model):
    return _spec_engine(model)


def _prompts(n, seed=0):
    """Prompts that repeat a short pattern (so there is something to look up), and random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(rng.integers(3, 100, int(rng.integers(2, 30))).tolist())
        else:
            pat = rng.integers(3, 100, int(rng.integers(2, 7))).tolist()
            out.append((pat * 8)[:int(rng.integers(4, 40))])
    return out


SAMPLED = SamplingParams(max_new_tokens=18, stop_token_ids=(), temperature=0.9, seed=7,
                         top_k=20, logprobs=2)
PROCESSED = SamplingParams(max_new_tokens=18, stop_token_ids=(4, 9), temperature=0.7, seed=1,
                           repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                           min_tokens=5, logit_bias=((5, 3.0), (11, -2.0)))


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=20, stop_token_ids=()), SAMPLED, PROCESSED,
    SamplingParams(max_new_tokens=20, stop_token_ids=(), repetition_penalty=1.5,
                   frequency_penalty=0.5)], ids=["greedy", "sampled", "processed", "penalised"])
def test_output_is_the_same_with_and_without_speculation(base, spec, params):
    """A batch of more prompts than slots (varied budgets): every request's tokens (and
    logprobs) are those of an engine without speculation, also alone; proposals were made and
    some rejected."""
    prompts = _prompts(11)
    plist = [dataclasses.replace(params, max_new_tokens=params.max_new_tokens - i % 4,
                                 min_tokens=min(params.min_tokens, params.max_new_tokens - 3))
             for i in range(len(prompts))]
    before = spec.speculative_stats
    want = base.generate(prompts, plist)
    got = spec.generate(prompts, plist)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.tokens == w.tokens, i
        assert g.finish_reason == w.finish_reason
        if params.logprobs is not None:
            assert [e["token"] for e in g.logprobs] == g.tokens
            np.testing.assert_allclose([e["logprob"] for e in g.logprobs],
                                       [e["logprob"] for e in w.logprobs], atol=1e-5)
            assert [[t for t, _ in e["top"]] for e in g.logprobs] == [
                [t for t, _ in e["top"]] for e in w.logprobs]
    assert spec.generate([prompts[0]], plist[0])[0].tokens == want[0].tokens
    after = spec.speculative_stats
    proposed = after["proposed"] - before["proposed"]
    accepted = after["accepted"] - before["accepted"]
    assert proposed > 0 and 0 < accepted < proposed
    assert spec.allocator.num_used == 0  # every page back (rejected positions' included)


def test_stats_by_position(spec):
    st = spec.speculative_stats
    assert st["kind"] == "ngram" and st["num_speculative_tokens"] == 3
    assert len(st["acceptance_rate_per_position"]) == 3
    assert st["proposed_per_position"][0] == st["verify_rows"]
    assert all(a <= p for a, p in zip(st["accepted_per_position"], st["proposed_per_position"]))
    assert st["proposed_per_position"] == sorted(st["proposed_per_position"], reverse=True)


def test_metrics_report_proposals_and_acceptance_by_position(spec):
    """/metrics (server/metrics.py) reads the engine's speculative counters."""
    from qoq_jax.server.metrics import Metrics

    spec.generate(_prompts(3), SamplingParams(max_new_tokens=12, stop_token_ids=()))
    st = spec.speculative_stats
    assert st["proposed"] > 0
    text, _ = Metrics(spec).render()
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
              if ln.startswith("qoq_spec")}
    assert values["qoq_spec_proposed_tokens"] == st["proposed"]
    assert values["qoq_spec_accepted_tokens"] == st["accepted"]
    assert values["qoq_spec_acceptance_rate"] == pytest.approx(st["acceptance_rate"])
    for i, rate in enumerate(st["acceptance_rate_per_position"]):
        assert values[f'qoq_spec_acceptance_rate_by_position{{position="{i}"}}'] == (
            pytest.approx(rate))


def test_kv4_and_preemption(model):
    """The KV4 cache, and a pool too small for the load (preemptions, page trims): the same
    tokens as without speculation, and every page back at the end."""
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    small = {"num_pages": 10, "kv_cache": "kv4", "max_slots": 4}
    want = Engine(model, **{**KW, **small}).generate(prompts, params)
    eng = _spec_engine(model, **small, prefix_caching=False)
    got = eng.generate(prompts, params)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert eng.stats["preemptions"] > 0 and eng.speculative_stats["accepted"] > 0
    assert eng.allocator.num_free == eng.num_pages - 1


def test_speculative_engine_programs(model):
    """A speculative engine compiles its step buckets (from 8 tokens) and the decode
    dispatches, nothing else, and bad settings are refused."""
    eng = _spec_engine(model, flaky=False)
    shapes = eng.program_shapes()
    assert shapes["step"][0] == 8
    eng.generate(_prompts(5, seed=9), SamplingParams(max_new_tokens=12, stop_token_ids=()))
    assert set(eng.runner.compiled_programs) <= {f"step/{t}" for t in shapes["step"]} | {
        f"decode/{r}" for r in shapes["decode"]}
    for bad in ({"speculative": "eagle"}, {"speculative": "ngram", "num_speculative_tokens": 0},
                {"speculative": "ngram", "ngram_min": 5, "ngram_max": 2}):
        with pytest.raises(ValueError):
            Engine(model, **KW, **bad)


# ----------------------------------------------------------------------------------------------
# the real default model (slow)


@pytest.fixture(scope="module")
def real_prompts():
    """16 prompts that invite copying (a piece of a real Wikipedia summary, then its first
    half again) and 4 that do not (the piece alone)."""
    import qoq_jax
    from qoq_jax import assets
    from qoq_jax.eval.data import load_documents

    tok = qoq_jax.load(dtype="float32").tokenizer
    out = []
    for i, doc in enumerate(load_documents(assets.wiki_summaries_path())[:20]):
        ids = [int(t) for t in tok.encode(doc, add_special_tokens=False)][:60]
        out.append(ids + ids[:len(ids) // 2] if i < 16 else ids)
    return out


def _check_real(model, prompts, kv_cache):
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    kw = {"kv_cache": kv_cache, "max_slots": 16, "prefill_chunk": 128, "prefill_budget": 128}
    want = Engine(model, **kw).generate(prompts, params)
    eng = Engine(model, **kw, speculative="ngram", num_speculative_tokens=4,
                 speculative_max_batch=0)  # speculate in the full batch too
    got = eng.generate(prompts, params)  # more prompts than slots: a full batch
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.tokens == w.tokens, f"{kv_cache}: prompt {i} differs with speculation"
    for i in (0, 17):
        assert eng.generate([prompts[i]], params)[0].tokens == want[i].tokens, (
            f"{kv_cache}: prompt {i} alone differs with speculation")
    st = eng.speculative_stats
    assert st["accepted"] > 0 and st["accepted"] < st["proposed"], st


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache", ["16bit", "kv4"])
def test_real_model_float_same_tokens(real_prompts, kv_cache):
    import qoq_jax

    _check_real(qoq_jax.load(dtype="float32").model, real_prompts, kv_cache)


@pytest.mark.slow
def test_real_model_qoq_same_tokens(real_prompts):
    from helpers import quick_qoq_default_model

    q = quick_qoq_default_model("g128")
    for kv_cache in ("16bit", "kv4"):
        _check_real(q.model, real_prompts, kv_cache)


def test_free_verification_bound_replays_the_proposer_as_the_engine_schedules_it():
    """benchmarks/speculative.py's bound (tokens per forward step if verifying were free)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from speculative import free_verification_bound

    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    proposer = NgramProposer(7, 4, 2)
    # the output quotes the prompt on: 7 proposals accepted + the target's own token, one step
    assert free_verification_bound(proposer, [prompt], [[3, 4, 5, 6, 7, 8, 9, 20]], 8) == 8.0
    # two accepted + the target's 99 (one step), then no n-gram matches: 5 decode steps
    out = [3, 4, 99, 50, 51, 52, 53, 54]
    assert free_verification_bound(proposer, [prompt], [out], 8) == 8 / 6
    # nothing to quote: plain decoding, one token per step, whatever the dispatch size
    assert free_verification_bound(proposer, [[40, 41, 42]], [[43, 44, 45, 46]], 2) == 1.0
