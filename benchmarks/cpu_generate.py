"""Generation speed on CPU: our engine vs transformers (torch, CPU), side by side in one run.

Same model (the default SmolLM2-135M-Instruct), same dtype (fp32), greedy, the same chat
prompts, a fixed number of new tokens (stop tokens ignored so both make exactly as many), at
batch 1 and 16. Each side is warmed up first (compilation and first-call costs excluded) and the
best of --repeats runs is reported.

    .venv/bin/python benchmarks/cpu_generate.py [--max-new-tokens 64] [--repeats 2]

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ref-python", default=str(REPO / ".venv-ref" / "bin" / "python"))
    args = ap.parse_args(argv)

    import jax

    import qoq_jax
    from qoq_jax import assets

    llm = qoq_jax.load(dtype="float32")
    ids = prompts(llm)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    print(f"# {datetime.date.today()} commit {commit}, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), fp32, greedy,"
          f" {args.max_new_tokens} new tokens per sequence")
    print("| batch | qoq-jax tokens/s | transformers tokens/s | ratio |")
    print("|---|---|---|---|")
    for b in args.batches:
        n1, t1 = ours(llm, ids, args.max_new_tokens, b, args.repeats)
        n2, t2 = theirs(assets.default_model_dir(), ids, args.max_new_tokens, b, args.repeats,
                        args.ref_python)
        print(f"| {b} | {n1 / t1:.1f} | {n2 / t2:.1f} | {(n1 / t1) / (n2 / t2):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
