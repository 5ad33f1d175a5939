"""Models of real shapes with random weights, for GPU benchmarks (no checkpoint download).

The kernels' speed does not depend on the weight values (packed W4 codes are random bytes,
group scales random small integers), so a Llama-3-8B-shaped model with random weights measures
what a converted Llama-3-8B would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qoq_jax.config import ModelConfig
from qoq_jax.layers import W4A8Linear
from qoq_jax.model import Transformer

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                 hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
                 max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)

# A tiny Llama for the benchmarks' --smoke runs on a CPU (the same code paths, toy sizes).
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512,
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False, eos_token_id=1)


def random_model(hf: dict, *, dtype=jnp.bfloat16, w4a8_format: str | None = None,
                 seed: int = 0, max_context: int | None = None) -> Transformer:
    """A Transformer of these HF-config shapes with random weights, made on the device.

    w4a8_format: None for 16-bit weights, else the W4 weight format ("g128", "g64", "per-channel").
    """
    hf = dict(hf)
    if max_context is not None:
        hf["max_position_embeddings"] = max_context
    cfg = ModelConfig.from_hf_dict(hf)
    linear = (None if w4a8_format is None else
              functools.partial(W4A8Linear, weight_format=w4a8_format))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, dtype, linear)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def fill(key, shape, dt):
        dt = jnp.dtype(dt)
        if dt == jnp.uint8:  # packed W4 codes, or group zeros (0..15)
            return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dt)
        if dt == jnp.int8:  # integer group scales s2 (1..16)
            return jax.random.randint(key, shape, 1, 17, jnp.int32).astype(dt)
        if dt == jnp.float16:  # per-channel scales / zeros
            return jax.random.uniform(key, shape, jnp.float32, 1e-3, 1e-2).astype(dt)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dt)

    values = [fill(k, tuple(x.shape), jnp.dtype(x.dtype).name) for k, x in zip(keys, leaves)]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, values))
    for norm in (model.norm,):
        norm.weight[...] = jnp.ones_like(norm.weight[...])
    return model
