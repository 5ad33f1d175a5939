"""Long prompts in bounded memory: prefill memory grows linearly with the prompt (no [T, T]
attention matrix anywhere), and the engine refuses what cannot fit before it starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_tiny_checkpoint

from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine, EngineMemoryError, PromptError
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.kv_cache import make_cache
from qoq_jax.model import from_hf_weights, prefill
from qoq_jax.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("lc") / "m", "qwen2", seed=1,
                             max_position_embeddings=8192)
    return from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d), jnp.float32)


def _prefill_temp_bytes(model, t: int, kind: str) -> int:
    cfg = model.config
    pages = t // 16 + 1
    cache = make_cache(kind, cfg.num_layers, pages + 1, 16, cfg.num_kv_heads, cfg.head_dim,
                       jnp.float32)
    table = jnp.arange(1, pages + 1, dtype=jnp.int32)[None]
    fn = jax.jit(lambda m, tok, n, c, tb: prefill(m, tok, n, c, tb), donate_argnums=3)
    compiled = fn.lower(model, jnp.zeros((1, t), jnp.int32), jnp.asarray([t]), cache,
                        table).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["16bit", "kv4"])
def test_prefill_memory_grows_linearly_with_the_prompt(model, kind):
    """Four times the prompt takes about four times the temporary memory, not sixteen: a
    dense [heads, T, T] score matrix alone would be 6 x 4096^2 x 4 bytes = 400 MB here."""
    small = _prefill_temp_bytes(model, 1024, kind)
    big = _prefill_temp_bytes(model, 4096, kind)
    assert big / small < 5, (small, big)
    assert big < 64 * 2**20


def test_engine_refuses_a_cache_larger_than_memory(model):
    with pytest.raises(EngineMemoryError, match=r"would fit: lower num_pages / kv_memory"):
        Engine(model, num_pages=10**10)


def test_engine_refuses_a_request_longer_than_its_cache(model):
    eng = Engine(model, num_pages=33, page_size=16)  # 512 tokens
    with pytest.raises(PromptError, match="the whole cache holds 512"):
        eng.submit([3] * 600, SamplingParams(max_new_tokens=1))
    # what fits, runs: a 500-token prompt in chunks of the engine's size
    out = eng.generate([[3 + i % 50 for i in range(500)]],
                       SamplingParams(max_new_tokens=4, stop_token_ids=()))
    assert len(out[0].tokens) == 4 and eng.allocator.num_used == 0
