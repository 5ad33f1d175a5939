"""The engine on tiny random models: batching, stopping, sampling, and bad prompts."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tiny_checkpoint

from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine, PromptError
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import decode_step, from_hf_weights, prefill
from qoq_jax.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "qwen2", "qwen2", seed=3)
    return from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, page_size=8, decode_chunk=4)


def _prompts(n, seed=0, vocab=100):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(1, 40))).tolist() for _ in range(n)]


def _reference_greedy(model, prompt, n):
    """Greedy decoding by re-running the whole sequence through prefill each step (no cache reuse)."""
    toks = list(prompt)
    out = []
    for _ in range(n):
        cache = PagedKVCache.zeros(model.config.num_layers, 9, 8, model.config.num_kv_heads,
                                   model.config.head_dim, jnp.float32)
        table = jnp.arange(1, 9, dtype=jnp.int32)[None]
        logits, _ = prefill(model, jnp.asarray([toks]), jnp.asarray([len(toks)]), cache, table)
        nxt = int(jnp.argmax(logits[0]))
        out.append(nxt)
        toks.append(nxt)
    return out


def test_greedy_matches_recomputation_without_cache(engine, model):
    prompt = _prompts(1, seed=5)[0]
    r = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=()))[0]
    assert r.tokens == _reference_greedy(model, prompt, 10)
    assert r.finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(engine):
    prompts = _prompts(5, seed=1)
    params = SamplingParams(max_new_tokens=11, stop_token_ids=())
    batched = engine.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.tokens == engine.generate([p], params)[0].tokens
        assert len(b.tokens) == 11


def test_per_sequence_max_new_tokens(engine):
    prompts = _prompts(3, seed=2)
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (1, 7, 13)]
    out = engine.generate(prompts, params)
    assert [len(r.tokens) for r in out] == [1, 7, 13]


def test_stop_token_ends_a_sequence_and_is_kept(engine):
    prompt = _prompts(1, seed=7)[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=()))[0]
    stop = free.tokens[4]
    first = free.tokens.index(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)))[0]
    assert out.tokens == free.tokens[:first + 1]
    assert out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    prompts = _prompts(2, seed=3)
    a = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=50.0, seed=1,
                                                stop_token_ids=()))
    b = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=50.0, seed=1,
                                                stop_token_ids=()))
    c = engine.generate(prompts, SamplingParams(max_new_tokens=20, temperature=50.0, seed=2,
                                                stop_token_ids=()))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_empty_prompt_is_an_error(engine):
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []])


def test_prompt_longer_than_the_context_is_an_error(engine):
    limit = engine.config.max_position_embeddings
    with pytest.raises(PromptError, match=f"exceeds the model's context of {limit}"):
        engine.generate([[5] * (limit - 3)], SamplingParams(max_new_tokens=4))


def test_token_outside_the_vocabulary_is_an_error(engine):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.generate([[5, 100000]])


def test_sampling_params_are_validated():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sample_top_k_and_top_p_keep_only_the_allowed_tokens():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    ones = jnp.ones((4,), jnp.float32)
    for i in range(30):
        idx = jnp.full((4,), i, jnp.int32)
        seed = jnp.arange(4, dtype=jnp.uint32)
        k3 = np.asarray(sample(logits, ones, jnp.full((4,), 3, jnp.int32), ones, seed, idx))
        assert all(k3[r] in order[r, :3] for r in range(4))
        # top_p tiny: only the single most likely token survives
        p = np.asarray(sample(logits, ones, jnp.zeros((4,), jnp.int32), ones * 1e-4, seed, idx))
        np.testing.assert_array_equal(p, order[:, 0])
    greedy = sample(logits, jnp.zeros((4,)), jnp.zeros((4,), jnp.int32), ones,
                    jnp.zeros((4,), jnp.uint32), jnp.zeros((4,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(greedy), order[:, 0])


def test_sample_follows_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]], jnp.float32))
    draws = [int(sample(logits, jnp.ones((1,)), jnp.zeros((1,), jnp.int32), jnp.ones((1,)),
                        jnp.asarray([7], jnp.uint32), jnp.asarray([i]))[0]) for i in range(600)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.07)


def test_inactive_rows_do_not_touch_the_cache(model):
    cfg = model.config
    cache = PagedKVCache.zeros(cfg.num_layers, 5, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    table = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
    _, cache = decode_step(model, jnp.asarray([5, 6]), jnp.asarray([3, 3]),
                           jnp.asarray([True, False]), cache, table)
    k = np.asarray(cache.k)
    assert np.abs(k[:, 1, :, 3]).sum() > 0  # the active row wrote its slot (pools: L, N, H, P, D)
    assert np.abs(k[:, 3:]).sum() == 0  # the inactive row's pages are untouched


def test_kv4_batch_equals_each_alone(model):
    eng = Engine(model, kv_cache="kv4", page_size=8, decode_chunk=4)
    prompts = _prompts(4, seed=11)
    params = SamplingParams(max_new_tokens=9, stop_token_ids=())
    batched = eng.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.tokens == eng.generate([p], params)[0].tokens


def test_bad_kv_cache_kind(model):
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        Engine(model, kv_cache="int8")


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
def test_whole_model_lowers_for_h100_with_pallas_kernels(model, kind):
    """prefill and decode_step, the Flax model and every kernel in one program, lowered for CUDA."""
    from helpers import TRITON_CALL, lower_for_h100

    from pallas_kernels._common import default_backend
    from qoq_jax.kv_cache import make_cache

    cfg = model.config
    cache = make_cache(kind, cfg.num_layers, 9, 16, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16)
    table = jnp.zeros((2, 4), jnp.int32)
    with default_backend("pallas"):
        pre = lower_for_h100(lambda m, t, n, c, p: prefill(m, t, n, c, p), model,
                             jnp.zeros((2, 64), jnp.int32), jnp.ones((2,), jnp.int32), cache, table)
        dec = lower_for_h100(lambda m, t, pos, a, c, p: decode_step(m, t, pos, a, c, p), model,
                             jnp.zeros((2,), jnp.int32), jnp.ones((2,), jnp.int32),
                             jnp.ones((2,), bool), cache, table)
    assert pre.count(TRITON_CALL) >= 1 + (kind == "kv4")  # prefill attention (+ the KV4 write)
    assert dec.count(TRITON_CALL) >= 1 + (kind == "kv4")  # decode attention (+ the KV4 write)
