"""Speculative decoding with a draft model (qoq_jax/draft.py): the output is the target's with and
without it (greedy, seeded sampling, logit processing, the KV4 cache, preemption, alone and in
a full batch), the draft's proposals are its own greedy continuation of each sequence (its KV
pages kept valid across rounds as far as the target accepted them), its pages are freed with
its sequences, and bad settings are refused. Tiny random models (a draft that is the target
with its weights perturbed, so that it is right often but not always); the real default model
with its QoQ W4A8KV4 copy as the draft in the slow test at the end."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CONFIGS, random_hf_weights

from qoq_jax.config import ModelConfig
from qoq_jax.draft import DraftProposer, common_prefix
from qoq_jax.engine import Engine
from qoq_jax.model import from_hf_weights
from qoq_jax.sampling import SamplingParams
from qoq_jax.speculative import ProposalRequest

CFG = ModelConfig.from_hf_dict(TINY_CONFIGS["llama3"])
VOCAB = CFG.vocab_size


def _weights(seed=3):
    # larger weights and smaller embeddings than the helpers' default: tiny random models that
    # do not fall into repeating one token, so proposals are accepted and rejected
    w = random_hf_weights(CFG, seed, std=0.3)
    w["model.embed_tokens.weight"] *= 0.1
    return w


@pytest.fixture(scope="module")
def target():
    return from_hf_weights(CFG, _weights(), jnp.float32)


@pytest.fixture(scope="module")
def draft():
    """The target with every weight perturbed by ~25% of its spread."""
    rng = np.random.default_rng(11)
    w = {k: v + 0.25 * v.std() * rng.standard_normal(v.shape).astype(np.float32)
         for k, v in _weights().items()}
    return from_hf_weights(CFG, w, jnp.float32)


KW = {"page_size": 8, "decode_steps": 4, "max_slots": 8, "prefill_chunk": 32, "num_pages": 160}


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, int(rng.integers(2, 40))).tolist() for _ in range(n)]


def _draft_engine(target, draft, **kw):
    kw = {"speculative_max_batch": 0, "num_speculative_tokens": 4, **kw}  # full batches too
    return Engine(target, **{**KW, **kw}, speculative="draft", draft_model=draft)


@pytest.fixture(scope="module")
def base(target):
    return Engine(target, **KW)


@pytest.fixture(scope="module")
def spec(target, draft):
    return _draft_engine(target, draft)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7], [8]) == 0


PROCESSED = SamplingParams(max_new_tokens=18, stop_token_ids=(4, 9), temperature=0.7, seed=1,
                           repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                           min_tokens=5, logit_bias=((5, 3.0), (11, -2.0)), logprobs=2)


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=20, stop_token_ids=()),
    SamplingParams(max_new_tokens=18, stop_token_ids=(), temperature=0.9, seed=7, top_k=20),
    PROCESSED], ids=["greedy", "sampled", "processed"])
def test_output_is_the_same_with_and_without_the_draft(base, spec, params):
    """More prompts than slots, varied budgets: every request's tokens (and logprobs) are the
    target's alone; the draft was right sometimes and wrong sometimes; every page of both
    pools is back at the end."""
    prompts = _prompts(11)
    plist = [dataclasses.replace(params, max_new_tokens=params.max_new_tokens - i % 4)
             for i in range(len(prompts))]
    before = spec.speculative_stats
    want = base.generate(prompts, plist)
    got = spec.generate(prompts, plist)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.tokens == w.tokens, i
        assert g.finish_reason == w.finish_reason
        if params.logprobs is not None:
            np.testing.assert_allclose([e["logprob"] for e in g.logprobs],
                                       [e["logprob"] for e in w.logprobs], atol=1e-5)
    assert spec.generate([prompts[3]], plist[3])[0].tokens == want[3].tokens
    after = spec.speculative_stats
    proposed = after["proposed"] - before["proposed"]
    accepted = after["accepted"] - before["accepted"]
    assert proposed > 0 and 0 < accepted < proposed, (proposed, accepted)
    assert spec.allocator.num_used == 0 and spec.draft.allocator.num_used == 0


class Recording:
    """Stands in the scheduler for a proposer, recording each round's requests and answers."""

    def __init__(self, inner):
        self.inner, self.k, self.rounds = inner, inner.k, []

    def propose_many(self, requests):
        out = self.inner.propose_many(requests)
        self.rounds.append([(list(r.tokens), r.k, p) for r, p in zip(requests, out)])
        return out

    def release(self, seq_id):
        self.inner.release(seq_id)


def test_proposals_are_the_drafts_own_greedy_continuation(target, draft):
    """Every proposal equals what the draft model generates greedily from that sequence's
    tokens from scratch: the K/V the draft reuses across rounds (its accepted proposals) and
    the catch-up it feeds are right, whatever the target rejected."""
    eng = _draft_engine(target, draft)
    rec = eng.scheduler.proposer = Recording(eng.draft)
    eng.generate(_prompts(6, seed=4), SamplingParams(max_new_tokens=24, stop_token_ids=()))
    asks = [a for rnd in rec.rounds for a in rnd]
    assert len(rec.rounds) > 5 and any(len(rnd) > 1 for rnd in rec.rounds)
    ref = Engine(draft, **KW)
    want = ref.generate([t for t, _, _ in asks],
                        [SamplingParams(max_new_tokens=k, stop_token_ids=()) for _, k, _ in asks])
    for (tokens, k, proposal), w in zip(asks, want):
        assert proposal == w.tokens, (tokens, proposal, w.tokens)
    # the draft fed one or two tokens a round, mostly, not whole contexts again
    assert eng.draft.stats["fed_tokens"] < sum(len(t) for t, _, _ in asks) / 3


def test_the_draft_keeps_only_the_kv_that_still_holds(draft):
    """DraftProposer alone, rounds whose contexts went on differently from its proposals (the
    target rejected them, or rounds were skipped while the batch was large), a context longer
    than a step (a catch-up in several steps), a slot reused: each proposal is the draft's greedy
    continuation from scratch, and release frees a sequence's pages."""
    prop = DraftProposer(draft, k=4, slots=4, page_size=8, num_pages=64, max_context=256,
                         max_batch_tokens=32)
    ref = Engine(draft, **KW)

    def greedy(tokens, k):
        return ref.generate([tokens], SamplingParams(max_new_tokens=k, stop_token_ids=()))[0].tokens

    rng = np.random.default_rng(5)
    a, b = _prompts(2, seed=8)
    got = prop.propose_many([ProposalRequest(0, 0, a, 4), ProposalRequest(1, 1, b, 3)])
    assert got == [greedy(a, 4), greedy(b, 3)]
    # a: two proposals accepted, then the target's own token; b: five tokens the draft never
    # proposed (rounds skipped); c: a new sequence longer than a step, in slot 2
    a2 = a + got[0][:2] + [int((got[0][2] + 1) % VOCAB)]
    b2 = b + rng.integers(3, VOCAB, 5).tolist()
    c = rng.integers(3, VOCAB, 70).tolist()
    got = prop.propose_many([ProposalRequest(0, 0, a2, 4), ProposalRequest(1, 1, b2, 2),
                             ProposalRequest(2, 2, c, 4)])
    assert got == [greedy(a2, 4), greedy(b2, 2), greedy(c, 4)]
    steps = prop.stats["steps"]
    # every proposal of a accepted (the draft fed all but the last): two tokens to catch up
    a3 = a2 + got[0] + [7]
    got = prop.propose_many([ProposalRequest(0, 0, a3, 3)])
    assert got == [greedy(a3, 3)] and prop.stats["steps"] == steps + 1
    # b leaves its slot; another sequence takes slot 1 (its context shares nothing with b's)
    prop.release(1)
    d = _prompts(1, seed=12)[0]
    assert prop.propose_many([ProposalRequest(5, 1, d, 4)]) == [greedy(d, 4)]
    for sid in (0, 2, 5):
        prop.release(sid)
    assert prop.allocator.num_used == 0


def test_preemption_frees_the_drafts_pages_too(target, draft):
    """A pool too small for the load (preemptions: the draft's pages go with the sequence's):
    the target's tokens, and every page of both pools back at the end. (The KV4 cache, for the
    target and as the draft's own: the real-model test below and tests/test_speculative.py.)"""
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_new_tokens=24, stop_token_ids=())
    small = {"num_pages": 12, "max_slots": 4}
    want = Engine(target, **{**KW, **small}).generate(prompts, params)
    eng = _draft_engine(target, draft, **small, prefix_caching=False)
    got = eng.generate(prompts, params)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert eng.stats["preemptions"] > 0 and eng.speculative_stats["accepted"] > 0
    assert eng.allocator.num_free == eng.num_pages - 1
    assert eng.draft.allocator.num_used == 0


def test_draft_engine_programs_and_refusals(target, draft):
    """The draft's programs are its own step and decode buckets (compiled by warmup too);
    settings that cannot work are refused with a reason."""
    eng = _draft_engine(target, draft)
    shapes = eng.program_shapes()
    assert shapes["draft_step"][0] == 4 and "draft_decode" in shapes
    eng.generate(_prompts(3, seed=9), SamplingParams(max_new_tokens=10, stop_token_ids=()))
    assert set(eng.draft.runner.compiled_programs) <= {
        f"step/{t}" for t in shapes["draft_step"]} | {f"decode/{r}" for r in
                                                       shapes["draft_decode"]}
    other = dataclasses.replace(CFG, vocab_size=VOCAB + 4)
    w = random_hf_weights(other, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        _draft_engine(target, from_hf_weights(other, w, jnp.float32))
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(target, **KW, speculative="draft")
    with pytest.raises(ValueError, match="speculative='draft'"):
        Engine(target, **KW, draft_model=draft)
    with pytest.raises(ValueError, match="draft_kv_cache"):
        _draft_engine(target, draft, draft_kv_cache="kv8")


def test_cli_and_load_take_a_draft_path(tmp_path, capsys):
    """--speculative draft:PATH on the generate CLI (the same tokens as without), and a draft
    with another tokenizer refused by qoq_jax.load."""
    import json

    import qoq_jax
    from helpers import make_tiny_quant_checkpoint
    from qoq_jax import generate
    from qoq_jax.cli import speculative_arg

    target_dir = make_tiny_quant_checkpoint(tmp_path / "t", "llama", seed=1)
    draft_dir = make_tiny_quant_checkpoint(tmp_path / "d", "llama", seed=2)
    args = ["--model", str(target_dir), "--prompt", "abcabcabc", "--max-new-tokens", "12",
            "--json", "--num-speculative-tokens", "3"]
    assert generate.main(args) == 0
    want = json.loads(capsys.readouterr().out)["token_ids"]
    assert generate.main(args + ["--speculative", f"draft:{draft_dir}"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["token_ids"] == want
    assert "speculative draft (k=3)" in out.err
    with pytest.raises(Exception, match="draft:PATH"):
        speculative_arg("draft:")
    tok = json.loads((draft_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k + "x": v for k, v in tok["model"]["vocab"].items()}
    (draft_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="another tokenizer"):
        qoq_jax.load(target_dir, speculative="draft", draft_model=draft_dir)
    with pytest.raises(ValueError, match="speculative='draft'"):
        qoq_jax.load(target_dir, draft_model=draft_dir)


# ----------------------------------------------------------------------------------------------
# the real default model (slow): its QoQ W4A8KV4 copy drafts for it


@pytest.mark.slow
def test_real_model_with_its_qoq_copy_as_draft():
    """float32 target, QoQ W4A8 (g128, KV4 cache) draft: the same greedy tokens as without
    speculation in a full batch and alone, and the draft's first proposal is mostly right."""
    import qoq_jax
    from qoq_jax import assets
    from helpers import quick_qoq_default_model

    from qoq_jax.eval.data import load_documents

    llm = qoq_jax.load(dtype="float32")
    q = quick_qoq_default_model("g128")
    prompts = [llm.encode(d[:200], chat=True)
               for d in load_documents(assets.wiki_summaries_path())[:8]]
    params = SamplingParams(max_new_tokens=16)
    kw = {"max_slots": 4, "prefill_chunk": 128, "prefill_budget": 256}
    want = Engine(llm.model, **kw).generate(prompts, params)
    eng = Engine(llm.model, **kw, speculative="draft", draft_model=q.model,
                 draft_kv_cache="kv4", num_speculative_tokens=4, speculative_max_batch=0)
    got = eng.generate(prompts, params)
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.tokens == w.tokens, f"prompt {i} differs with the draft"
    assert eng.generate([prompts[5]], params)[0].tokens == want[5].tokens
    assert eng.draft.runner.kv_cache == "kv4"
    st = eng.speculative_stats
    assert st["acceptance_rate_per_position"][0] > 0.5, st
    assert 0 < st["accepted"] < st["proposed"]


def test_the_server_speculates_with_a_draft(tmp_path):
    """The OpenAI server over an engine with a draft model: completions (streamed and not)
    carry the tokens the same model gives without speculation, and /metrics counts the
    proposals."""
    import httpx
    from helpers import make_tiny_quant_checkpoint
    from openai import OpenAI
    from test_server import Server

    import qoq_jax
    from qoq_jax.serve import create_app

    target_dir = make_tiny_quant_checkpoint(tmp_path / "t", "llama", seed=6)
    draft_dir = make_tiny_quant_checkpoint(tmp_path / "d", "llama", seed=7)
    engine = dict(max_slots=4, page_size=16, num_pages=64, decode_steps=4, prefill_chunk=64)
    ref = qoq_jax.load(target_dir, **engine)
    llm = qoq_jax.load(target_dir, speculative="draft", draft_model=draft_dir,
                       num_speculative_tokens=3, speculative_max_batch=0, **engine)
    assert llm.engine.draft is not None
    srv = Server(create_app(llm, model_name="tiny"))
    try:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        for prompt in ("abcabcabc", "the quick brown fox"):
            want = ref.generate(prompt, max_new_tokens=16, temperature=0.0)[0].text
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=0.0)
            assert got.choices[0].text == want
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                               temperature=0.0, stream=True)
            assert "".join(c.choices[0].text for c in chunks) == want
        metrics = httpx.get(f"{srv.url}/metrics").text
        proposed = [ln for ln in metrics.splitlines()
                    if ln.startswith("qoq_spec_proposed_tokens ")]
        assert proposed and float(proposed[0].split()[1]) > 0
    finally:
        srv.stop()
