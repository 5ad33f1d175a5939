"""Tensor parallelism on 8 CPU devices: TP = 2 and 4 generate what one device does.

Run through tests/test_tensor_parallel.py (a fresh process with 8 CPU devices).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import make_tiny_checkpoint, random_hf_weights, write_byte_tokenizer
from qoq_jax import sharding
from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine
from qoq_jax.hf import SafetensorsCheckpoint, save_safetensors
from qoq_jax.kv_cache import make_cache
from qoq_jax.model import TokenBatch, forward, from_hf_weights
from qoq_jax.sampling import SamplingParams

# W4A8 needs N % 64 per device (column-parallel) and K on group boundaries (row-parallel):
# at TP 4, k/v_proj have 4 x 64 outputs and o/down_proj 512 inputs (128 per device, g128)
TP_QUANT_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=260, hidden_size=128,
    intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    max_position_embeddings=512, bos_token_id=256, eos_token_id=257)

ENGINE = dict(page_size=8, decode_steps=8, max_slots=2, prefill_chunk=16, num_pages=24)
PARAMS = SamplingParams(max_new_tokens=6, logprobs=1, stop_token_ids=())


def test_eight_devices():
    assert jax.device_count() == 8


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, 11).tolist(), rng.integers(3, vocab, 12).tolist()]


def _generate(engine, vocab):
    res = engine.generate(_prompts(vocab), PARAMS)
    return [r.tokens for r in res], np.array([[e["logprob"] for e in r.logprobs] for r in res])


def _spec(array):
    return tuple(array.sharding.spec)


def test_float_model_engine_tp_1_2_4_agree(tmp_path):
    """Untied lm_head, biases on every projection (row-parallel ones added after the psum),
    16-bit cache; the weights read straight into their shards (from_hf_weights(mesh=))."""
    d = make_tiny_checkpoint(tmp_path / "llama_bias", "llama_bias", seed=1,
                             num_attention_heads=4, num_key_value_heads=4)
    cfg = ModelConfig.from_json(d)
    want = None
    for tp in (1, 2, 4):
        mesh = sharding.make_mesh(tp)
        model = from_hf_weights(cfg, SafetensorsCheckpoint(d), mesh=mesh)
        if tp > 1:
            assert _spec(model.layers.self_attn.o_proj.weight[...]) == (None, None, "tp")
            assert _spec(model.lm_head.weight[...]) == ("tp", None)
        got = _generate(Engine(model, mesh=mesh, kv_cache="16bit", **ENGINE), cfg.vocab_size)
        if want is None:
            want = got
        else:
            assert got[0] == want[0], f"TP {tp}"
            np.testing.assert_allclose(got[1], want[1], atol=1e-4, err_msg=f"TP {tp}")


def test_prefix_cache_hits_under_tp_equal_a_cold_single_device(tmp_path):
    """Prefix caching with TP 2 (KV4 pools split by KV head): requests sharing a 24-token
    prefix reuse its pages, and their tokens equal one device's without prefix caching."""
    d = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=3, num_attention_heads=8,
                             num_key_value_heads=4)
    cfg = ModelConfig.from_json(d)
    rng = np.random.default_rng(5)
    shared = rng.integers(3, cfg.vocab_size, 24).tolist()
    prompts = [shared + rng.integers(3, cfg.vocab_size, 3 + i).tolist() for i in range(3)]
    mesh = sharding.make_mesh(2)
    tp = Engine(from_hf_weights(cfg, SafetensorsCheckpoint(d), mesh=mesh), mesh=mesh,
                kv_cache="kv4", **ENGINE)
    first = tp.generate(prompts[:1], PARAMS)
    rest = tp.generate(prompts[1:], PARAMS)
    assert first[0].cached_tokens == 0 and [r.cached_tokens for r in rest] == [24, 24]
    cold = Engine(from_hf_weights(cfg, SafetensorsCheckpoint(d)), kv_cache="kv4",
                  prefix_caching=False, **ENGINE)
    for p, r in zip(prompts, first + rest):
        assert r.tokens == cold.generate([p], PARAMS)[0].tokens


def _prefill_logits(model, tp, kind):
    cfg = model.config
    mesh = sharding.make_mesh(tp)
    tokens = jnp.asarray(np.array(_prompts(cfg.vocab_size)[0] * 2).reshape(2, 11), jnp.int32)
    cache = make_cache(kind, cfg.num_layers, 9, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    table = jnp.arange(1, 9, dtype=jnp.int32).reshape(2, 4)  # each row its own pages

    @jax.jit
    def run(state, cache):
        batch = TokenBatch.padded(tokens, jnp.zeros(2, jnp.int32), jnp.array([11, 7], jnp.int32),
                                  table)
        logits, _ = forward(nnx.merge(graphdef, state), batch, cache, all_logits=True,
                            mesh=mesh)
        return jax.nn.log_softmax(logits).reshape(2, 11, -1)

    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = sharding.shard_state(state, mesh)
        cache = jax.device_put(cache, sharding.cache_sharding(mesh, cache))
    return np.asarray(run(state, cache))


def test_float_tied_gqa_model_tp_1_2_4_agree_kv4(tmp_path):
    """Tied embeddings (one vocabulary-split table for lookup and logits), GQA 2, q/k/v
    biases, KV4 pools split by KV head: the log-probabilities of every position."""
    d = make_tiny_checkpoint(tmp_path / "qwen2", "qwen2", seed=2, num_attention_heads=8,
                             num_key_value_heads=4)
    model = from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d))
    want = _prefill_logits(model, 1, "kv4")
    for tp in (2, 4):
        np.testing.assert_allclose(_prefill_logits(model, tp, "kv4"), want, atol=1e-4,
                                   err_msg=f"TP {tp}")


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "llama_tp"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TP_QUANT_CONFIG))
    cfg = ModelConfig.from_hf_dict(TP_QUANT_CONFIG)
    save_safetensors(random_hf_weights(cfg, 4, std=0.05), path)
    write_byte_tokenizer(path)
    return path


def _rtn(path, weight_format):
    from qoq_jax.convert import quantize
    from qoq_jax.loading import load_source
    from qoq_jax.quant.config import QuantConfig

    cfg, weights, tok, _ = load_source(str(path))
    model, _ = quantize(cfg, weights, tok, QuantConfig(method="rtn", weight_format=weight_format),
                        dtype="float32", progress=False)
    return model


def test_quantized_checkpoint_g128_kv4_tp_1_2_4_agree(quant_dir, tmp_path):
    """A converted W4A8 g128 checkpoint through qoq_jax.load(tensor_parallel=N): Orbax restores
    it straight into the sharded layout, and the engine (KV4 cache) generates the same tokens.
    The INT8 codes are the same at every TP size (row-parallel inputs are quantized with the
    whole row's scale), so only float summation order differs."""
    import qoq_jax
    from qoq_jax.convert import convert
    from qoq_jax.quant.config import QuantConfig

    out = convert(str(quant_dir), str(tmp_path / "ckpt"), QuantConfig(method="rtn"),
                  progress=False)
    want = None
    for tp in (1, 2, 4):
        llm = qoq_jax.load(out, dtype="float32", tensor_parallel=tp, **ENGINE)
        assert llm.engine.kv_cache == "kv4" and llm.engine.tensor_parallel == tp
        if tp > 1:  # restored sharded, not placed afterwards
            assert _spec(llm.model.layers.mlp.down_proj.s2[...]) == (None, "tp", None)
            assert _spec(llm.model.layers.self_attn.k_proj.qweight[...]) == (None, "tp", None)
        got = _generate(llm.engine, 256)
        if want is None:
            want = got
        else:
            assert got[0] == want[0], f"TP {tp}"
            np.testing.assert_allclose(got[1], want[1], atol=1e-4, err_msg=f"TP {tp}")


def test_quantized_per_channel_tp_1_2_4_agree_16bit(quant_dir):
    """Per-channel W4A8, 16-bit cache. Its epilogue subtracts szero * row_sum from a product
    of about the same size, so float rounding is amplified: here a 2-ulp change of the
    embeddings alone moves the one-device log-probabilities by ~0.07-0.2 (INT8 codes flip).
    Each TP size is checked against twice that sensitivity, not a fixed float tolerance (the
    same test's g128 model agrees to 1e-6: the split itself adds no error of its own)."""
    model = _rtn(quant_dir, "per-channel")
    want = _prefill_logits(model, 1, "16bit")
    g, st = nnx.split(model)
    st = jax.tree.map(lambda a: a * (1 + 2**-22) if a.shape == (260, 128) else a, st)
    sensitivity = np.abs(_prefill_logits(nnx.merge(g, st), 1, "16bit") - want).max()
    assert sensitivity > 1e-3  # the premise of this test
    for tp in (2, 4):
        got = _prefill_logits(model, tp, "16bit")
        assert np.abs(got - want).max() <= 2 * sensitivity, f"TP {tp}"
        # the greedy tokens of the real positions agree, except at a near-tie (the top two
        # log-probabilities within the tolerance above)
        top2 = np.sort(want[0], axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * sensitivity
        assert clear.sum() >= len(clear) // 2
        np.testing.assert_array_equal(got[0].argmax(-1)[clear], want[0].argmax(-1)[clear])


@pytest.mark.parametrize("weight_format", ["per-channel", "g128"])
def test_row_parallel_w4a8_gemm_splits_k_exactly(quant_dir, weight_format):
    """o_proj split over K on 4 devices: each shard's INT8 codes are the unsplit row's, and
    the shards' epilogues (per-channel: each subtracts szero * its own row sum) add up to the
    unsplit output."""
    from pallas_kernels.quantize import quantize_per_token, quantize_sharded_rows

    model = _rtn(quant_dir, weight_format)
    stacked = model.layers.self_attn.o_proj
    graphdef = nnx.graphdef(stacked)
    o_proj = jax.tree.map(lambda a: a[0], nnx.state(stacked))  # layer 0
    x = jax.random.normal(jax.random.key(0), (6, 512), jnp.float32) * 3.0

    want = np.asarray(nnx.merge(graphdef, o_proj)(x))
    want_codes = quantize_per_token(x).values

    mesh = sharding.make_mesh(4)
    leaves, treedef = jax.tree.flatten(o_proj)
    specs = [sharding.spec_for(sharding.logical_axes(
        ("o_proj",) + tuple(sharding._key_name(k) for k in kp), leaf.ndim))
        for kp, leaf in jax.tree_util.tree_flatten_with_path(o_proj)[0]]

    def local(leaves, x):
        lin = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        act = quantize_sharded_rows(x, sharding.AXIS, with_sum=lin.needs_row_sum)
        return lin.finish(jax.lax.psum(lin.product(act), sharding.AXIS)), act.values

    y, codes = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, P(None, "tp")),
                                     out_specs=(P(), P(None, "tp")), check_vma=False))(leaves, x)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want_codes))
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
