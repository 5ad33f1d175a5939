"""Tensor parallelism for a mixture-of-experts model (Mixtral layout) on 8 CPU devices: the
stacked experts split by F (gate/up column-, down row-parallel, the router replicated), float
and W4A8 experts; TP = 2 (float) and 4 (W4A8) give the tokens one device gives.

Run through tests/test_tensor_parallel.py (a fresh process with 8 CPU devices).
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import make_moe_checkpoint
from qoq_jax import sharding
from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine
from qoq_jax.hf import SafetensorsCheckpoint
from qoq_jax.model import from_hf_weights
from qoq_jax.sampling import SamplingParams

# W4A8 under TP 4: the experts' F = 512 gives each device 128 outputs of gate/up (a multiple
# of 64) and 128 inputs of down_proj (one g128 group); 4 KV heads split 4 ways
MOE_CONFIG = dict(
    architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=260, hidden_size=128,
    intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, num_local_experts=4, num_experts_per_tok=2, rope_theta=10000.0,
    tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=512,
    bos_token_id=256, eos_token_id=257, sliding_window=None)
ENGINE = dict(page_size=8, decode_steps=8, max_slots=2, prefill_chunk=16, num_pages=24)
PARAMS = SamplingParams(max_new_tokens=6, logprobs=1, stop_token_ids=())


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_moe_checkpoint(tmp_path_factory.mktemp("moe") / "mixtral_tp", MOE_CONFIG, seed=7)


def _generate(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, 11).tolist(), rng.integers(3, 256, 12).tolist()]
    res = engine.generate(prompts, PARAMS)
    return [r.tokens for r in res], np.array([[e["logprob"] for e in r.logprobs] for r in res])


def _spec(array):
    return tuple(array.sharding.spec)


def test_float_moe_tp_1_2_agree(moe_dir):
    """Float experts (ragged_dot over each device's slice of F), 16-bit cache."""
    cfg = ModelConfig.from_json(moe_dir)
    want = None
    for tp in (1, 2):
        mesh = sharding.make_mesh(tp)
        model = from_hf_weights(cfg, SafetensorsCheckpoint(moe_dir), mesh=mesh)
        if tp > 1:
            assert _spec(model.layers.mlp.experts.down_proj.weight[...]) == (None, None, None, "tp")
            assert _spec(model.layers.mlp.gate.weight[...]) == (None, None, None)
        got = _generate(Engine(model, mesh=mesh, kv_cache="16bit", **ENGINE))
        if want is None:
            want = got
        else:
            assert got[0] == want[0], f"TP {tp}"
            np.testing.assert_allclose(got[1], want[1], atol=1e-4, err_msg=f"TP {tp}")


def test_quantized_moe_g128_kv4_tp_1_4_agree(moe_dir, tmp_path):
    """A converted (RTN g128) MoE checkpoint restored into its shards (qoq_jax.load
    tensor_parallel=N), W4A8 experts on the grouped GEMM, KV4 cache: the same tokens at every
    TP size (down_proj's INT8 rows quantized with the whole row's scale)."""
    import qoq_jax
    from qoq_jax.convert import convert
    from qoq_jax.moe import W4A8ExpertLinear
    from qoq_jax.quant.config import QuantConfig

    out = convert(str(moe_dir), str(tmp_path / "ckpt"), QuantConfig(method="rtn"),
                  progress=False)
    want = None
    for tp in (1, 4):  # (TP 2 splits no differently: the float test runs it)
        llm = qoq_jax.load(out, dtype="float32", tensor_parallel=tp, **ENGINE)
        experts = llm.model.layers.mlp.experts
        assert isinstance(experts.down_proj, W4A8ExpertLinear)
        if tp > 1:  # [L, E, groups, N]: the groups of F split
            assert _spec(experts.down_proj.s2[...]) == (None, None, "tp", None)
            assert _spec(experts.up_proj.qweight[...]) == (None, None, "tp", None)
        got = _generate(llm.engine)
        if want is None:
            want = got
        else:
            assert got[0] == want[0], f"TP {tp}"
            np.testing.assert_allclose(got[1], want[1], atol=1e-4, err_msg=f"TP {tp}")
