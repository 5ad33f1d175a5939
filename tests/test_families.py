"""Qwen3, Phi-3, Mixtral and Qwen3-MoE against transformers, on tiny random models that transformers itself builds
and saves (sharded safetensors with an index; Phi-3 with its fused qkv_proj / gate_up_proj):
prefill and decode logits (16-bit and KV4 caches), greedy generation through the engine, QoQ's
transforms keep the function (Qwen3's q/k norms with SmoothAttention), QoQ and RTN
checkpoints load and generate batch-invariantly, and a Qwen3 GGUF reads as the same model.
(Quantized MoE models: tests/test_moe_quant.py.)"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAMILY_CONFIGS, build_family_checkpoints, write_text

import qoq_jax
from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine
from qoq_jax.hf import SafetensorsCheckpoint, canonical_weights
from qoq_jax.kv_cache import PagedKV4Cache, PagedKVCache
from qoq_jax.loading import load_source
from qoq_jax.model import decode_step, from_hf_weights, prefill

FAMILIES = ("qwen3", "phi3", "mixtral", "qwen3moe")
MOE = ("mixtral", "qwen3moe")
# Phi-3 (context 256, original 32) runs LongRoPE's long table (config.rope_tables), as
# transformers does for sequences longer than the original context: its prompts are longer.
PROMPT_LENGTHS = {"qwen3": (40, 9, 25), "phi3": (40, 33, 45), "mixtral": (30, 7, 19),
                  "qwen3moe": (21, 12, 36)}
DECODE_LENGTH, PREFIX = 48, 33
NEW_TOKENS = 16

prefill_jit = jax.jit(prefill, static_argnames=("all_logits",))
decode_jit = jax.jit(decode_step)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(3)
    prompts = {n: [rng.integers(0, 256, k).tolist() for k in PROMPT_LENGTHS[n]] for n in FAMILIES}
    long = {n: [rng.integers(0, 256, DECODE_LENGTH).tolist() for _ in range(2)] for n in FAMILIES}

    def jobs(dirs):
        for n, d in dirs.items():
            yield {"kind": "logits", "name": f"{n}-logits", "model": str(d), "tokens": prompts[n]}
            yield {"kind": "decode_logits", "name": f"{n}-decode", "model": str(d),
                   "tokens": long[n], "prefix": PREFIX}
            yield {"kind": "greedy", "name": f"{n}-greedy", "model": str(d),
                   "prompts": prompts[n], "max_new_tokens": NEW_TOKENS}

    dirs, out = build_family_checkpoints(root, {n: FAMILY_CONFIGS[n] for n in FAMILIES}, jobs)
    return {n: dict(dir=dirs[n], prompts=prompts[n], long=long[n],
                    logits=np.load(out / f"{n}-logits.npz"),
                    decode=np.load(out / f"{n}-decode.npz"),
                    greedy=json.loads((out / f"{n}-greedy.json").read_text()))
            for n in FAMILIES}, root


def _load(d):
    cfg = ModelConfig.from_json(d)
    return from_hf_weights(cfg, SafetensorsCheckpoint(d), jnp.float32)


def _cache(cfg, kind, batch, max_len, page_size=8):
    per = -(-max_len // page_size)
    cls = PagedKV4Cache if kind == "kv4" else PagedKVCache
    cache = cls.zeros(cfg.num_layers, 1 + batch * per, page_size, cfg.num_kv_heads,
                      cfg.head_dim, jnp.float32)
    return cache, jnp.asarray(1 + np.arange(batch * per, dtype=np.int32).reshape(batch, per))


def _tol(ref, kind="16bit"):
    # 16-bit: fp32 rounding (as tests/test_parity.py); KV4: the cache's 4-bit rounding of K/V
    return (2e-6 if kind == "16bit" else 0.15) * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_layout_as_transformers_writes_it(built, name):
    d = built[0][name]["dir"]
    assert (d / "model.safetensors.index.json").exists()  # sharded
    raw = SafetensorsCheckpoint(d)
    cfg = ModelConfig.from_json(d)
    fused = "model.layers.0.self_attn.qkv_proj.weight" in raw
    assert fused == (name == "phi3")
    view = canonical_weights(cfg, raw)
    if name in MOE:  # one tensor per expert in the checkpoint, stacked [E, F, D] in the view
        per_expert = ("model.layers.1.block_sparse_moe.experts.3.w3.weight" if name == "mixtral"
                      else "model.layers.1.mlp.experts.3.up_proj.weight")
        stacked = view["model.layers.1.mlp.experts.up_proj.weight"]
        assert stacked.shape == (4, cfg.moe_intermediate_size, cfg.hidden_size)
        np.testing.assert_array_equal(stacked[3], raw[per_expert])
        assert view["model.layers.1.mlp.gate.weight"].shape == (4, cfg.hidden_size)
        assert per_expert not in view
    q = view["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    assert "model.layers.0.self_attn.qkv_proj.weight" not in view
    if fused:  # q, k, v are the fused tensor's row blocks, gate and up its halves
        qkv = raw["model.layers.0.self_attn.qkv_proj.weight"]
        k = view["model.layers.0.self_attn.k_proj.weight"]
        np.testing.assert_array_equal(qkv[:q.shape[0]], q)
        np.testing.assert_array_equal(qkv[q.shape[0]:q.shape[0] + k.shape[0]], k)
        gu = raw["model.layers.0.mlp.gate_up_proj.weight"]
        np.testing.assert_array_equal(gu[cfg.intermediate_size:],
                                      view["model.layers.0.mlp.up_proj.weight"])
        assert cfg.rope_scaling["rope_type"] == "longrope"
    elif name != "mixtral":
        assert cfg.qk_norm and "model.layers.1.self_attn.k_norm.weight" in view


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_logits_match_transformers(built, name):
    case = built[0][name]
    model = _load(case["dir"])
    toks = case["prompts"]
    t = max(len(x) for x in toks)
    batch = np.zeros((len(toks), t), np.int32)
    for i, x in enumerate(toks):
        batch[i, :len(x)] = x
    cache, table = _cache(model.config, "16bit", len(toks), t)
    logits, _ = prefill_jit(model, jnp.asarray(batch), jnp.asarray([len(x) for x in toks]),
                            cache, table, all_logits=True)
    for i, x in enumerate(toks):
        ref = case["logits"][str(i)]
        err = np.abs(np.asarray(logits[i, :len(x)]) - ref).max()
        assert err < _tol(ref), f"{name} prompt {i}: max abs diff {err}"


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_decode_logits_match_transformers(built, name, kind):
    """A prefix in one call, then one token per call through the paged cache, as transformers'
    generate computes them."""
    case = built[0][name]
    model = _load(case["dir"])
    toks = np.asarray(case["long"], np.int32)
    b = len(toks)
    cache, table = _cache(model.config, kind, b, DECODE_LENGTH)
    logits, cache = prefill_jit(model, jnp.asarray(toks[:, :PREFIX]),
                                jnp.full((b,), PREFIX, jnp.int32), cache, table)
    rows = [np.asarray(logits)]
    for pos in range(PREFIX, DECODE_LENGTH):
        logits, cache = decode_jit(model, jnp.asarray(toks[:, pos]), jnp.full((b,), pos, jnp.int32),
                                   jnp.ones((b,), bool), cache, table)
        rows.append(np.asarray(logits))
    got = np.stack(rows, axis=1)  # [B, 1 + decoded, V]
    for i in range(b):
        ref = case["decode"][str(i)][PREFIX - 1:]
        err = np.abs(got[i] - ref).max()
        assert err < _tol(ref, kind), f"{name} {kind} seq {i}: max abs diff {err}"
        if kind == "kv4":  # rounding noise, not a different model: the argmax mostly agrees
            assert (got[i].argmax(-1) == ref.argmax(-1)).mean() > 0.75


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_greedy_matches_transformers(built, name):
    """16 greedy tokens of each prompt, the prompts batched in the engine, equal transformers'
    generate of each prompt alone; the KV4 engine gives the same tokens alone and batched."""
    case = built[0][name]
    model = _load(case["dir"])
    params = qoq_jax.SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=())
    eng = Engine(model, kv_cache="16bit", max_slots=4, prefill_chunk=32, page_size=8)
    for prompt, res, ref in zip(case["prompts"], eng.generate(case["prompts"], params),
                                case["greedy"]):
        assert res.tokens[:len(ref)] == ref, f"{name}: prompt of {len(prompt)} tokens"
    if name in MOE:  # (the batch above against each prompt alone covers the routing; one
        return       # engine per MoE model keeps CI's compilation time down)
    kv4 = Engine(model, kv_cache="kv4", max_slots=4, prefill_chunk=32, page_size=8)
    batch = kv4.generate(case["prompts"], params)
    assert kv4.generate(case["prompts"][:1], params)[0].tokens == batch[0].tokens
    assert all(len(r.tokens) == NEW_TOKENS for r in batch)


def _qcfg(root, **kw):
    from qoq_jax.quant.config import QuantConfig

    text = write_text(root / "calib.txt")
    # a small calibration and search: the recipe's steps all run, in seconds
    return QuantConfig(calib_text=[str(text)], calib_samples=2, calib_seq_len=32, clip_grid=4,
                       search_grid=4, search_tokens=64, **kw)


@pytest.mark.parametrize("name", ("qwen3", "phi3"))
def test_qoq_transforms_keep_the_function(built, name):
    """Rotation, SmoothAttention (for Qwen3 folded into its q/k norms), V rotation, up->down
    smoothing and reordering leave the float model's logits unchanged."""
    from qoq_jax.quant.calibration import calibration_tokens
    from qoq_jax.quant.pipeline import transformed_float_weights

    cases, root = built
    case = cases[name]
    cfg, weights, tok, _ = load_source(str(case["dir"]))
    qcfg = _qcfg(root, search_smooth_attention=False)  # its fixed alpha 0.5: lambda != 1
    calib = calibration_tokens(tok, [(root / "calib.txt").read_text()], 4, 32, 0)
    new, new_cfg = transformed_float_weights(cfg, weights, qcfg, calib)
    assert new_cfg.key_rotation
    if name == "qwen3":  # the lambda went into the norms, one per channel for all heads
        assert not np.allclose(new["model.layers.0.self_attn.k_norm.weight"],
                               weights["model.layers.0.self_attn.k_norm.weight"])
    ref_model, new_model = _load(case["dir"]), from_hf_weights(new_cfg, new, jnp.float32)
    toks = np.asarray(case["prompts"][0], np.int32)[None]
    outs = []
    for m in (ref_model, new_model):
        cache, table = _cache(m.config, "16bit", 1, toks.shape[1])
        outs.append(np.asarray(prefill_jit(m, jnp.asarray(toks), jnp.asarray([toks.shape[1]]),
                                           cache, table, all_logits=True)[0]))
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-4 * np.abs(outs[0]).max())


@pytest.mark.parametrize("name,method,fmt", [("qwen3", "qoq", "g128"),
                                             ("phi3", "rtn", "per-channel")])
def test_converted_checkpoint_loads_and_generates(built, tmp_path, name, method, fmt):
    """convert_hf_checkpoint's output loads (W4A8, KV4), generates close to the float model,
    and a prompt's greedy tokens are the same alone and in a batch."""
    from qoq_jax.convert import convert
    from qoq_jax.layers import W4A8Linear

    cases, root = built
    case = cases[name]
    out = convert(str(case["dir"]), str(tmp_path / "q"), _qcfg(root, method=method,
                                                               weight_format=fmt),
                  progress=False)
    llm = qoq_jax.load(out, dtype="float32", max_slots=4, prefill_chunk=32, page_size=8)
    assert isinstance(llm.model.layers.self_attn.q_proj, W4A8Linear)
    assert llm.model.config.architecture == ModelConfig.from_json(case["dir"]).architecture
    assert llm.model.config.qk_norm == (name == "qwen3")
    params = qoq_jax.SamplingParams(max_new_tokens=8, stop_token_ids=())
    prompts = case["prompts"]
    batch = llm.engine.generate(prompts, params)
    assert all(len(r.tokens) == 8 and max(r.tokens) < 260 for r in batch)
    assert llm.engine.generate([prompts[1]], params)[0].tokens == batch[1].tokens
    # close to the float model: its next-token logits agree in direction
    cache, table = _cache(llm.model.config, "16bit", 1, len(prompts[0]))
    toks = jnp.asarray([prompts[0]], jnp.int32)
    q_logits = np.asarray(prefill_jit(llm.model, toks, jnp.asarray([len(prompts[0])]), cache,
                                      table, all_logits=True)[0][0])
    ref = case["logits"]["0"]
    corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(q_logits, ref)])
    assert corr > 0.9, f"{name} {method}: logits correlation with the float model {corr:.3f}"


def test_qwen3_gguf_reads_as_the_same_model(built, tmp_path):
    """A qwen3 GGUF (written with the gguf package, float32 tensors, llama.cpp's names) reads
    back as the safetensors model: the same config and tensors."""
    import gguf

    from qoq_jax.gguf import read_gguf

    d = built[0]["qwen3"]["dir"]
    cfg = ModelConfig.from_json(d)
    hf = json.loads((d / "config.json").read_text())
    weights = SafetensorsCheckpoint(d)
    path = tmp_path / "qwen3.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"])
    w.add_pad_token_id(hf["pad_token_id"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    for i in range(cfg.num_layers):
        for ours, theirs in layer.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    assert set(names) == set(weights)
    for ours, theirs in names.items():
        w.add_tensor(theirs, np.ascontiguousarray(weights[ours], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got_cfg, _, got, _ = read_gguf(path, progress=False)
    assert got_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)  # GGUF stores a float32
    assert dataclasses.replace(got_cfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
    assert set(got) == set(weights)
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name], err_msg=name)


def test_longrope_table_follows_the_served_context():
    """LongRoPE's long table and attention factor for a context past the original one (as
    transformers' formulas give them), the short table for a context within it."""
    from qoq_jax.config import rope_tables

    hf = dict(FAMILY_CONFIGS["phi3"])
    long_cfg = ModelConfig.from_hf_dict(hf)
    short_cfg = ModelConfig.from_hf_dict({**hf, "max_position_embeddings": 32})
    hd = long_cfg.head_dim
    base = 10000.0 ** (np.arange(0, hd, 2) / hd)
    for cfg, key, factor in ((long_cfg, "long_factor", np.sqrt(1 + np.log(8) / np.log(32))),
                             (short_cfg, "short_factor", 1.0)):
        inv, att = rope_tables(cfg)
        np.testing.assert_allclose(inv, 1 / (np.asarray(hf["rope_scaling"][key]) * base),
                                   rtol=1e-6)
        assert att == pytest.approx(factor)
    su = ModelConfig.from_hf_dict({**hf, "rope_scaling": {**hf["rope_scaling"], "type": "su"}})
    assert su.rope_scaling == long_cfg.rope_scaling  # Phi-3's older name for it


def test_moe_configs_follow_transformers_rules():
    """Mixtral renormalises its top-k weights, Qwen3-MoE when norm_topk_prob says so; a
    Qwen3-MoE whose decoder_sparse_step / mlp_only_layers leave dense layers among the expert
    layers is refused by name. (Quantizing MoE models: tests/test_moe_quant.py.)"""
    from qoq_jax.config import UnsupportedModelError

    mixtral = ModelConfig.from_hf_dict(FAMILY_CONFIGS["mixtral"])
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (4, 2, True)
    assert mixtral.moe_intermediate_size == FAMILY_CONFIGS["mixtral"]["intermediate_size"]
    q = FAMILY_CONFIGS["qwen3moe"]
    assert not ModelConfig.from_hf_dict(q).norm_topk_prob
    assert ModelConfig.from_hf_dict({**q, "norm_topk_prob": True}).norm_topk_prob
    for mixed in ({"decoder_sparse_step": 2}, {"mlp_only_layers": [0]}):
        with pytest.raises(UnsupportedModelError, match="dense layers among the expert"):
            ModelConfig.from_hf_dict({**q, **mixed})
