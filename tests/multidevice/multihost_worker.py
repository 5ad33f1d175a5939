"""One process of the two-process tensor-parallel test (tests/test_tensor_parallel.py).

argv: process_id port checkpoint_dir out.json. Each process has 2 CPU devices; with
jax.distributed (gloo collectives on 127.0.0.1) they form one TP = 4 mesh, load the model
sharded, and generate with the engine exactly as one process would.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main(pid: int, port: str, ckpt: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np

    from qoq_jax import sharding
    from qoq_jax.config import ModelConfig
    from qoq_jax.engine import Engine
    from qoq_jax.hf import SafetensorsCheckpoint
    from qoq_jax.model import from_hf_weights
    from qoq_jax.sampling import SamplingParams

    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = sharding.make_mesh(4)
    model = from_hf_weights(ModelConfig.from_json(ckpt), SafetensorsCheckpoint(ckpt), mesh=mesh)
    eng = Engine(model, mesh=mesh, page_size=8, decode_steps=8, max_slots=2, prefill_chunk=16,
                 num_pages=24)
    prompts = json.loads(Path(out).with_suffix(".prompts").read_text())
    res = eng.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=()))
    Path(out).write_text(json.dumps([r.tokens for r in res]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
