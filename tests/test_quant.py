"""QoQ: Hadamard rotation, function-preserving transforms, clipping, GPTQ, the pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CONFIGS, make_tiny_checkpoint

from pallas_kernels import packing
from qoq_jax.config import ModelConfig
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import from_hf_weights, prefill
from qoq_jax.quant import gptq
from qoq_jax.quant.clipping import search_per_channel
from qoq_jax.quant.config import QuantConfig
from qoq_jax.quant.hadamard import hadamard, rotation_matrix
from qoq_jax.quant.pipeline import transformed_float_weights

ALL_STEPS = dict(rotate=True, smooth_attention=True, smooth_out=True, smooth_down=True,
                 reorder=True)
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
@pytest.mark.parametrize("step", ["rotate", "smooth_attention", "smooth_out", "smooth_down",
                                  "reorder", "all"])
def test_transforms_preserve_the_function(tmp_path, name, step):
    d = make_tiny_checkpoint(tmp_path / name, name, seed=5)
    cfg = ModelConfig.from_json(d)
    weights = dict(SafetensorsCheckpoint(d))
    rng = np.random.default_rng(0)
    calib = rng.integers(0, cfg.vocab_size, (4, 24)).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    steps = ALL_STEPS if step == "all" else {**NO_STEPS, step: True}
    qcfg = QuantConfig(**steps, smooth_alpha=0.5, smooth_beta=0.5)
    new_w, new_cfg = transformed_float_weights(cfg, weights, qcfg, calib)
    changed = [k for k in new_w if k in weights and not np.allclose(new_w[k], weights[k])]
    assert changed, "the transform changed nothing"
    base = _logits(cfg, weights, tokens)
    got = _logits(new_cfg, new_w, tokens)
    assert np.abs(got - base).max() < 2e-5 * np.abs(base).max()


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


def test_quant_config_defaults_follow_the_paper():
    g = QuantConfig(group_size=128)
    assert g.reorder and not g.clip and g.gptq and (g.smooth_alpha, g.smooth_beta) == (0.3, 0.7)
    pc = QuantConfig(group_size=-1)
    assert pc.clip and not pc.reorder and (pc.smooth_alpha, pc.smooth_beta) == (0.05, 0.95)
    rtn = QuantConfig(method="rtn")
    assert not (rtn.rotate or rtn.smooth_attention or rtn.gptq or rtn.needs_calibration)
    assert QuantConfig.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="group size"):
        QuantConfig(group_size=32)
