"""QoQ: Hadamard rotation, function-preserving transforms, clipping, GPTQ, the pipeline."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CONFIGS, make_tiny_checkpoint, make_tiny_quant_checkpoint, numpy_kv4

from pallas_kernels import packing
from pallas_kernels.packing import WeightFormat
from qoq_jax.config import ModelConfig
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import from_hf_weights, prefill
from qoq_jax.quant import gptq
from qoq_jax.quant.clipping import clip_ratios, search_group, search_per_channel
from qoq_jax.quant.config import QuantConfig
from qoq_jax.quant.hadamard import hadamard, rotation_matrix
from qoq_jax.quant.pipeline import transformed_float_weights

ALL_STEPS = dict(rotate=True, rotate_v=True, rotate_k=True, smooth_attention=True,
                 smooth_rotated_keys=True, smooth_out=True, smooth_down=True, reorder=True)
NO_STEPS = {k: False for k in ALL_STEPS}


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 44, 48, 60, 64, 576, 896, 960, 1536])
def test_hadamard_is_orthogonal(n):
    h = hadamard(n).astype(np.int64)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))
    r = rotation_matrix(n)
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)


def test_hadamard_unsupported_size_is_named():
    with pytest.raises(ValueError, match="order 52"):
        hadamard(52)


def _logits(cfg, weights, tokens):
    model = from_hf_weights(cfg, weights, jnp.float32)
    b, t = tokens.shape
    per = -(-t // 8)
    cache = PagedKVCache.zeros(cfg.num_layers, 1 + b * per, 8, cfg.num_kv_heads, cfg.head_dim,
                               jnp.float32)
    table = jnp.asarray(1 + np.arange(b * per, dtype=np.int32).reshape(b, per))
    fn = jax.jit(prefill, static_argnames="all_logits")
    return np.asarray(fn(model, jnp.asarray(tokens), jnp.full((b,), t, jnp.int32), cache, table,
                         all_logits=True)[0])


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("step", ["rotate", "rotate_v", "rotate_k", "smooth_attention",
                                  "smooth_rotated_keys", "smooth_out", "smooth_down", "reorder",
                                  "all"])
def test_transforms_preserve_the_function(tmp_path, name, step):
    d = make_tiny_checkpoint(tmp_path / name, name, seed=5)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    rng = np.random.default_rng(0)
    calib = rng.integers(0, cfg.vocab_size, (4, 24)).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    steps = ALL_STEPS if step == "all" else {**NO_STEPS, step: True}
    if step == "smooth_rotated_keys":  # it scales the keys rotate_k rotates
        steps["rotate_k"] = True
    # fixed strengths: these shapes (K = 48, ...) have no W4 format for the searches to score
    qcfg = QuantConfig(**steps, smooth_alpha=0.5, smooth_beta=0.5, search_smoothing=False,
                       search_smooth_attention=False)
    new_w, new_cfg = transformed_float_weights(cfg, weights, qcfg, calib)
    changed = [k for k in new_w if k in weights and not np.allclose(new_w[k], weights[k])]
    if step == "rotate_k":  # no weight changes: the model rotates q and k as it runs
        assert not changed and new_cfg.key_rotation and not cfg.key_rotation
        assert not new_cfg.key_scale and not any(k.endswith("key_scale") for k in new_w)
    elif step == "smooth_rotated_keys":  # a new per-layer tensor; the model applies it
        assert not changed and new_cfg.key_rotation and new_cfg.key_scale
        scales = [new_w[f"model.layers.{i}.self_attn.key_scale"] for i in range(cfg.num_layers)]
        assert all(s.shape == (cfg.num_kv_heads, cfg.head_dim) for s in scales)
        assert not np.allclose(scales[0], 1.0), "the scales are all ones"
    else:
        assert changed, "the transform changed nothing"
    base = _logits(cfg, weights, tokens)
    got = _logits(new_cfg, new_w, tokens)
    assert np.abs(got - base).max() < 2e-5 * np.abs(base).max()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_searched_transforms_preserve_the_function(tmp_path, name):
    """With the strengths searched per layer (on W4 shapes), the float model is unchanged."""
    d = make_tiny_quant_checkpoint(tmp_path / name, name, seed=6)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    rng = np.random.default_rng(1)
    calib = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    qcfg = QuantConfig(**ALL_STEPS, search_grid=4, search_tokens=64)
    new_w, new_cfg = transformed_float_weights(cfg, weights, qcfg, calib)
    base = _logits(cfg, weights, tokens)
    got = _logits(new_cfg, new_w, tokens)
    assert np.abs(got - base).max() < 2e-5 * np.abs(base).max()


def test_smoothing_rescales_the_measured_statistics(tmp_path):
    """The pipeline runs a layer once: after v->o and up->down smoothing, o_proj's and
    down_proj's input maxima and Hessians are the measured ones divided by lambda. Running the
    smoothed layer again must measure the same."""
    from qoq_jax.quant import transforms
    from qoq_jax.quant.calibration import run_layer
    from qoq_jax.quant.pipeline import layer_weight_names

    d = make_tiny_quant_checkpoint(tmp_path / "m", "mistral", seed=3)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    w = {n: np.asarray(weights[f"model.layers.1.{n}"], np.float64) for n in layer_weight_names(cfg)}
    x = np.random.default_rng(0).standard_normal((3, 16, cfg.hidden_size)).astype(np.float32)
    y, st = run_layer(w, cfg, x, hessians=True)
    w2, lam_o = transforms.smooth_out(w, cfg, st.o_absmax, 0.4, 0.6)
    w2, lam_d = transforms.smooth_down(w2, st.down_absmax, 0.3, 0.7)
    y2, st2 = run_layer(w2, cfg, x, hessians=True)
    np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st2.o_absmax, st.o_absmax / lam_o, rtol=1e-4)
    np.testing.assert_allclose(st2.down_absmax, st.down_absmax / lam_d, rtol=1e-4)
    for name, lam in (("o", lam_o), ("down", lam_d)):
        h = st.hessians[name] / np.outer(lam, lam)
        np.testing.assert_allclose(st2.hessians[name], h, rtol=1e-3, atol=1e-3 * np.abs(h).max())
    for name in ("qkv", "gate_up"):
        h = st.hessians[name]
        np.testing.assert_allclose(st2.hessians[name], h, rtol=1e-4, atol=1e-5 * np.abs(h).max())


def test_quantized_inputs_calibrate_each_layer_on_the_quantized_layers_before(tmp_path,
                                                                            monkeypatch):
    """quantized_inputs (GPTQ's sequential mode): layer i + 1 is calibrated on what layer i
    computes with the W4 weights it was just given, not on its float output."""
    from qoq_jax.quant import pipeline
    from qoq_jax.quant.calibration import run_layer

    d = make_tiny_quant_checkpoint(tmp_path / "m", "mistral", seed=4)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    calib = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 32)).astype(np.int32)
    calls = []

    def recording(w, cfg, x, **kw):
        y, st = run_layer(w, cfg, x, **kw)
        calls.append((w, x, y))
        return y, st

    monkeypatch.setattr(pipeline, "run_layer", recording)
    qcfg = QuantConfig(quantized_inputs=True, search_grid=4, search_tokens=32)
    out, _, _ = pipeline.quantize_weights(cfg, weights, qcfg, calib, progress=False)
    assert len(calls) == 2 * cfg.num_layers  # the statistics pass, then the quantized layer
    for i in range(cfg.num_layers):
        (_, x_stats, y_float), (w_q, x_q, y_q) = calls[2 * i], calls[2 * i + 1]
        np.testing.assert_array_equal(x_q, x_stats)
        for name in ("self_attn.q_proj", "mlp.down_proj"):  # the packed weights, dequantized
            fields = {f: out[f"model.layers.{i}.{name}.{f}"] for f in ("qweight", "s1", "s2",
                                                                      "szero")}
            k = 2 * fields["qweight"].shape[1]
            fmt = packing.W4Group(**fields, group_size=qcfg.weight_format.for_input_size(k)
                                  .group_size)
            np.testing.assert_allclose(w_q[name + ".weight"], packing.dequantize(fmt))
        assert not np.allclose(y_q, y_float)
        if i + 1 < cfg.num_layers:
            np.testing.assert_array_equal(calls[2 * i + 2][1], y_q)  # the next layer's inputs


def _correlated(n_tokens, k, seed):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((n_tokens, k)) @ mix
    x[:, rng.integers(0, k, 4)] *= 8  # outlier channels
    return x


@pytest.mark.parametrize("variant", ["per_channel", "group"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(variant):
    rng = np.random.default_rng(1)
    x = _correlated(2048, 256, seed=2)
    w = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    h = x.T @ x
    if variant == "per_channel":
        rtn, opt = packing.quantize_per_channel(w), gptq.gptq_per_channel(w, h)
    else:
        rtn, opt = packing.quantize_group(w, 128), gptq.gptq_group(w, h, 128)
        assert np.abs(packing.int8_level(opt).astype(np.int32)).max() <= 127
    codes = packing.codes(opt)
    assert codes.min() >= 0 and codes.max() <= 15

    def err(fmt):
        return np.linalg.norm(x @ (packing.dequantize(fmt) - w).T)

    assert err(opt) < 0.8 * err(rtn)


def test_clipping_search_reduces_the_output_error():
    rng = np.random.default_rng(3)
    x = _correlated(1024, 128, seed=4)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    w[np.arange(64), rng.integers(0, 128, 64)] = 0.6  # one large weight per row
    h = x.T @ x
    lo, hi = search_per_channel(w, h, grid=40)
    assert (hi <= w.max(axis=1) + 1e-7).all() and (hi < w.max(axis=1)).any()

    def err(fmt):
        d = packing.dequantize(fmt) - w
        return np.einsum("nk,kj,nj->", d, h, d)

    assert err(packing.quantize_per_channel(w, lo, hi)) < err(packing.quantize_per_channel(w))


def test_group_clipping_search_agrees_with_a_numpy_loop_and_lowers_the_error():
    """search_group (jitted, all ratios at once) picks, per row and group, the ratio a plain
    loop over packing.quantize_group's candidates picks, and the clipped RTN format has a
    smaller output error than the unclipped one. (GPTQ on these clipped ranges is not always
    better than GPTQ on the full ones: its error feedback already spends the outliers' error.)"""
    rng = np.random.default_rng(5)
    x = _correlated(1024, 256, seed=6)
    w = (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)
    w[np.arange(64), rng.integers(0, 256, 64)] = 0.5  # one large weight per row
    h = x.T @ x
    ratios = clip_ratios(20, 0.2)
    best = search_group(w, h, 128, grid=20)
    assert best.shape == (64, 2) and (best < 1).any() and (best == 1).any()
    errs = []
    for r in ratios:  # the independent loop: real format, per-group products error
        d = (packing.dequantize(packing.quantize_group(w, 128, ratio=np.float32(r))) - w)
        errs.append([[d[n, g * 128:(g + 1) * 128] @ h[g * 128:(g + 1) * 128, g * 128:(g + 1) * 128]
                      @ d[n, g * 128:(g + 1) * 128] for g in range(2)] for n in range(64)])
    errs = np.asarray(errs)  # [R, N, G]
    index = np.abs(ratios[:, None, None] - best[None]).argmin(axis=0)
    chosen = errs[index, np.arange(64)[:, None], np.arange(2)]
    np.testing.assert_allclose(chosen, errs.min(axis=0), rtol=1e-4)

    def err(fmt):
        d = packing.dequantize(fmt) - w
        return np.einsum("nk,kj,nj->", d, h, d)

    assert err(packing.quantize_group(w, 128, ratio=best)) < 0.9 * err(packing.quantize_group(w))
    clipped = gptq.gptq_group(w, h, 128, ratio=best)  # GPTQ keeps the clipped groups' scales
    np.testing.assert_array_equal(clipped.s2, packing.quantize_group(w, 128, ratio=best).s2)


def test_quant_config_defaults_follow_the_paper():
    g = QuantConfig(weight_format="g128")
    assert g.weight_format is WeightFormat.G128
    assert g.reorder and g.clip and g.gptq and (g.smooth_alpha, g.smooth_beta) == (0.3, 0.7)
    assert g.search_smooth_attention and g.search_smoothing and not g.search_qk_clip
    pc = QuantConfig(weight_format="per-channel")
    assert pc.clip and not pc.reorder and (pc.smooth_alpha, pc.smooth_beta) == (0.05, 0.95)
    assert pc.search_qk_clip
    # deepcompressor's V rotation replaces v->o smoothing; the K cache is rotated when KV4
    assert g.rotate_v and g.rotate_k and not g.smooth_out and g.smooth_down
    assert pc.rotate_v and pc.rotate_k and not pc.smooth_out
    assert not QuantConfig(kv_cache="16bit").rotate_k
    assert QuantConfig(kv_cache="kv4-minmax").rotate_k  # QServe's KV4 quantizer, same cache
    with pytest.raises(ValueError, match="kv_cache must be 'kv4', 'kv4-minmax' or '16bit'"):
        QuantConfig(kv_cache="kv8")
    assert QuantConfig(rotate_v=False).smooth_out  # the paper's v->o smoothing comes back
    rtn = QuantConfig(method="rtn")
    assert not (rtn.rotate or rtn.rotate_v or rtn.rotate_k or rtn.smooth_attention or rtn.gptq
                or rtn.needs_calibration)
    with pytest.raises(ValueError, match="rotate_k"):
        QuantConfig(method="rtn", rotate_k=True)
    # SmoothAttention of the rotated keys: asked for (off by default), and it needs rotate_k
    assert not (g.smooth_rotated_keys or pc.smooth_rotated_keys or rtn.smooth_rotated_keys)
    assert QuantConfig(smooth_rotated_keys=True).smooth_rotated_keys
    with pytest.raises(ValueError, match="smooth_rotated_keys scales the keys rotate_k rotates"):
        QuantConfig(rotate_k=False, smooth_rotated_keys=True)
    with pytest.raises(ValueError, match="takes no smooth_rotated_keys"):
        QuantConfig(method="rtn", smooth_rotated_keys=True)
    assert QuantConfig.from_dict(g.to_dict()) == g
    assert QuantConfig.from_dict(json.loads(json.dumps(pc.to_dict()))) == pc
    with pytest.raises(ValueError, match="unknown weight format 32"):
        QuantConfig(weight_format=32)


def test_quant_config_is_frozen_and_never_overrides_what_was_asked():
    g = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.weight_format = WeightFormat.G64
    assert QuantConfig(reorder=False).reorder is False  # an explicit value is kept
    with pytest.raises(ValueError, match="method 'rtn' is plain round-to-nearest: it takes no "
                                         "rotate, gptq"):
        QuantConfig(method="rtn", rotate=True, gptq=True)
    with pytest.raises(ValueError, match="needs clip and the per-channel format"):
        QuantConfig(weight_format="g128", search_qk_clip=True)


def test_older_recipes_still_load():
    """Checkpoints written before WeightFormat: group_size -1/128/64, rtn steps written False."""
    old = {"method": "rtn", "group_size": -1, "rotate": False, "gptq": False, "clip": False,
           "layer_group_sizes": {"mlp.down_proj": -1}, "kv_cache": "kv4"}
    q = QuantConfig.from_dict(old)
    assert q.weight_format is WeightFormat.PER_CHANNEL and q.method == "rtn"
    assert QuantConfig.from_dict({"group_size": 64}).weight_format is WeightFormat.G64
    before = QuantConfig.from_dict({"method": "qoq", "weight_format": "g128", "smooth_out": True})
    assert not (before.rotate_v or before.rotate_k) and before.smooth_out  # steps it never ran
    assert not before.smooth_rotated_keys
    assert WeightFormat.parse("128") is WeightFormat.G128
    assert WeightFormat.G128.for_input_size(576) is WeightFormat.G64


# ----------------------------------------------------------------------------------------------
# Fake quantization (what the searches score) against the real formats


def test_fake_quantizers_match_the_formats():
    from pallas_kernels.kv4 import dequantize_kv4, quantize_kv4
    from pallas_kernels.quantize import quantize_per_token
    from qoq_jax.quant import fake

    rng = np.random.default_rng(7)
    w = (rng.standard_normal((128, 192)) * 0.05).astype(np.float32)
    w[3, 5] = 0.9  # an outlier
    np.testing.assert_array_equal(np.asarray(fake.w4_per_channel(jnp.asarray(w))),
                                  packing.dequantize(packing.quantize_per_channel(w)))
    lo, hi = np.minimum(w.min(1), 0) * 0.7, np.maximum(w.max(1), 0) * 0.7
    np.testing.assert_array_equal(np.asarray(fake.w4_per_channel(jnp.asarray(w), 0.7)),
                                  packing.dequantize(packing.quantize_per_channel(w, lo, hi)))
    for fmt in (WeightFormat.G128, WeightFormat.G64):  # 192 inputs: g128 falls back to g64
        np.testing.assert_allclose(np.asarray(fake.w4(jnp.asarray(w), fmt)),
                                   packing.dequantize(packing.quantize_group(w, fmt.group_size)),
                                   rtol=1e-6, atol=1e-9)
    ratio = rng.uniform(0.2, 1.0, (128, 3)).astype(np.float32)  # per row and group of 64
    np.testing.assert_allclose(np.asarray(fake.w4_group(jnp.asarray(w), 64, jnp.asarray(ratio))),
                               packing.dequantize(packing.quantize_group(w, 64, ratio=ratio)),
                               rtol=1e-6, atol=1e-9)
    x = rng.standard_normal((16, 96)).astype(np.float32)
    act = quantize_per_token(jnp.asarray(x), backend="xla")
    expect = np.asarray(act.values, np.float32) * np.asarray(act.scale, np.float32)[:, None]
    np.testing.assert_allclose(np.asarray(fake.int8_per_token(jnp.asarray(x))), expect,
                               rtol=1e-6)
    kv = jnp.asarray(rng.standard_normal((4, 3, 64)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fake.kv4(kv)),
                                  np.asarray(dequantize_kv4(*quantize_kv4(kv))))


# ----------------------------------------------------------------------------------------------
# The searches: each batched, jitted search picks what a plain NumPy loop over the same grid,
# with the real formats, picks


def _np_int8(x):
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = (amax / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(x * np.where(amax > 0, 127 / amax, 0)), -127, 127)
    return q * scale


def test_output_smoothing_search_agrees_with_a_numpy_loop():
    from qoq_jax.quant import search, transforms

    x = _correlated(512, 128, seed=11).astype(np.float32)
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((64, 128)) * 0.05).astype(np.float32)
    xmax, wmax = np.abs(x).max(0), np.abs(w).max(0)
    lam_of = lambda a, b: transforms.smooth_lambda(xmax, wmax, a, b)  # noqa: E731
    for fmt in (WeightFormat.G128, WeightFormat.PER_CHANNEL):
        got = search.search_output_smoothing(x, w, lam_of, fmt, steps=5)
        errs = []
        for a, b in search.alpha_beta_grid(5):
            lam = lam_of(a, b).astype(np.float32)
            wq = packing.dequantize(packing.quantize_group(w * lam, 128) if fmt.is_group
                                    else packing.quantize_per_channel(w * lam))
            errs.append(np.sum((_np_int8(x / lam) @ wq.T - x @ w.T) ** 2))
        best = search.alpha_beta_grid(5)[int(np.argmin(errs))]
        assert got == tuple(best), (fmt, got, best)
        assert min(errs) < 0.9 * errs[0]  # smoothing the outlier channels pays on this data


def _np_causal_attention(q, k, v):
    s, t, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    sc = np.einsum("sqhd,skhd->shqk", q, k) / np.sqrt(d)
    sc = np.where(np.tril(np.ones((t, t), bool)), sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return np.einsum("shqk,skhd->sqhd", p / p.sum(-1, keepdims=True), v)


def test_smooth_attention_search_agrees_with_a_numpy_loop():
    from qoq_jax.quant import search, transforms

    cfg = ModelConfig.from_hf_dict({**TINY_CONFIGS["llama3"], "head_dim": 16})
    rng = np.random.default_rng(5)
    s, t, d = 2, 24, cfg.head_dim
    q = rng.standard_normal((s, t, cfg.num_heads, d)).astype(np.float32)
    k = rng.standard_normal((s, t, cfg.num_kv_heads, d)).astype(np.float32)
    k[..., 3] *= 20  # an outlier key channel (and its RoPE partner below)
    k[..., 3 + d // 2] *= 20
    v = rng.standard_normal((s, t, cfg.num_kv_heads, d)).astype(np.float32)
    k_span = np.abs(k).reshape(-1, cfg.num_kv_heads * d).max(0)
    q_span = np.abs(q).reshape(-1, cfg.num_heads * d).max(0)
    got = search.search_smooth_attention({"q": q, "k": k, "v": v}, k_span, q_span, cfg, steps=4)
    ref = _np_causal_attention(q, k, v)
    errs = []
    for a, b in search.alpha_beta_grid(4):
        lam = transforms.attention_lambda(k_span, q_span, cfg, a, b).astype(np.float32)
        out = _np_causal_attention(q * np.repeat(lam, cfg.q_per_kv, axis=0), numpy_kv4(k / lam)[3], v)
        errs.append(np.sum((out - ref) ** 2))
    assert got == tuple(search.alpha_beta_grid(4)[int(np.argmin(errs))])
    assert got != (0.0, 0.0) and min(errs) < 0.5 * errs[0]  # the outlier channel is tamed


def test_coarse_to_fine_finds_the_grid_minimum_with_a_third_of_the_scores():
    """The q/k clipping search scores 81 ratios coarse to fine: on any error curve with one dip
    (the minimum anywhere, edges included) it must pick the exhaustive grid's minimum."""
    from qoq_jax.quant.clipping import clip_ratios
    from qoq_jax.quant.search import coarse_to_fine

    ratios = clip_ratios(80, 0.2).astype(np.float32)
    for target in [*range(0, 81, 7), 80, 1, 79]:
        scored = []

        def errors_of(rs, t=target):
            scored.extend(rs.tolist())
            return (rs - ratios[t]) ** 2 + 0.1 * np.abs(rs - ratios[t])

        assert coarse_to_fine(errors_of, ratios, stride=5) == ratios[target]
        assert len(scored) <= 25  # 17 coarse + 8 fine, instead of 81
    # ties go to the larger ratio (less clipping); stride 1 is the exhaustive search
    assert coarse_to_fine(lambda rs: np.zeros(len(rs)), ratios, stride=5) == 1.0
    noisy = np.random.default_rng(0).standard_normal(81)
    lookup = {float(r): e for r, e in zip(ratios, noisy)}
    assert coarse_to_fine(lambda rs: np.array([lookup[float(r)] for r in rs]), ratios,
                          stride=1) == ratios[int(np.argmin(noisy))]


@pytest.mark.parametrize("fmt", ["g128", "per-channel"])
def test_ablation_ladder_ends_at_the_converter_default(fmt):
    """docs/ACCURACY.md's ablation adds one step per row: its last row must be the recipe the
    converter uses by default, and every row a valid recipe."""
    from qoq_jax.eval.ablation import rows_for

    rows = rows_for(fmt)
    configs = [QuantConfig(weight_format=fmt, **overrides) for _, overrides in rows]
    assert configs[0].method == "rtn" and configs[-1] == QuantConfig(weight_format=fmt)
    assert len({c for c in configs}) == len(configs)  # each row changes something


def test_rotated_key_scale_shrinks_the_kv4_score_error():
    """In the rotated basis, queries whose energy sits in a few channels make those channels'
    key rounding cost the scores most: the key scale (SmoothAttention there) moves KV4's
    precision to them, and fake.kv4 with the scale is what the model's cache stores."""
    from qoq_jax.quant import fake, transforms

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=64,
                      intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=64, key_rotation=True, key_scale=True)
    rng = np.random.default_rng(3)
    r = rotation_matrix(cfg.head_dim)
    t, g = 256, cfg.q_per_kv
    kr = rng.standard_normal((t, cfg.num_kv_heads, cfg.head_dim))
    loud = rng.choice(cfg.head_dim, 8, replace=False)
    spread = np.where(np.isin(np.arange(cfg.head_dim), loud), 10.0, 0.5)
    qr = rng.standard_normal((t, cfg.num_heads, cfg.head_dim)) * spread
    q, k = qr @ r.T, kr @ r.T  # what the model has after RoPE, before its rotation
    scale = transforms.rotated_key_scale(q, k, cfg, r)
    assert scale.shape == (cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(np.log(scale).mean(axis=1), 0.0, atol=1e-9)  # geometric mean 1
    quiet = np.delete(scale, loud, axis=1)
    assert scale[:, loud].max() < quiet.min() / 2  # keys / scale: loud query channels grow

    def score_error(key_scale):
        k_hat = np.asarray(fake.kv4(jnp.asarray(k, jnp.float32), True,
                                    key_scale=None if key_scale is None
                                    else jnp.asarray(key_scale, jnp.float32)))
        qg = q.reshape(t, cfg.num_kv_heads, g, -1)
        return np.abs(np.einsum("ahgd,bhd->abhg", qg, k_hat - k)).mean()

    plain, scaled = score_error(None), score_error(scale)
    assert scaled < 0.85 * plain, (scaled, plain)  # (measured: 0.79)
    # with the identity scale, fake.kv4 is the rotated cache unchanged
    np.testing.assert_allclose(
        np.asarray(fake.kv4(jnp.asarray(k, jnp.float32), True,
                            key_scale=jnp.ones((cfg.num_kv_heads, cfg.head_dim)))),
        np.asarray(fake.kv4(jnp.asarray(k, jnp.float32), True)), atol=1e-6)
