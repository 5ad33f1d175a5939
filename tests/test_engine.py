"""The serving engine on tiny random models: in-flight batching, chunked prefill, preemption,
batch invariance, streaming, cancellation, log-probabilities, compilation and bad requests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import make_tiny_checkpoint

from qoq_jax.config import ModelConfig
from qoq_jax.engine import COMPILES, Engine, PromptError
from qoq_jax.eval.scoring import score
from qoq_jax.hf import CheckpointError, SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import decode_step, from_hf_weights, prefill
from qoq_jax.runner import SHARED_EXECUTABLES
from qoq_jax.sampling import SamplingParams, sample

GREEDY = SamplingParams(max_new_tokens=11, stop_token_ids=())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "qwen2", "qwen2", seed=3)
    return from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)


def _engine(model, **kw):
    kw = {"page_size": 8, "decode_steps": 4, "max_slots": 8, "prefill_chunk": 32,
          "num_pages": 160, **kw}
    return Engine(model, **kw)


@pytest.fixture(scope="module")
def engine(model):
    return _engine(model)


def _prompts(n, seed=0, vocab=100, longest=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, int(rng.integers(1, longest))).tolist() for _ in range(n)]


def _reference_greedy(model, prompt, n):
    """Greedy decoding by re-running the whole sequence through prefill each step (no cache reuse).
    The sequence is right-padded to its final length so that one program serves every step."""
    from flax import nnx

    @nnx.jit
    def last_logits(model, tokens, length):
        cache = PagedKVCache.zeros(model.config.num_layers, 17, 8, model.config.num_kv_heads,
                                   model.config.head_dim, jnp.float32)
        table = jnp.arange(1, 17, dtype=jnp.int32)[None]
        return prefill(model, tokens, length, cache, table)[0][0]

    toks = np.zeros((1, len(prompt) + n), np.int32)
    toks[0, :len(prompt)] = prompt
    out = []
    for i in range(n):
        length = len(prompt) + i
        nxt = int(jnp.argmax(last_logits(model, jnp.asarray(toks), jnp.asarray([length]))))
        out.append(nxt)
        toks[0, length] = nxt
    return out


def test_greedy_matches_recomputation_without_cache(engine, model):
    prompt = _prompts(1, seed=5)[0]
    r = engine.generate([prompt], SamplingParams(max_new_tokens=10, stop_token_ids=()))[0]
    assert r.tokens == _reference_greedy(model, prompt, 10)
    assert r.finish_reason == "length"


def test_batch_of_different_lengths_equals_each_alone(engine):
    prompts = _prompts(12, seed=1)  # more prompts than slots: later ones join as others end
    batched = engine.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched):
        assert b.tokens == engine.generate([p], GREEDY)[0].tokens
        assert len(b.tokens) == 11
    assert engine.allocator.num_used == 0  # every page came back


def test_kv4_batch_equals_each_alone(model):
    eng = _engine(model, kv_cache="kv4")
    prompts = _prompts(6, seed=11)
    params = SamplingParams(max_new_tokens=9, stop_token_ids=())
    batched = eng.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert b.tokens == eng.generate([p], params)[0].tokens


def test_long_prompt_is_prefilled_in_chunks(model):
    """A 150-token prompt in chunks of 16 (each attending to the pages before it) gives the
    tokens of one 256-token chunk, and never holds more pages than it needs."""
    prompt = _prompts(1, seed=21, longest=2)[0] * 150
    small = _engine(model, prefill_chunk=16)
    big = _engine(model, prefill_chunk=256)
    a = small.generate([prompt], GREEDY)[0].tokens
    assert small.stats["ragged_steps"] == 10  # ceil(150 / 16)
    assert a == big.generate([prompt], GREEDY)[0].tokens


def test_prompts_join_and_leave_while_others_decode(engine):
    """In-flight batching: requests submitted while others run get the same tokens as alone."""
    prompts = _prompts(6, seed=8)
    params = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (20, 3, 14, 7, 9, 5)]
    rids = [engine.submit(prompts[0], params[0]), engine.submit(prompts[1], params[1])]
    for i in range(2, 6):
        for _ in range(2):
            engine.step()
        rids.append(engine.submit(prompts[i], params[i]))
    engine.run(lambda: all(engine.finished(r) for r in rids))
    for rid, p, sp in zip(rids, prompts, params):
        assert engine.result(rid).tokens == engine.generate([p], sp)[0].tokens
        engine.release(rid)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_preemption_recomputes_and_loses_nothing(model, temperature):
    """A pool far too small for the load: sequences are preempted and replayed, and every
    output equals the one from an engine with pages to spare."""
    prompts = _prompts(8, seed=4, longest=30)
    params = SamplingParams(max_new_tokens=40, temperature=temperature, seed=9,
                            stop_token_ids=())
    roomy = _engine(model).generate(prompts, params)
    tight = _engine(model, num_pages=14)  # 13 pages of 8 tokens for 8 sequences of up to 70
    out = tight.generate(prompts, params)
    assert tight.stats["preemptions"] > 0
    assert [r.tokens for r in out] == [r.tokens for r in roomy]
    assert all(len(r.tokens) == 40 for r in out)
    assert tight.allocator.num_used == 0


def test_steady_state_never_compiles(model):
    """After warm-up, a mixed workload (lengths, batch sizes, greedy and sampled, streaming,
    cancellation) compiles nothing."""
    eng = _engine(model, max_slots=4, prefill_chunk=32)
    eng.warmup()
    before = COMPILES.count
    rng = np.random.default_rng(0)
    for round_ in range(3):
        n = int(rng.integers(1, 7))
        prompts = _prompts(n, seed=round_, longest=70)
        params = [SamplingParams(max_new_tokens=int(rng.integers(1, 12)),
                                 temperature=float(rng.choice([0.0, 0.7])), seed=i,
                                 stop_token_ids=()) for i in range(n)]
        eng.generate(prompts, params)
    rid = eng.submit(_prompts(1, seed=9)[0], SamplingParams(max_new_tokens=30))
    eng.step()
    eng.cancel(rid)
    eng.run(lambda: eng.finished(rid))
    list(eng.stream(_prompts(1, seed=10)[0], GREEDY))
    assert COMPILES.count == before


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


def test_stream_yields_the_tokens_of_generate(engine):
    prompt = _prompts(1, seed=12)[0]
    events = list(engine.stream(prompt, GREEDY))
    assert events[-1].finished and events[-1].finish_reason == "length"
    assert len(events) > 2  # tokens arrive chunk by chunk, not all at the end
    assert sum((e.token_ids for e in events), []) == engine.generate([prompt], GREEDY)[0].tokens


def test_cancel_frees_the_slot_and_pages(engine):
    rid = engine.submit(_prompts(1, seed=13)[0], SamplingParams(max_new_tokens=100,
                                                                stop_token_ids=()))
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_used > 0
    engine.cancel(rid)
    engine.run(lambda: engine.finished(rid))
    r = engine.result(rid)
    assert r.finish_reason == "abort" and 0 < len(r.tokens) < 100
    assert engine.allocator.num_used == 0 and engine.num_running == 0


def test_logprobs(engine, model):
    prompt = _prompts(1, seed=14)[0]
    r = engine.generate([prompt], SamplingParams(max_new_tokens=3, logprobs=4,
                                                 stop_token_ids=()))[0]
    assert len(r.logprobs) == 3
    cache = PagedKVCache.zeros(model.config.num_layers, 9, 8, model.config.num_kv_heads,
                               model.config.head_dim, jnp.float32)
    logits, _ = prefill(model, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), cache,
                        jnp.arange(1, 9, dtype=jnp.int32)[None])
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    first = r.logprobs[0]
    assert first["token"] == r.tokens[0] == int(np.argmax(logp))
    np.testing.assert_allclose(first["logprob"], logp[first["token"]], atol=1e-5)
    ids = [i for i, _ in first["top"]]
    assert ids == list(np.argsort(-logp)[:4])
    assert all(a[1] >= b[1] for a, b in zip(first["top"], first["top"][1:]))


def test_non_finite_logits_stop_with_an_error(model):
    from flax import nnx

    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    key = next(k for k in flat if k[-1] == "weight" and "down_proj" in k)
    flat[key] = flat[key].replace(value=flat[key][...].at[0, 0, 0].set(jnp.nan))
    broken = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    r = _engine(broken).generate([[5, 6, 7]], GREEDY)[0]
    assert r.finish_reason == "error" and r.tokens == []
    assert "non-finite" in r.error


def test_empty_prompt_is_an_error(engine):
    with pytest.raises(PromptError, match="prompt 1: the prompt is empty"):
        engine.generate([[5, 6], []])


def test_prompt_longer_than_the_context_is_an_error(engine):
    limit = engine.model_config.max_position_embeddings
    with pytest.raises(PromptError, match=f"exceeds the model's context of {limit}"):
        engine.generate([[5] * (limit - 3)], SamplingParams(max_new_tokens=4))


def test_request_larger_than_the_whole_cache_is_refused_up_front(model):
    eng = _engine(model, num_pages=5)  # 4 pages of 8 tokens
    with pytest.raises(PromptError, match=r"needs 40 tokens of KV cache, but the whole cache "
                                          r"holds 32 \(4 pages of 8\)"):
        eng.submit([5] * 30, SamplingParams(max_new_tokens=10))


def test_token_outside_the_vocabulary_is_an_error(engine):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.generate([[5, 100000]])


def test_sampling_params_are_validated():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                dict(top_p=1.5), dict(max_new_tokens=2.5), dict(temperature=float("nan")),
                dict(seed=-1), dict(seed=2**32), dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_config_is_validated(model):
    for bad in (dict(page_size=0), dict(page_size=-16), dict(page_size=12), dict(max_slots=0),
                dict(num_pages=1), dict(kv_cache="int8")):
        with pytest.raises(ValueError):
            Engine(model, **bad)


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


def test_score_matches_the_model_logits(engine, model):
    prompt = _prompts(1, seed=15, longest=2)[0] * 70  # 70 tokens: 3 chunks of 32
    lp = score(engine, np.asarray([prompt]))
    cache = PagedKVCache.zeros(model.config.num_layers, 17, 8, model.config.num_kv_heads,
                               model.config.head_dim, jnp.float32)
    logits, _ = prefill(model, jnp.asarray([prompt]), jnp.asarray([70]), cache,
                        jnp.arange(1, 17, dtype=jnp.int32)[None], all_logits=True)
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    expect = logp[np.arange(69), prompt[1:]]
    np.testing.assert_allclose(lp[0], expect, atol=2e-5)


def _lower_engine_programs(model, kind):
    """(ragged step HLO, decode HLO) of the engine's programs lowered for an abstract H100,
    with the Pallas kernels (the engine built with kernels="pallas", as on a GPU)."""
    from helpers import lower_for_h100

    eng = _engine(model, kv_cache=kind, page_size=16, kernels="pallas")
    step = lower_for_h100(*_fn_args(eng.runner.step_program(64)))
    dec = lower_for_h100(*_fn_args(eng.runner.decode_program(4)))
    return step, dec


def _fn_args(program):
    fn, args = program
    return (fn, *args)


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
def test_engine_programs_lower_for_h100_with_pallas_kernels(model, kind):
    """The engine's prefill-chunk and decode-chunk programs, with the Flax model and every
    kernel, lowered for CUDA."""
    from helpers import TRITON_CALL

    pre, dec = _lower_engine_programs(model, kind)
    assert pre.count(TRITON_CALL) >= 1 + (kind == "kv4")  # attention (+ the KV4 write)
    assert dec.count(TRITON_CALL) >= 1 + (kind == "kv4")


def test_quantized_model_lowers_with_the_mosaic_gpu_gemm(tmp_path):
    """A W4A8 model built for Hopper (gemm_backend="mosaic", what "auto" picks on an H100):
    every projection of both engine programs is the Mosaic GPU GEMM, the other ops Triton."""
    from helpers import TRITON_CALL, make_tiny_quant_checkpoint

    from qoq_jax.convert import load_source, quantize
    from qoq_jax.quant.config import QuantConfig

    src = make_tiny_quant_checkpoint(tmp_path / "q", "llama", seed=1)
    cfg, weights, tok, _ = load_source(str(src))
    qmodel, _ = quantize(cfg, weights, tok, QuantConfig(method="rtn"), dtype="float32",
                         progress=False, gemm_backend="mosaic")
    assert qmodel.layers.mlp.down_proj.gemm_backend == "mosaic"
    pre, dec = _lower_engine_programs(qmodel, "kv4")
    for hlo in (pre, dec):
        # 4 GEMMs per layer (the runner fuses q/k/v and gate/up), under lax.scan: one call
        # site each in the layer body
        assert hlo.count("custom_call @mosaic_gpu_v2") >= 4
        assert hlo.count(TRITON_CALL) >= 2  # attention and the KV4 write


def test_key_rotation_keeps_the_function_and_shrinks_the_kv4_key_error(tmp_path):
    """ModelConfig.key_rotation (QoQ's rotate_k) rotates q and k per head after RoPE: with a
    16-bit cache the engine computes the same log-probabilities (prefill chunks and decode),
    with KV4 the cache stores rotated keys, whose rounding error is smaller when a few key
    channels are outliers (as in real models)."""
    import dataclasses

    d = make_tiny_checkpoint(tmp_path / "m", "llama3", seed=7)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    for i in range(cfg.num_layers):  # one outlier RoPE pair per KV head
        k = weights[f"model.layers.{i}.self_attn.k_proj.weight"].copy().reshape(
            cfg.num_kv_heads, cfg.head_dim, -1)
        k[:, [1, 1 + cfg.head_dim // 2]] *= 30.0
        weights[f"model.layers.{i}.self_attn.k_proj.weight"] = k.reshape(-1, k.shape[-1])
    rotated = dataclasses.replace(cfg, key_rotation=True)
    assert ModelConfig.from_hf_dict(rotated.to_hf_dict()) == rotated  # survives config.json
    window = np.random.default_rng(31).integers(3, cfg.vocab_size, (1, 70))
    lp = {(rot, kind): score(_engine(from_hf_weights(rotated if rot else cfg, weights, jnp.float32),
                               kv_cache=kind), window)
          for rot in (False, True) for kind in ("16bit", "kv4")}
    np.testing.assert_allclose(lp[True, "16bit"], lp[False, "16bit"], atol=2e-5)
    err = {rot: np.abs(lp[rot, "kv4"] - lp[False, "16bit"]).mean() for rot in (False, True)}
    assert err[True] < 0.8 * err[False], err
    prompt = window[0, :20].tolist()  # decode steps read the rotated keys back too
    outs = [_engine(from_hf_weights(c, weights, jnp.float32)).generate([prompt], GREEDY)[0].tokens
            for c in (cfg, rotated)]
    assert outs[0] == outs[1]
    # ModelConfig.key_scale: each layer's self_attn.key_scale divides the rotated keys and
    # multiplies the queries: the same function again, in prefill and in decode
    scaled = dataclasses.replace(rotated, key_scale=True)
    assert ModelConfig.from_hf_dict(scaled.to_hf_dict()) == scaled
    rng = np.random.default_rng(5)
    with_scale = dict(weights) | {
        f"model.layers.{i}.self_attn.key_scale":
            np.exp(rng.normal(0, 0.5, (cfg.num_kv_heads, cfg.head_dim))).astype(np.float32)
        for i in range(cfg.num_layers)}
    model = from_hf_weights(scaled, with_scale, jnp.float32)
    np.testing.assert_allclose(score(_engine(model, kv_cache="16bit"), window),
                               lp[False, "16bit"], atol=2e-5)
    assert _engine(model).generate([prompt], GREEDY)[0].tokens == outs[0]
    with pytest.raises(CheckpointError, match="key_scale"):  # the config needs the tensors
        from_hf_weights(scaled, weights, jnp.float32)


# ----------------------------------------------------------------------------------------------
# the second design: ragged steps, a handful of programs, nothing in proportion to the pools


def test_decode_rows_ride_along_while_a_newcomer_is_prefilled(model):
    """While a long prompt is prefilled in several ragged steps, the running sequences keep
    decoding in the same steps (no stall), and every output equals the one alone."""
    eng = _engine(model, prefill_chunk=16, prefill_budget=24, max_slots=4)
    params = SamplingParams(max_new_tokens=30, stop_token_ids=())
    early = _prompts(2, seed=31, longest=8)
    late = _prompts(1, seed=32, longest=2)[0] * 90
    rids = [eng.submit(p, params) for p in early]
    for _ in range(3):
        eng.step()
    made = {r: len(eng._requests[r].seq.output) for r in rids}
    rids.append(eng.submit(late, params))
    ragged0 = eng.stats["ragged_steps"]
    for _ in range(4):  # the 90-token prompt takes several ragged steps of <= 24 tokens
        eng.step()
    assert eng.stats["ragged_steps"] - ragged0 >= 3
    assert all(len(eng._requests[r].seq.output) > made[r] for r in rids[:2])  # no stall
    eng.run(lambda: all(eng.finished(r) for r in rids))
    for rid, p in zip(rids, early + [late]):
        assert eng.result(rid).tokens == _engine(model).generate([p], params)[0].tokens


def test_a_default_engine_compiles_a_handful_of_programs(tmp_path):
    """A default CPU engine (16 slots, 512-token steps) under a mixed workload: prompts of 1 to
    700 tokens, greedy and sampled, streamed, cancelled, log-probabilities: every program it
    compiles is one of its buckets, and there are at most 16 (docs/ARCHITECTURE.md lists them)."""
    d = make_tiny_checkpoint(tmp_path / "m", "qwen2", seed=3, max_position_embeddings=1024)
    m = from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)
    eng = Engine(m, num_pages=400)
    shapes = eng.program_shapes()
    assert shapes == {"step": (16, 32, 64, 128, 256, 512), "decode": (2, 4, 8, 16)}
    eng.runner.allocate()  # the pools (zeros: a small program of their own, once)
    SHARED_EXECUTABLES.clear()  # nothing from another test's engine of the same shapes
    before = COMPILES.count
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 100, n).tolist() for n in (1, 5, 17, 40, 90, 200, 300, 700)]
    params = [SamplingParams(max_new_tokens=int(rng.integers(1, 40)), stop_token_ids=(),
                             temperature=float(rng.choice([0.0, 0.8])), seed=i,
                             logprobs=2 if i % 3 == 0 else None) for i in range(len(prompts))]
    eng.generate(prompts, params)
    eng.generate(prompts[:3] * 6, params[:3] * 6)  # 18 requests: more than the slots
    list(eng.stream(prompts[2], GREEDY))
    rid = eng.submit(prompts[4], SamplingParams(max_new_tokens=30))
    eng.step()
    eng.cancel(rid)
    eng.run(lambda: eng.finished(rid))
    compiled = COMPILES.count - before
    names = eng.runner.compiled_programs
    assert compiled == len(names) <= 16, (compiled, names)
    assert set(names) <= {f"step/{t}" for t in shapes["step"]} | {
        f"decode/{r}" for r in shapes["decode"]}


def test_engines_of_equal_shapes_share_their_programs(model):
    """A second engine over the same model and shapes compiles nothing for the same workload
    (runner.SHARED_EXECUTABLES) and gives the same tokens; one whose pool has another size
    compiles its own programs."""
    prompts = _prompts(3, seed=21)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    SHARED_EXECUTABLES.clear()
    first = _engine(model, num_pages=90)
    want = first.generate(prompts, params)
    before = COMPILES.count
    second = _engine(model, num_pages=90)
    assert [r.tokens for r in second.generate(prompts, params)] == [r.tokens for r in want]
    assert COMPILES.count == before and second.runner.compiled_programs
    second.warmup()  # the buckets neither ran: compiled here, once
    assert _engine(model, num_pages=90).warmup() == 0
    other = _engine(model, num_pages=91)
    other.generate(prompts, params)
    assert COMPILES.count > before


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
def test_no_program_holds_memory_in_proportion_to_the_pools(model, kind):
    """Every program of the engine, compiled as it runs them (pools donated): the temporary
    memory is the same for a pool of 60 and of 20,000 pages, so nothing copies or touches
    whole pools per step."""
    temp = {}
    for pages in (60, 20000):
        eng = _engine(model, kv_cache=kind, num_pages=pages)
        temp[pages] = {k: v.temp_size_in_bytes for k, v in eng.runner.compiled_memory().items()}
        pool = eng.kv_bytes
    assert temp[60] == temp[20000]
    assert max(temp[20000].values()) < pool / 5


def test_the_cpu_route_computes_what_the_packed_gemm_does(tmp_path):
    """On the XLA GEMM the runner holds W4A8 weights as INT8 operands (layers.int8_runtime):
    the forward pass gives bit-identical logits, and the stored model keeps its packed form."""
    from helpers import make_tiny_quant_checkpoint

    from qoq_jax.convert import quantize
    from qoq_jax.kv_cache import make_cache
    from qoq_jax.layers import int8_runtime
    from qoq_jax.loading import load_source
    from qoq_jax.model import TokenBatch, forward
    from qoq_jax.quant.config import QuantConfig

    src = make_tiny_quant_checkpoint(tmp_path / "q", "llama", seed=1)
    cfg, weights, tok, _ = load_source(str(src))
    for fmt in ("g128", "per-channel"):
        qmodel, _ = quantize(cfg, weights, tok, QuantConfig(method="rtn", weight_format=fmt),
                             dtype="float32", progress=False)
        rt = int8_runtime(qmodel)
        assert rt.layers.mlp.down_proj.layout == "int8"
        assert hasattr(qmodel.layers.mlp.down_proj, "qweight")  # left as it is
        tokens = jnp.asarray(np.random.default_rng(2).integers(3, 250, (2, 24)), jnp.int32)
        batch = TokenBatch.padded(tokens, jnp.zeros((2,), jnp.int32), jnp.asarray([24, 17]),
                                  jnp.arange(1, 9, dtype=jnp.int32).reshape(2, 4))
        run = jax.jit(lambda m, b: forward(m, b, make_cache(
            "kv4", cfg.num_layers, 9, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32),
            all_logits=True)[0])
        np.testing.assert_array_equal(np.asarray(run(rt, batch)), np.asarray(run(qmodel, batch)))
        eng = _engine(qmodel, kv_cache="kv4", page_size=8)
        names = {str(p[-1]) for p, _ in nnx.to_flat_state(eng.runner.params)}
        assert "int8_weight" in names and "qweight" not in names


# ----------------------------------------------------------------------------------------------
# prefix caching


def _shared_prefix_prompts(n, seed=40, prefix_len=50):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 100, prefix_len).tolist()
    return [prefix + rng.integers(3, 100, int(rng.integers(1, 12))).tolist() for _ in range(n)]


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
def test_a_prefix_cache_hit_gives_the_cold_tokens(model, kind):
    """Requests sharing a 50-token prefix: after the first, each reuses its 6 full pages and
    prefills only the rest (the cached part ends mid-chunk); their greedy tokens are the ones
    an engine without prefix caching gives."""
    prompts = _shared_prefix_prompts(5)
    cold = _engine(model, kv_cache=kind, prefix_caching=False)
    want = [cold.generate([p], GREEDY)[0].tokens for p in prompts]
    eng = _engine(model, kv_cache=kind)
    first = eng.generate(prompts[:1], GREEDY)
    rest = eng.generate(prompts[1:], GREEDY)
    assert [r.tokens for r in first + rest] == want
    assert first[0].cached_tokens == 0 and all(r.cached_tokens == 48 for r in rest)
    stats = eng.prefix_cache_stats
    assert stats["cached_tokens"] == 4 * 48 and stats["cached_pages"] >= 6
    assert cold.prefix_cache_stats["cached_tokens"] == 0


def test_samples_of_one_prompt_compute_it_once(model):
    """Several requests of one prompt submitted together: the first computes the prompt, the
    others wait one step and share every page but the last one's."""
    prompt = _shared_prefix_prompts(1)[0]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=())
    eng = _engine(model)
    out = eng.generate([prompt] * 4, [dataclasses.replace(params, seed=i) for i in range(4)])
    full = (len(prompt) - 1) // 8 * 8
    assert [r.cached_tokens for r in out] == [0, full, full, full]
    assert eng.stats["prompt_tokens"] == len(prompt) + 3 * (len(prompt) - full)
    cold = _engine(model, prefix_caching=False)
    for i, r in enumerate(out):  # sampled tokens too: the same K/V, the same seeds
        assert r.tokens == cold.generate([prompt], dataclasses.replace(params, seed=i))[0].tokens


def test_shared_pages_survive_preemption_and_cancellation_and_nothing_leaks(model):
    """A pool far too small: sequences that share pages are preempted, cancelled, recomputed;
    every output equals a roomy cold engine's, and once everything ends and the cache is
    cleared every page is free again."""
    prompts = _shared_prefix_prompts(10, seed=41, prefix_len=30)
    params = SamplingParams(max_new_tokens=30, stop_token_ids=())
    roomy = _engine(model, prefix_caching=False)
    want = [roomy.generate([p], params)[0].tokens for p in prompts]
    tight = _engine(model, num_pages=16)
    rids = [tight.submit(p, params) for p in prompts]
    doomed = rids[3]
    for _ in range(3):
        tight.step()
    tight.cancel(doomed)
    tight.run(lambda: all(tight.finished(r) for r in rids))
    assert tight.stats["preemptions"] > 0 and tight.stats["cached_prompt_tokens"] > 0
    for rid, w in zip(rids, want):
        r = tight.result(rid)
        if rid == doomed:
            assert r.finish_reason == "abort"
        else:
            assert r.tokens == w
    assert tight.allocator.num_used == 0
    tight.clear_prefix_cache()
    assert tight.allocator.num_free == tight.num_pages - 1 and tight.allocator.num_cached == 0


def test_quantized_models_hit_exactly(tmp_path):
    """QoQ formats (g128 and per-channel, W4A8 with the KV4 cache): a hit gives the cold tokens."""
    from helpers import make_tiny_quant_checkpoint

    from qoq_jax.convert import quantize
    from qoq_jax.loading import load_source
    from qoq_jax.quant.config import QuantConfig

    src = make_tiny_quant_checkpoint(tmp_path / "q", "llama", seed=1)
    cfg, weights, tok, _ = load_source(str(src))
    rng = np.random.default_rng(3)
    prefix = rng.integers(3, 250, 40).tolist()
    prompts = [prefix + rng.integers(3, 250, 5).tolist() for _ in range(3)]
    for fmt in ("g128", "per-channel"):
        qmodel, _ = quantize(cfg, weights, tok, QuantConfig(method="rtn", weight_format=fmt),
                             dtype="float32", progress=False)
        cold = _engine(qmodel, kv_cache="kv4", prefix_caching=False)
        eng = _engine(qmodel, kv_cache="kv4")
        got = [eng.generate([p], GREEDY)[0] for p in prompts]
        assert [r.tokens for r in got] == [cold.generate([p], GREEDY)[0].tokens for p in prompts]
        assert got[-1].cached_tokens == 40
