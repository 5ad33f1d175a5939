"""QoQ and RTN for mixture-of-experts models (Mixtral, Qwen3-MoE; qoq_jax/moe.py and
quant/experts.py) on tiny random models that transformers builds and saves:

- a converted checkpoint (convert_hf_checkpoint) loads with W4A8 experts, generates through the
  engine, a prompt's greedy tokens are the same alone and in a batch, its logits stay close to
  the float model's, and its quantization report lists every expert;
- the quantized MoE layer equals a NumPy fake-quant reference (the router's top-k, INT8 tokens,
  each expert's dequantized W4 weights), closely enough that swapping two experts' weights
  fails it;
- the per-expert transforms (rotation with the router, up->down smoothing, reordering) keep the
  float model's function;
- the layer lowers for an abstract H100 with the grouped W4A8 Triton kernel;
- a qwen3moe GGUF reads back as the same model and quantizes.
(The float MoE models' parity with transformers: tests/test_families.py; tensor parallelism:
tests/multidevice/test_tp_moe.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (FAMILY_CONFIGS, build_family_checkpoints, make_moe_checkpoint, on_gpu,
                     write_text)

import qoq_jax
from pallas_kernels import packing
from qoq_jax.config import ModelConfig
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.loading import load_source
from qoq_jax.model import from_hf_weights, prefill
from qoq_jax.moe import W4A8ExpertLinear
from qoq_jax.quant.config import QuantConfig

MOE = ("mixtral", "qwen3moe")
prefill_jit = jax.jit(prefill, static_argnames=("all_logits",))


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    dirs, _ = build_family_checkpoints(root, {n: FAMILY_CONFIGS[n] for n in MOE})
    write_text(root / "calib.txt")
    return dirs, root


@pytest.fixture(scope="module")
def numpy_dirs(tmp_path_factory):
    """The same configs with weights written here (no oracle needed: these tests also run on
    the GPU machine, benchmarks/gpu_check.sh)."""
    root = tmp_path_factory.mktemp("moe_np")
    return {n: make_moe_checkpoint(root / n, FAMILY_CONFIGS[n], seed=5) for n in MOE}


def _qcfg(root, **kw) -> QuantConfig:
    # a small calibration and search: every step of the recipe runs, in seconds
    return QuantConfig(calib_text=[str(root / "calib.txt")], calib_samples=2, calib_seq_len=32,
                       clip_grid=4, search_grid=4, search_tokens=64, **kw)


def _prompts(seed=0):
    # 9 + 6 tokens: the batch and the second prompt alone run the same step and decode
    # programs (16-token step, 2-row decode), so the engine compiles each once
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in (9, 6)]


def _logits(model, tokens):
    cfg = model.config
    cache = PagedKVCache.zeros(cfg.num_layers, 1 + 4, 8, cfg.num_kv_heads, cfg.head_dim,
                               jnp.float32)
    toks = jnp.asarray([tokens], jnp.int32)
    out, _ = prefill_jit(model, toks, jnp.asarray([len(tokens)]), cache,
                         jnp.arange(1, 5, dtype=jnp.int32)[None], all_logits=True)
    return np.asarray(out[0])


@pytest.mark.parametrize("name,method,fmt", [("mixtral", "qoq", "g128"),
                                             ("qwen3moe", "rtn", "per-channel")])
def test_converted_moe_checkpoint_loads_and_generates(moe_dirs, tmp_path, name, method, fmt):
    """convert_hf_checkpoint's output: W4A8 experts (16-bit router), KV4, greedy tokens alone
    equal those in a batch, logits close to the float model's, every expert in the report."""
    from qoq_jax.convert import convert

    dirs, root = moe_dirs
    out = convert(str(dirs[name]), str(tmp_path / "q"), _qcfg(root, method=method,
                                                              weight_format=fmt),
                  progress=False)
    report = json.loads((out / "config.json").read_text())["quantization_report"]
    cfg = ModelConfig.from_json(dirs[name])
    assert report["formats"]["mlp.experts.down_proj"] == packing.WeightFormat.parse(
        fmt).for_input_size(cfg.moe_intermediate_size).value
    if method == "qoq":
        from qoq_jax.convert import calibration_docs
        from qoq_jax.quant.calibration import calibration_tokens

        q = _qcfg(root)
        calib = calibration_tokens(load_source(str(dirs[name]))[2],
                                   calibration_docs(q.calib_text), q.calib_samples,
                                   q.calib_seq_len, q.seed)
    for layer in report["layers"]:
        entries = layer["experts"]
        assert len(entries) == cfg.num_experts
        if method == "qoq":  # every calibration token went to its top k
            assert sum(x["tokens"] for x in entries) == calib.size * cfg.num_experts_per_tok
            assert all("smooth_down" in x or x.get("fallback") == "rtn" for x in entries)

    llm = qoq_jax.load(out, dtype="float32", max_slots=4, prefill_chunk=32, page_size=8)
    experts = llm.model.layers.mlp.experts
    assert isinstance(experts.gate_proj, W4A8ExpertLinear)
    assert experts.down_proj.weight_format.value == report["formats"]["mlp.experts.down_proj"]
    assert not isinstance(llm.model.layers.mlp.gate, W4A8ExpertLinear)  # the router: 16-bit
    assert llm.engine.kv_cache == "kv4"
    params = qoq_jax.SamplingParams(max_new_tokens=8, stop_token_ids=())
    prompts = _prompts()
    batch = llm.engine.generate(prompts, params)
    assert all(len(r.tokens) == 8 and max(r.tokens) < 260 for r in batch)
    assert llm.engine.generate([prompts[1]], params)[0].tokens == batch[1].tokens
    ref = _logits(from_hf_weights(cfg, SafetensorsCheckpoint(dirs[name])), prompts[0])
    got = _logits(llm.model, prompts[0])
    corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(got, ref)])
    assert corr > 0.9, f"{name} {method}: logits correlation with the float model {corr:.3f}"


def _numpy_int8(x):
    """Per-token symmetric INT8, dequantized as the GEMM's epilogue sees it: codes
    rint(x * 127 / amax), scale fp16(amax / 127) (pallas_kernels/quantize.py)."""
    amax = np.abs(x).max(-1, keepdims=True)
    q = np.clip(np.rint(x * np.where(amax > 0, 127 / amax, 0.0)), -127, 127)
    return q * (amax / 127).astype(np.float16).astype(np.float64)


def _numpy_gemm(fmt, x):
    """The W4A8 GEMM of one token x [K] in float64, as the format defines it: group formats
    multiply the dequantized weight by the INT8 token; per-channel subtracts szero times the
    *float* row sum (the epilogue's zero-point correction, pallas_kernels/w4a8_matmul)."""
    xq = _numpy_int8(x[None])[0]
    if isinstance(fmt, packing.W4Group):
        return packing.dequantize(fmt).astype(np.float64) @ xq
    codes = packing.codes(fmt).astype(np.float64) * np.asarray(fmt.scale, np.float64)[:, None]
    return codes @ xq - np.asarray(fmt.szero, np.float64) * x.sum()


def _numpy_moe(x, router, experts, top_k, normalize):
    """The fake-quant reference of a W4A8 MoE layer in float64: x [T, D], router [E, D],
    experts[e] = {"gate_proj": format, "up_proj": ..., "down_proj": ...}."""
    logits = x @ router.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        w = p[t, chosen[t]]
        if normalize:
            w = w / w.sum()
        for e, we in zip(chosen[t], w):
            f = experts[e]
            g, u = _numpy_gemm(f["gate_proj"], x[t]), _numpy_gemm(f["up_proj"], x[t])
            out[t] += we * _numpy_gemm(f["down_proj"], g / (1 + np.exp(-g)) * u)
    return out


def _layer0(module):
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))


@pytest.mark.parametrize("name,fmt", [("qwen3moe", "g128"), ("mixtral", "per-channel")])
def test_quantized_moe_layer_matches_a_fake_quant_reference(numpy_dirs, name, fmt):
    """Layer 0's MoE block of an RTN model, on the device's grouped GEMM (CPU: the XLA
    reference with packed weights and the CPU route's INT8 layout; GPU: the Triton kernel),
    against NumPy: route, INT8 per token, each expert's dequantized W4 weights. Swapping two
    experts' weights (a mis-routing) fails the same tolerance, so it discriminates."""
    from qoq_jax.checkpoint import build_quantized_model
    from qoq_jax.layers import int8_runtime
    from qoq_jax.quant.pipeline import quantize_weights

    cfg, weights, _, _ = load_source(str(numpy_dirs[name]))
    qcfg = QuantConfig(method="rtn", weight_format=fmt)
    tensors, qmcfg, _ = quantize_weights(cfg, weights, qcfg, progress=False)
    model = build_quantized_model(qmcfg, tensors, qcfg, jnp.float32, "auto")
    moe = _layer0(model.layers.mlp)
    moe8 = _layer0(int8_runtime(model).layers.mlp)
    assert moe8.experts.up_proj.layout == ("packed" if on_gpu() else "int8")

    def fmt_of(proj, e):
        p = "model.layers.0.mlp.experts." + proj + "."
        fields = {k: tensors[p + k][e] for k in ("qweight", "s1", "s2", "szero", "scale")
                  if p + k in tensors}
        if "s1" in fields:
            k = fields["qweight"].shape[1] * 2
            return packing.W4Group(**fields, group_size=qcfg.weight_format.for_input_size(
                k).group_size)
        return packing.W4PerChannel(**fields)

    experts = [{p: fmt_of(p, e) for p in ("gate_proj", "up_proj", "down_proj")}
               for e in range(cfg.num_experts)]
    router = np.asarray(tensors["model.layers.0.mlp.gate.weight"], np.float64)
    x = np.random.default_rng(1).standard_normal((24, cfg.hidden_size)) * 0.5
    want = _numpy_moe(x, router, experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    scale = np.abs(want).max()
    for m in (moe, moe8):
        got = np.asarray(jax.jit(lambda m, x: m(x))(m, jnp.asarray(x, jnp.float32)))
        err = np.abs(got - want).max() / scale
        # (measured ~1e-6 on CPU; the bound leaves room for a rare INT8 rounding flip)
        assert err < 2e-3, f"{name} {fmt}: relative error {err:.2e}"
    swapped = [experts[1], experts[0], *experts[2:]]
    wrong = _numpy_moe(x, router, swapped, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    assert np.abs(wrong - want).max() / scale > 20 * 2e-3


def test_moe_transforms_keep_the_function(moe_dirs):
    """Rotation (router and stacked experts), SmoothAttention (Qwen3-MoE: into its q/k norms),
    V rotation, up->down smoothing and reordering per expert leave the logits unchanged."""
    from qoq_jax.quant.calibration import calibration_tokens
    from qoq_jax.quant.pipeline import transformed_float_weights

    dirs, root = moe_dirs
    cfg, weights, tok, _ = load_source(str(dirs["qwen3moe"]))
    qcfg = _qcfg(root, search_smooth_attention=False)
    calib = calibration_tokens(tok, [(root / "calib.txt").read_text()], 4, 32, 0)
    new, new_cfg = transformed_float_weights(cfg, weights, qcfg, calib)
    before = np.asarray(weights["model.layers.0.mlp.experts.down_proj.weight"][0])
    assert not np.allclose(new["model.layers.0.mlp.experts.down_proj.weight"][0], before)
    prompt = _prompts()[0]
    ref = _logits(from_hf_weights(cfg, weights), prompt)
    got = _logits(from_hf_weights(new_cfg, new), prompt)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_quantized_moe_layer_lowers_for_h100_on_the_grouped_kernel(numpy_dirs, backend):
    """On a GPU the experts run the grouped W4A8 Triton kernel (the backend a model fixes
    once, as for its dense layers; "mosaic", Hopper's dense GEMM, has no grouped kernel and
    runs the Triton one), their activations the Pallas quantize kernels: the layer lowers
    for CUDA under an abstract H100 with those kernels in it."""
    from helpers import TRITON_CALL, lower_for_h100

    from qoq_jax.checkpoint import build_quantized_model
    from qoq_jax.quant.pipeline import quantize_weights

    cfg, weights, _, _ = load_source(str(numpy_dirs["qwen3moe"]))
    qcfg = QuantConfig(method="rtn")
    tensors, qmcfg, _ = quantize_weights(cfg, weights, qcfg, progress=False)
    moe = _layer0(build_quantized_model(qmcfg, tensors, qcfg, jnp.bfloat16, backend).layers.mlp)
    assert moe.experts.gate_proj.gemm_backend == backend
    graphdef, state = nnx.split(moe)
    hlo = lower_for_h100(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jnp.zeros((40, cfg.hidden_size), jnp.bfloat16))
    assert TRITON_CALL in hlo
    assert "grouped_w4a8_g" in hlo  # the kernel's name (g64 here: F = 64)


def test_qwen3moe_gguf_reads_as_the_same_model_and_quantizes(numpy_dirs, tmp_path):
    """A qwen3moe GGUF (the gguf package's writer, llama.cpp's names: ffn_gate_inp, the
    experts stacked as ffn_{gate,up,down}_exps) reads back as the safetensors model (same
    config, the same stacked tensors) and quantizes (RTN) from the .gguf path."""
    import dataclasses

    import gguf

    from qoq_jax.gguf import read_gguf
    from qoq_jax.hf import canonical_weights
    from qoq_jax.quant.pipeline import quantize_weights

    d = numpy_dirs["qwen3moe"]
    hf = json.loads((d / "config.json").read_text())
    cfg = dataclasses.replace(ModelConfig.from_json(d), norm_topk_prob=True)  # llama.cpp's rule
    weights = canonical_weights(cfg, SafetensorsCheckpoint(d))
    path = tmp_path / "qwen3moe.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, value in ((w.add_block_count, cfg.num_layers),
                       (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size),
                       (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_expert_feed_forward_length, cfg.moe_intermediate_size),
                       (w.add_expert_count, cfg.num_experts),
                       (w.add_expert_used_count, cfg.num_experts_per_tok),
                       (w.add_head_count, cfg.num_heads), (w.add_head_count_kv, cfg.num_kv_heads),
                       (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                       (w.add_rope_freq_base, cfg.rope_theta),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                       (w.add_vocab_size, cfg.vocab_size), (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, [f"t{i}" for i in range(cfg.vocab_size)]),
                       (w.add_token_types, [1] * cfg.vocab_size),
                       (w.add_bos_token_id, hf["bos_token_id"]),
                       (w.add_eos_token_id, hf["eos_token_id"]),
                       (w.add_pad_token_id, hf["pad_token_id"])):
        add(value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
             "model.norm.weight": "output_norm.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate": "ffn_gate_inp", "mlp.experts.gate_proj": "ffn_gate_exps",
             "mlp.experts.up_proj": "ffn_up_exps", "mlp.experts.down_proj": "ffn_down_exps"}
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
    assert dataclasses.replace(got_cfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
    assert set(got) == set(weights)
    for name in weights:
        np.testing.assert_array_equal(got[name], weights[name], err_msg=name)
    src_cfg, src_weights, _, _ = load_source(str(path), progress=False)
    tensors, _, report = quantize_weights(src_cfg, src_weights, QuantConfig(method="rtn"),
                                          progress=False)
    assert tensors["model.layers.1.mlp.experts.down_proj.qweight"].shape == (
        cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size // 2)
    assert len(report.layers[1]["experts"]) == cfg.num_experts
