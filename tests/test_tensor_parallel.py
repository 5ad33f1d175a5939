"""Tensor parallelism (qoq_jax.sharding).

The tests that need several devices live in tests/multidevice/ and run here in a fresh process
with 8 CPU devices; the rest (sharding rules, refusals, lowering for 8 H100s under an abstract
mesh) run in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from helpers import REPO, TINY_CONFIGS, TINY_QUANT_CONFIGS, lower_for_h100
from qoq_jax import sharding
from qoq_jax.config import ModelConfig
from qoq_jax.model import Transformer


def test_multidevice_suite():
    """TP = 1, 2, 4 agree (float and W4A8 g128 / per-channel models, 16-bit and KV4 caches,
    a mixture-of-experts model with float and W4A8 experts), the per-shard W4A8 epilogue math,
    sharded loading: tests/multidevice on 8 CPU devices."""
    env = {**os.environ, "QOQ_MULTIDEVICE": "1",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip()}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         str(REPO / "tests" / "multidevice")],
        capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_sharding_rules():
    axes = sharding.logical_axes
    assert axes(("layers", "self_attn", "q_proj", "weight"), 3) == ("layers", "heads", "embed")
    assert axes(("layers", "self_attn", "k_proj", "qweight"), 3) == ("layers", "kv_heads", "embed")
    assert axes(("layers", "self_attn", "o_proj", "weight"), 3) == ("layers", "embed", "heads")
    assert axes(("layers", "mlp", "down_proj", "s2"), 3) == ("layers", "mlp", "embed")
    assert axes(("layers", "mlp", "down_proj", "szero"), 2) == ("layers", "embed")  # per-channel
    assert axes(("layers", "mlp", "up_proj", "s1"), 2) == ("layers", "mlp")
    assert axes(("embed_tokens", "weight"), 2) == ("vocab", "embed")
    P = jax.sharding.PartitionSpec
    assert sharding.spec_for(axes(("lm_head", "weight"), 2)) == P("tp", None)
    assert sharding.spec_for(axes(("layers", "mlp", "down_proj", "weight"), 3)) == \
        P(None, None, "tp")


def test_fewer_kv_heads_than_devices_is_refused():
    """KV heads are split, never replicated: 2 KV heads cannot go 4 ways (one message)."""
    cfg = ModelConfig.from_hf_dict(TINY_CONFIGS["qwen2"])  # 6 heads, 2 KV heads
    model = nnx.eval_shape(lambda: Transformer(cfg))
    sharding.check_tensor_parallel(model, 2)
    with pytest.raises(ValueError, match=r"does not divide the model's 2 KV heads .*never "
                                         r"replicated.*supports: 1, 2"):
        sharding.check_tensor_parallel(model, 4)


def test_w4a8_split_must_fit_the_format():
    from qoq_jax.checkpoint import linear_factory
    from qoq_jax.quant.config import QuantConfig

    cfg = ModelConfig.from_hf_dict(dict(TINY_QUANT_CONFIGS["llama"], num_key_value_heads=4))
    model = nnx.eval_shape(lambda: Transformer(cfg, jnp.float32,
                                               linear_factory(QuantConfig(method="rtn"))))
    with pytest.raises(ValueError, match="o_proj's 128 inputs split into 64 per device, not a "
                                         "multiple of the group size 128"):
        sharding.check_tensor_parallel(model, 2)  # row-parallel K must split on group bounds


def test_make_mesh_needs_the_devices():
    assert sharding.make_mesh(1) is None
    with pytest.raises(ValueError, match="needs 64 devices"):
        sharding.make_mesh(64)


def _all_reduces(hlo: str) -> dict[str, int]:
    """all-reduce ops of a StableHLO module, by their reduction (add / maximum)."""
    out = {"add": 0, "maximum": 0}
    for m in re.finditer(r"stablehlo\.all_reduce.*?stablehlo\.(add|maximum)", hlo, re.S):
        out[m.group(1)] += 1
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_tp8_model_lowers_for_h100_with_one_all_reduce_per_block(quantized):
    """The whole TP=8 forward (chunked prefill, KV4), every Pallas kernel inside shard_map,
    lowered for CUDA on an abstract mesh of 8 H100s. The layer body (lax.scan: once in the
    module) has one sum all-reduce after o_proj and one after down_proj; the embedding one
    more. A W4A8 model adds a max all-reduce of [tokens] floats before each row-parallel GEMM
    (the whole row's INT8 scale)."""
    from helpers import TRITON_CALL, abstract_h100_mesh

    from qoq_jax.checkpoint import linear_factory
    from qoq_jax.kv_cache import make_cache
    from qoq_jax.model import TokenBatch, forward
    from qoq_jax.quant.config import QuantConfig

    hf = dict(TINY_QUANT_CONFIGS["llama"], num_attention_heads=8, num_key_value_heads=8,
              head_dim=128, intermediate_size=1024, vocab_size=264)
    cfg = ModelConfig.from_hf_dict(hf)
    linear = linear_factory(QuantConfig(method="rtn"), "mosaic") if quantized else None
    model = nnx.eval_shape(lambda: Transformer(cfg, jnp.bfloat16, linear))
    graphdef, state = nnx.split(model)
    mesh = abstract_h100_mesh(8, sharding.AXIS)
    cache = jax.eval_shape(lambda: make_cache("kv4", cfg.num_layers, 64, 16, cfg.num_kv_heads,
                                              cfg.head_dim, jnp.bfloat16, backend="pallas"))

    def fn(state, cache, tokens, start, lengths, table):
        batch = TokenBatch.padded(tokens, start, lengths, table)
        return forward(nnx.merge(graphdef, state), batch, cache, mesh=mesh)

    z = jnp.zeros((2,), jnp.int32)
    hlo = lower_for_h100(fn, state, cache, jnp.zeros((2, 64), jnp.int32), z, z,
                         jnp.zeros((2, 8), jnp.int32), mesh=mesh)
    assert "sdy.manual_computation" in hlo or "shard_map" in hlo or "manual" in hlo
    assert _all_reduces(hlo) == {"add": 3, "maximum": 2 if quantized else 0}
    assert hlo.count(TRITON_CALL) >= 2  # paged attention and the KV4 write
    if quantized:
        assert hlo.count("custom_call @mosaic_gpu_v2") >= 7


def test_two_processes_generate_what_one_does(tmp_path):
    """Multi-host: two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) under
    jax.distributed form one TP = 4 mesh, load the weights sharded and generate; both get the
    tokens one process with one device generates."""
    import json
    import socket

    import numpy as np

    from helpers import make_tiny_checkpoint
    from qoq_jax.engine import Engine
    from qoq_jax.hf import SafetensorsCheckpoint
    from qoq_jax.model import from_hf_weights
    from qoq_jax.sampling import SamplingParams

    d = make_tiny_checkpoint(tmp_path / "m", "llama_bias", seed=1, num_attention_heads=4,
                             num_key_value_heads=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 80, 11).tolist(), rng.integers(3, 80, 12).tolist()]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    for o in outs:
        o.with_suffix(".prompts").write_text(json.dumps(prompts))
    worker = str(REPO / "tests" / "multidevice" / "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(i), port, str(d), str(outs[i])],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    model = from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d))
    eng = Engine(model, page_size=8, decode_steps=8, max_slots=2, prefill_chunk=16,
                 num_pages=24)
    want = [r.tokens for r in eng.generate(prompts, SamplingParams(max_new_tokens=6,
                                                                   stop_token_ids=()))]
    for o in outs:
        assert json.loads(o.read_text()) == want
