"""Where a decode step's time goes on CPU: the whole step, its matmuls alone, its attention.

The default model (float32, or W4A8KV4 through the CPU route with --variant w4a8kv4), the
engine's own decode program over `rows` active slots at position --position, timed as it runs
(best of --repeats dispatches of 8 steps). Then, in the same process and interleaved:
- the step with attention removed (the cache's attention returns its queries), and
- the step's matmuls alone: the runner's own weights through the same dots in a lax.scan over
  the layers (q/k/v/o, gate/up/down per layer, then lm_head), at the same row count,
so the table says how much is matmul, how much attention, how much the rest (norms, RoPE, KV
write, sampling, the loop). And the weight-streaming floor: the weights' bytes over the read
bandwidth: numpy's copy bandwidth here (bytes read and written per second).

    .venv/bin/python benchmarks/decode_breakdown.py [--variant fp32|w4a8kv4] [--rows 2 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _active(runner, position: int):
    """Every slot decoding at `position`, with its own 20 pages (rows never run out)."""
    st = runner.state
    runner.state = dataclasses.replace(
        st, done=runner._put(np.zeros((runner.slots,), bool)),
        position=runner._put(np.full((runner.slots,), position, np.int32)),
        params=dataclasses.replace(st.params, max_new=runner._put(
            np.full((runner.slots,), 10**6, np.int32))))
    pages = -(-(position + 64) // runner.page_size)
    table = np.zeros((runner.slots, runner.max_pages_per_seq), np.int32)
    for i in range(runner.slots):
        table[i, :pages] = 1 + i * pages + np.arange(pages)
    runner.set_page_table(table)


def _time_decode(runner, rows: int, steps: int = 8) -> float:
    retire = np.zeros((runner.slots,), bool)
    t = time.perf_counter()
    out = runner.decode(rows, steps, retire)
    np.asarray(out.token)
    return (time.perf_counter() - t) / steps


def _matmuls(runner, rows: int):
    """A jitted function running the step's matmuls alone (the runner's weights, in a scan;
    a W4A8 layer quantizes its input as it does in the model)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qoq_jax.model import attention_qkv, mlp_gate_up

    model = nnx.merge(runner.graphdef, runner.params)
    cfg = model.config
    layers_def, stacked = nnx.split(model.layers)

    @jax.jit
    def run(stacked, x):
        def body(h, layer_state):
            layer = nnx.merge(layers_def, layer_state)
            a, m = layer.self_attn, layer.mlp
            q, k, v = attention_qkv(a, cfg, h)  # the runner's (fused) projections
            o = a.o_proj(q.reshape(h.shape[0], -1) + (k.sum() + v.sum()) * 0)  # k, v kept
            gate, up = mlp_gate_up(m, h)
            down = m.down_proj(gate * up)
            return h + (o + down) * 1e-6, None
        h, _ = jax.lax.scan(body, x, stacked)
        return model.logits(h)

    x = jnp.ones((rows, model.config.hidden_size), model.dtype)
    return lambda: jax.block_until_ready(run(stacked, x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--position", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import jax

    import qoq_jax
    from qoq_jax import kv_cache
    from qoq_jax.engine import Engine

    if args.variant == "fp32":
        llm, kind = qoq_jax.load(dtype="float32"), "16bit"
    else:
        from qoq_jax.quant.config import QuantConfig

        llm, kind = qoq_jax.load(dtype="float32", quantize=QuantConfig(method="rtn")), "kv4"
    full = Engine(llm.model, kv_cache=kind, num_pages=2000).runner
    # the same engine with attention removed: the cache class answers with its queries
    cls = kv_cache.cache_class(kind)
    attention = cls.attention
    cls.attention = lambda self, q, *a, **k: q
    no_attn = Engine(llm.model, kv_cache=kind, num_pages=2000).runner
    no_attn.allocate()
    for rows in args.rows:  # compile with the patched class, then restore it
        no_attn.decode(rows, 1, np.zeros((no_attn.slots,), bool))
    cls.attention = attention
    full.allocate()
    for r in (full, no_attn):
        _active(r, args.position)
    from cpu_generate import bandwidth

    bw = bandwidth()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(full.params))
    floor_ms = weight_bytes / (bw["numpy_copy_gb_s"] * 1e9) * 1e3
    rows_out = []
    for rows in args.rows:
        mm = _matmuls(full, rows)
        mm()
        best = {"step": 1e9, "no_attention": 1e9, "matmuls": 1e9}
        _time_decode(full, rows), _time_decode(no_attn, rows)
        for _ in range(args.repeats):
            best["step"] = min(best["step"], _time_decode(full, rows))
            best["no_attention"] = min(best["no_attention"], _time_decode(no_attn, rows))
            t = time.perf_counter()
            mm()
            best["matmuls"] = min(best["matmuls"], time.perf_counter() - t)
        ms = {k: v * 1e3 for k, v in best.items()}
        row = {"rows": rows, **ms, "attention": ms["step"] - ms["no_attention"],
               "rest": ms["no_attention"] - ms["matmuls"]}
        rows_out.append(row)
    print(f"# {args.variant}, position {args.position}; weights {weight_bytes / 1e6:.0f} MB, "
          f"copy bandwidth {bw['numpy_copy_gb_s']:.1f} GB/s -> floor {floor_ms:.1f} ms per step")
    print("| rows | step ms | matmuls ms | attention ms | rest ms | step / floor |")
    print("|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['rows']} | {r['step']:.1f} | {r['matmuls']:.1f} | {r['attention']:.1f} | "
              f"{r['rest']:.1f} | {r['step'] / floor_ms:.2f}x |")
    out = os.environ.get("OUT")
    if out:
        Path(out, f"decode_breakdown_{args.variant}.json").write_text(json.dumps(
            {"variant": args.variant, "floor_ms": floor_ms, **bw, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
