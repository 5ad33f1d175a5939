"""Batch invariance on the real default model (a correctness requirement of the engine): a
request's greedy tokens are the same alone, in a batch of 32 prompts of mixed lengths, and after
being preempted and recomputed, and with a prefix-cache hit (equal to an engine without prefix
caching); for the float model and QoQ W4A8 (g128 and per-channel), with the 16-bit and the KV4
cache.

The QoQ models are quantized with a small calibration and without GPTQ's rounding search
(helpers.quick_qoq_default_model): those change which integers the weights hold, not the
runtime path (the same packed formats, INT8 activations and KV4 cache), which is what batch
invariance is about; it keeps CI short."""

import numpy as np
import pytest
from helpers import quick_qoq_default_model

import qoq_jax
from qoq_jax import assets
from qoq_jax.engine import Engine

pytestmark = pytest.mark.slow

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def fp():
    return qoq_jax.load(dtype="float32")


@pytest.fixture(scope="module")
def prompts(fp):
    """32 prompts of 3 to 150 tokens: pieces of real Wikipedia summaries."""
    from qoq_jax.eval.data import load_documents

    docs = load_documents(assets.wiki_summaries_path())
    rng = np.random.default_rng(0)
    out = []
    for doc in docs[:32]:
        ids = fp.tokenizer.encode(doc, add_special_tokens=False)
        out.append([int(t) for t in ids[:int(rng.integers(3, 150))]])
    return out


# A pool too small for 32 sequences at once (16 run together): the batch run preempts. Every
# engine here has these shapes, so they share their compiled programs (runner.SHARED_EXECUTABLES)
ENGINE = dict(max_slots=16, prefill_chunk=128, prefill_budget=512, num_pages=24)


def _check(model, prompts, kv_cache):
    engine = Engine(model, kv_cache=kv_cache, **ENGINE)
    params = qoq_jax.SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=())
    batch = engine.generate(prompts, params)
    preempted = [i for i, r in enumerate(batch) if r.preemptions]
    assert preempted, "the workload was meant to preempt"
    check = sorted({0, len(prompts) - 1, *preempted[:2]})
    for i in check:
        alone = engine.generate([prompts[i]], params)[0]
        assert alone.preemptions == 0
        assert batch[i].tokens == alone.tokens, (
            f"{kv_cache}: prompt {i} ({len(prompts[i])} tokens"
            f"{', preempted' if i in preempted else ''}) differs in a batch")
    assert all(len(r.tokens) == NEW_TOKENS for r in batch)
    _check_prefix_cache(engine, model, prompts, kv_cache)


def _check_prefix_cache(engine, model, prompts, kv_cache):
    """Prefix caching is exact: requests that share a 200-token system prompt (real text) reuse
    its pages, and their greedy tokens equal those of an engine without prefix caching."""
    system = [t for p in prompts for t in p][:200]
    shared = [system + p[:20] for p in prompts[:4]]
    params = qoq_jax.SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=())
    engine.clear_prefix_cache()
    first = engine.generate(shared[:1], params)
    rest = engine.generate(shared[1:], params)
    assert all(r.cached_tokens >= 192 for r in rest), [r.cached_tokens for r in rest]
    cold = Engine(model, kv_cache=kv_cache, **ENGINE, prefix_caching=False)
    for r, p in zip(first + rest, shared):
        assert r.tokens == cold.generate([p], params)[0].tokens, f"{kv_cache}: a hit differs"


@pytest.mark.parametrize("kv_cache", ["16bit", "kv4"])
def test_float_model(fp, prompts, kv_cache):
    _check(fp.model, prompts, kv_cache)


@pytest.mark.parametrize("fmt", ["g128", "per-channel"])
def test_qoq_model(prompts, fmt):
    q = quick_qoq_default_model(fmt)
    for kv_cache in ("16bit", "kv4"):
        _check(q.model, prompts, kv_cache)
