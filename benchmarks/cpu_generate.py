"""Generation speed on CPU: our engine vs transformers (torch, CPU), side by side in one run.

Same model (the default SmolLM2-135M-Instruct), same dtype (fp32), greedy, the same chat
prompts, a fixed number of new tokens (stop tokens ignored so both make exactly as many), at
batch 1 and 16. Each side is warmed up first (compilation and first-call costs excluded) and the
best of --repeats runs is reported.

    .venv/bin/python benchmarks/cpu_generate.py [--max-new-tokens 64] [--repeats 2]

Also reported: our W4A8KV4 path (the same engine on the RTN-quantized model: the runtime path
of QoQ checkpoints), and the weight-streaming floor of a batch-1 decode step: the bytes of
weights a step reads (the runner's parameters) over this machine's copy bandwidth (numpy
copying 256 MiB: bytes read and written per second; an XLA read of 1 GiB is printed too, but
on this VM it varies two-fold from run to run).

transformers runs in the test oracle's interpreter (.venv-ref, built by `make ref-venv`), so that
torch never enters this package's environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TOPICS = ["the ocean", "a lighthouse", "mountains", "coffee", "the moon", "trains", "autumn",
          "a library", "bees", "the desert", "rain", "chess", "volcanoes", "bread", "owls",
          "the river"]


def prompts(llm):
    return [llm.encode(f"Write a short story about {t}.", chat=True) for t in TOPICS]


def ours(llm, ids, max_new, batch, repeats):
    import qoq_jax

    params = qoq_jax.SamplingParams(max_new_tokens=max_new, stop_token_ids=())
    llm.engine.generate(ids[:batch], params)  # warm-up: compiles this batch's shapes
    best = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = llm.engine.generate(ids[:batch], params)
        dt = time.perf_counter() - t
        n = sum(len(r.tokens) for r in out)
        if best is None or dt < best[1]:
            best = (n, dt)
    return best


def theirs(model_dir, ids, max_new, batch, repeats, ref_python):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    proc = subprocess.run([ref_python, str(REPO / "benchmarks" / "hf_generate_worker.py"),
                           str(model_dir), f.name, str(max_new), str(batch), str(repeats),
                           str(os.cpu_count())], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["tokens"], r["seconds"]


def bandwidth() -> dict:
    """Read bandwidth as a jitted XLA sum streams 1 GiB (all cores), and numpy's copy
    bandwidth (bytes read + written), best of 5, GB/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones((1 << 28,), jnp.float32)
    total = jax.jit(lambda a: a.sum())
    total(x).block_until_ready()
    best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(5))
    a = np.ones(1 << 26, np.float32)
    b = np.empty_like(a)
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return {"read_gb_s": x.nbytes / best / 1e9, "numpy_copy_gb_s": 2 * a.nbytes / copy / 1e9}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(engine) -> int:
    """Bytes of the parameters a decode step reads (the runner's, as it holds them)."""
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(engine.runner.params))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ref-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    ap.add_argument("--no-w4a8", action="store_true", help="skip our W4A8KV4 rows")
    args = ap.parse_args(argv)

    import jax

    import qoq_jax
    from qoq_jax import assets

    llm = qoq_jax.load(dtype="float32")
    ids = prompts(llm)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    bw = bandwidth()
    floor_ms = weight_bytes(llm.engine) / (bw["numpy_copy_gb_s"] * 1e9) * 1e3
    print(f"# {datetime.date.today()} commit {commit}, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), greedy,"
          f" {args.max_new_tokens} new tokens per sequence")
    print(f"# copy bandwidth {bw['numpy_copy_gb_s']:.1f} GB/s (XLA read {bw['read_gb_s']:.1f}"
          f" GB/s); fp32 weights {weight_bytes(llm.engine) / 1e6:.0f} MB: weight-streaming "
          f"floor {floor_ms:.1f} ms per batch-1 step = {1e3 / floor_ms:.1f} tokens/s")
    w4 = None
    if not args.no_w4a8:
        from qoq_jax.quant.config import QuantConfig

        w4 = qoq_jax.load(dtype="float32", quantize=QuantConfig(method="rtn"))
    print("| batch | qoq-jax fp32 tok/s | transformers fp32 tok/s | ratio | qoq-jax W4A8KV4 "
          "tok/s | W4A8KV4 / fp32 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for b in args.batches:
        n1, t1 = ours(llm, ids, args.max_new_tokens, b, args.repeats)
        n2, t2 = theirs(assets.default_model_dir(), ids, args.max_new_tokens, b, args.repeats,
                        args.ref_python)
        row = {"batch": b, "fp32": n1 / t1, "transformers": n2 / t2}
        if w4 is not None:
            n3, t3 = ours(w4, ids, args.max_new_tokens, b, args.repeats)
            row["w4a8kv4"] = n3 / t3
        rows.append(row)
        w4s = (f"{row['w4a8kv4']:.1f} | {row['w4a8kv4'] / row['fp32']:.2f}x" if w4 is not None
               else "- | -")
        print(f"| {b} | {row['fp32']:.1f} | {row['transformers']:.1f} | "
              f"{row['fp32'] / row['transformers']:.2f}x | {w4s} |", flush=True)
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if b1:
        print(f"batch 1 fp32: {1e3 / b1['fp32']:.1f} ms per token = "
              f"{(1e3 / b1['fp32']) / floor_ms:.2f}x the weight-streaming floor")
    out = os.environ.get("OUT")
    if out:
        Path(out, "cpu_generate.json").write_text(json.dumps(
            {"date": str(datetime.date.today()), "commit": commit, **bw,
             "floor_ms": floor_ms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
