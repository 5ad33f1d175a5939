"""The full set of sampling parameters on the device: logit_bias, min_tokens, repetition /
presence / frequency penalties (against a NumPy reference of vLLM's definitions), min_p; batch
invariance and preemption with them; their validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import make_tiny_checkpoint

from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine, PromptError
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import from_hf_weights, prefill
from qoq_jax.sampling import SamplingParams, sample

NEW = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # small weights: logits close enough together for the penalties to change the argmax
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "llama3", "llama3", seed=11)
    m = from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)
    graphdef, state = nnx.split(m)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 0.25, state))


def _engine(model, **kw):
    return Engine(model, **{"page_size": 8, "decode_steps": 4, "max_slots": 8,
                            "prefill_chunk": 32, "num_pages": 160, **kw})


@pytest.fixture(scope="module")
def engine(model):
    return _engine(model)


def _prompt(seed, n=20, vocab=96):
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _np_process(logits, sp: SamplingParams, prompt, out, stop_ids):
    """vLLM's logit processing, in NumPy: bias, min_tokens, repetition over prompt + output,
    frequency and presence over the output."""
    x = logits.astype(np.float32).copy()
    for t, b in sp.logit_bias:
        x[t] += np.float32(b)
    if len(out) < sp.min_tokens:
        x[list(stop_ids)] = -np.inf
    counts = np.bincount(np.asarray(out, np.int64), minlength=x.shape[0]).astype(np.float32)
    seen = np.zeros(x.shape[0], bool)
    seen[list(prompt)] = True
    seen |= counts > 0
    r = np.float32(sp.repetition_penalty)
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return (x - np.float32(sp.frequency_penalty) * counts
            - np.float32(sp.presence_penalty) * (counts > 0))


def _reference(model, prompt, sp: SamplingParams, stop_ids=()):
    """Greedy decoding with the processing above, the whole sequence recomputed each step."""
    @nnx.jit
    def last_logits(model, tokens, length):
        cache = PagedKVCache.zeros(model.config.num_layers, 9, 8, model.config.num_kv_heads,
                                   model.config.head_dim, jnp.float32)
        table = jnp.arange(1, 9, dtype=jnp.int32)[None]
        return prefill(model, tokens, length, cache, table)[0][0]

    toks = np.zeros((1, len(prompt) + sp.max_new_tokens), np.int32)
    toks[0, :len(prompt)] = prompt
    out = []
    for _ in range(sp.max_new_tokens):
        length = len(prompt) + len(out)
        logits = np.asarray(last_logits(model, jnp.asarray(toks), jnp.asarray([length])))
        nxt = int(np.argmax(_np_process(logits, sp, prompt, out, stop_ids)))
        out.append(nxt)
        toks[0, length] = nxt
        if nxt in stop_ids and len(out) > 0:
            break
    return out


CASES = {
    "repetition": dict(repetition_penalty=3.0),
    "presence + frequency": dict(presence_penalty=1.5, frequency_penalty=0.8),
    "all penalties": dict(repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=2.0),
    "logit bias": dict(logit_bias={5: -1.5, 17: -100.0, 43: 1.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_processed_greedy_equals_the_numpy_reference(engine, model, name):
    sp = SamplingParams(max_new_tokens=NEW, stop_token_ids=(), **CASES[name])
    prompt = _prompt(1)
    got = engine.generate([prompt], sp)[0].tokens
    assert got == _reference(model, prompt, sp), name
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=NEW, stop_token_ids=()))
    assert got != plain[0].tokens, f"{name} changed nothing: the test would not see a bug"


def test_min_tokens_bars_the_stop_ids_until_then(engine, model):
    prompt = _prompt(2)
    first = engine.generate([prompt], SamplingParams(max_new_tokens=1, stop_token_ids=()))
    stop = first[0].tokens[0]  # the token greedy picks first: a stop id at once without min_tokens
    sp = SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,), min_tokens=4)
    r = engine.generate([prompt], sp)[0]
    assert stop not in r.tokens[:4] and len(r.tokens) >= 4
    assert r.tokens == _reference(model, prompt, sp, stop_ids=(stop,))
    at_once = engine.generate([prompt], SamplingParams(max_new_tokens=NEW, stop_token_ids=(stop,)))
    assert at_once[0].tokens == [stop] and at_once[0].finish_reason == "stop"


def test_logit_bias_forces_a_token(engine):
    r = engine.generate([_prompt(3)], SamplingParams(max_new_tokens=6, stop_token_ids=(),
                                                     logit_bias={42: 100.0}))[0]
    assert r.tokens == [42] * 6


MIXED = [SamplingParams(**{"max_new_tokens": NEW, "stop_token_ids": (), **kw}) for kw in (
    dict(repetition_penalty=1.5, presence_penalty=0.5),
    dict(),
    dict(logit_bias={7: 2.0}, frequency_penalty=1.0),
    dict(temperature=0.9, seed=4, min_p=0.2, repetition_penalty=1.2),
    dict(min_tokens=5, stop_token_ids=(9,)),
    dict(temperature=1.0, seed=8, top_k=5, frequency_penalty=0.3),
)]


def test_processed_requests_are_the_same_alone_in_a_batch_and_after_preemption(model):
    prompts = [_prompt(10 + i, n=12 + 3 * i) for i in range(len(MIXED))]
    engine = _engine(model)
    alone = [engine.generate([p], sp)[0].tokens for p, sp in zip(prompts, MIXED)]
    assert engine.generate(prompts, MIXED) and [
        r.tokens for r in engine.generate(prompts, MIXED)] == alone
    # a pool too small for all at once: some are preempted and recomputed, their history
    # (prompt mask, output counts) written again at re-admission
    tight = _engine(model, num_pages=14, max_slots=6)
    results = tight.generate(prompts, MIXED)
    assert any(r.preemptions for r in results), "the workload was meant to preempt"
    assert [r.tokens for r in results] == alone


def test_sample_min_p_keeps_only_tokens_near_the_top():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
    n = logits.shape[0]
    toks = np.asarray(sample(logits, jnp.ones(n), jnp.zeros(n, jnp.int32), jnp.ones(n),
                             jnp.zeros(n, jnp.uint32), jnp.arange(n), min_p=jnp.full(n, 0.35)))
    # 0.35 x 0.5 = 0.175: tokens 2 (0.15) and 3 (0.05) are dropped; 0 and 1 renormalised
    assert set(toks.tolist()) == {0, 1}
    assert abs((toks == 0).mean() - 0.5 / 0.8) < 0.05


@pytest.mark.parametrize("kw,message", [
    (dict(min_p=1.5), "min_p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 100]"),
    (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2]"),
    (dict(min_tokens=200, max_new_tokens=10), "min_tokens must be in [0, 10]"),
    (dict(logit_bias={3: 101.0}), "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias token id must be >= 0"),
    (dict(logit_bias={3: float("nan")}), "logit_bias value must be a finite number"),
])
def test_bad_values_name_the_parameter(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        SamplingParams(**kw)


def test_the_engine_refuses_what_it_cannot_hold(model):
    engine = _engine(model, max_logit_bias=2)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.submit([1, 2], SamplingParams(logit_bias={500: 1.0}))
    with pytest.raises(PromptError, match="the engine's limit is 2"):
        engine.submit([1, 2], SamplingParams(logit_bias={1: 1.0, 2: 1.0, 3: 1.0}))
    assert SamplingParams(logit_bias={3: 1, 1: -2.5}).logit_bias == ((1, -2.5), (3, 1.0))


def test_prompt_logprobs_equal_the_scoring_of_the_same_text_while_requests_run(model):
    from qoq_jax.eval.scoring import score

    engine = _engine(model)
    prompt = _prompt(30, n=45)
    want = score(engine, np.asarray([prompt]))[0]  # idle engine: the perplexity path
    # while another request decodes: submitted through the inbox, run between steps
    rid = engine.submit(_prompt(31), SamplingParams(max_new_tokens=30, stop_token_ids=()))
    engine.step()
    got = engine.prompt_logprobs(prompt, n_top=3)
    assert got.logprobs[0] is None and got.top[0] == []
    np.testing.assert_array_equal(np.array(got.logprobs[1:], np.float32), want)
    for tok, lp, top in zip(prompt[1:], got.logprobs[1:], got.top[1:]):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][1] >= lp
        assert dict(top).get(tok, lp) == pytest.approx(lp, abs=1e-6)
    engine.run(lambda: engine.finished(rid))
    assert engine.allocator.num_used == 0
    with pytest.raises(PromptError, match="n_top must be in"):
        engine.submit_prompt_logprobs(prompt, n_top=99)
