"""Logits parity with transformers' PyTorch implementation (fp32), on tiny random models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CONFIGS, make_tiny_checkpoint, run_oracle

from qoq_jax.config import ModelConfig
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import PagedKVCache
from qoq_jax.model import decode_step, from_hf_weights, prefill

prefill = jax.jit(prefill, static_argnames=("all_logits",))
decode_step = jax.jit(decode_step)

# Three prompts of different lengths per model; 70 tokens reaches past the llama3 config's
# original context (32), so all rope-scaling bands matter.
LENGTHS = (70, 9, 33)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(1)
    jobs, cases = [], {}
    for name in TINY_CONFIGS:
        d = make_tiny_checkpoint(root / name, name)
        vocab = TINY_CONFIGS[name]["vocab_size"]
        toks = [rng.integers(0, vocab, n).tolist() for n in LENGTHS]
        cases[name] = (d, toks)
        jobs.append({"kind": "logits", "name": name, "model": str(d), "tokens": toks})
    out = run_oracle(jobs, root / "out")
    return {n: (d, t, np.load(out / f"{n}.npz")) for n, (d, t) in cases.items()}


def _load(d):
    return from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)


def _pages(cfg, batch, max_len, page_size=8):
    per = -(-max_len // page_size)
    cache = PagedKVCache.zeros(cfg.num_layers, 1 + batch * per, page_size, cfg.num_kv_heads,
                               cfg.head_dim, jnp.float32)
    table = 1 + np.arange(batch * per, dtype=np.int32).reshape(batch, per)
    return cache, jnp.asarray(table)


def _tol(ref):
    # fp32 rounding level: measured errors are 2-4e-7 of the largest logit; a wrong rope band or
    # bias is orders of magnitude above this.
    return 2e-6 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_prefill_logits_match_transformers(oracle, name):
    d, toks, ref = oracle[name]
    model = _load(d)
    cfg = model.config
    batch = np.zeros((len(toks), max(LENGTHS)), np.int32)
    for i, t in enumerate(toks):
        batch[i, :len(t)] = t
    lengths = jnp.asarray([len(t) for t in toks], jnp.int32)
    cache, table = _pages(cfg, len(toks), max(LENGTHS))
    logits, _ = prefill(model, jnp.asarray(batch), lengths, cache, table, all_logits=True)
    for i, t in enumerate(toks):
        expected = ref[str(i)]
        got = np.asarray(logits[i, :len(t)])
        assert got.shape == expected.shape
        err = np.abs(got - expected).max()
        assert err < _tol(expected), f"{name} prompt {i}: max abs diff {err}"


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_decode_steps_match_transformers(oracle, name):
    """Prefill a prefix, then decode the rest token by token through the paged cache."""
    d, toks, ref = oracle[name]
    model = _load(d)
    cfg = model.config
    prefix = 5
    b = len(toks)
    batch = np.zeros((b, prefix), np.int32)
    for i, t in enumerate(toks):
        batch[i] = t[:prefix]
    cache, table = _pages(cfg, b, max(LENGTHS))
    logits, cache = prefill(model, jnp.asarray(batch), jnp.full((b,), prefix, jnp.int32), cache,
                            table)
    for i in range(b):
        np.testing.assert_allclose(logits[i], ref[str(i)][prefix - 1], atol=_tol(ref[str(i)]))
    for pos in range(prefix, max(LENGTHS)):
        active = np.array([pos < len(t) for t in toks])
        step_tokens = np.array([t[pos] if pos < len(t) else 0 for t in toks], np.int32)
        logits, cache = decode_step(model, jnp.asarray(step_tokens), jnp.full((b,), pos, jnp.int32),
                                    jnp.asarray(active), cache, table)
        for i in np.flatnonzero(active):
            err = np.abs(np.asarray(logits[i]) - ref[str(i)][pos]).max()
            assert err < _tol(ref[str(i)]), f"{name} seq {i} pos {pos}: max abs diff {err}"
