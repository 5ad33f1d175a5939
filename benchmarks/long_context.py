"""Long prompts: time to first token and peak memory, prompts of 1k, 4k and 8k tokens.

Each configuration runs in a fresh process (so its peak resident memory is its own): the
engine is warmed up on a short prompt of the same chunking, then `batch` prompts of `length`
tokens (real Wikipedia text) are generated with 8 new tokens; reported: time to the first token
of the last prompt, prefill time per prompt token, and the process's peak RSS.

    .venv/bin/python benchmarks/long_context.py                   # CPU: default model
    .venv/bin/python benchmarks/long_context.py --lengths 1024 8192 --batches 4 --variants w4a8kv4
    PYTHONPATH=. python benchmarks/long_context.py --llama3-8b --lengths 4096 16384 32768  # GPU

Variants: fp32 (float weights, 16-bit cache; bf16 on a GPU) and w4a8kv4 (W4A8 weights by RTN:
the runtime path is the same as QoQ's, without the conversion time). --llama3-8b uses random
weights of Llama-3-8B's shapes (for a GPU). --smoke (CPU, checks the script): a tiny random
Llama (benchmarks/_models.py:TINY) and every length divided by 64. The warm-up's prompts are
prefixes of the timed ones, so the prefix cache is emptied before the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _text_tokens(tokenizer, n: int) -> list[int]:
    from qoq_jax import assets
    from qoq_jax.eval.data import load_documents, tokenize_joined

    ids = tokenize_joined(tokenizer, load_documents(assets.wiki_summaries_path()), n + 1)
    return [int(t) for t in ids[:n]]


SMOKE_DIVISOR = 64


def _engine_and_tokens(variant: str, n: int, llama3_8b: bool, smoke: bool = False):
    """(engine, n real-text token ids) of the default model, or a Llama-3-8B-shaped random
    model (random token ids) with --llama3-8b, or a tiny random one with --smoke."""
    import qoq_jax

    if llama3_8b or smoke:
        import jax.numpy as jnp
        import numpy as np

        sys.path.insert(0, str(REPO / "benchmarks"))
        from _models import LLAMA3_8B, TINY, random_model

        from qoq_jax.engine import Engine

        hf, context = (TINY, 1024) if smoke else (LLAMA3_8B, 65536)
        model = random_model(hf, w4a8_format="g128" if variant == "w4a8kv4" else None,
                             max_context=context,
                             dtype=jnp.float32 if smoke else jnp.bfloat16)
        kw = dict(prefill_chunk=64) if smoke else {}
        engine = Engine(model, kv_cache="kv4" if variant == "w4a8kv4" else "16bit",
                        max_slots=8, **kw)
        rng = np.random.default_rng(0)
        return engine, [int(t) for t in rng.integers(0, hf["vocab_size"], n)]
    quantize = None
    if variant == "w4a8kv4":
        from qoq_jax.quant.config import QuantConfig

        quantize = QuantConfig(method="rtn", weight_format="g128")
    llm = qoq_jax.load(dtype=None, quantize=quantize)
    return llm.engine, _text_tokens(llm.tokenizer, n)


def child(variant: str, length: int, batch: int, llama3_8b: bool, smoke: bool = False) -> dict:
    import qoq_jax
    from qoq_jax.engine import COMPILES

    engine, base = _engine_and_tokens(variant, length + batch, llama3_8b, smoke)
    chunk = engine.prefill_chunk
    prompts = [base[i:i + length] for i in range(batch)]  # distinct prompts
    params = qoq_jax.SamplingParams(max_new_tokens=8, stop_token_ids=())
    # warm-up: the full-chunk and last-chunk programs, at this batch and alone
    engine.generate([base[:chunk + (length % chunk or chunk)]], params)
    engine.generate([p[:chunk] for p in prompts], params)
    engine.clear_prefix_cache()  # those were prefixes of the timed prompts
    compiles = COMPILES.count
    t0 = time.perf_counter()
    out = engine.generate(prompts, params)
    total = time.perf_counter() - t0
    ttft = engine.last_stats["first_token_s"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "length": length, "batch": batch, "ttft_s": ttft,
            "prefill_s_per_token": ttft / (length * batch), "total_s": total,
            "new_tokens": sum(len(r.tokens) for r in out), "peak_rss_gb": peak / 2**30,
            "compiles_during_run": COMPILES.count - compiles,
            "cached_tokens": sum(r.cached_tokens for r in out), "kv_cache": engine.kv_cache,
            "kv_cache_gb": engine.kv_bytes / 2**30, "prefill_chunk": chunk}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--variants", nargs="+", default=["fp32", "w4a8kv4"],
                    choices=["fp32", "w4a8kv4"])
    ap.add_argument("--llama3-8b", action="store_true",
                    help="random weights of Llama-3-8B's shapes (for a GPU)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"CPU: a tiny random model, lengths divided by {SMOKE_DIVISOR}")
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "LENGTH", "BATCH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        v, n, b = args.child
        print(json.dumps(child(v, int(n), int(b), args.llama3_8b, args.smoke)), flush=True)
        return 0
    if args.smoke:
        args.lengths = [max(16, n // SMOKE_DIVISOR) for n in args.lengths]
    rows, failed = [], 0
    print("| variant | prompt | batch | TTFT s | prefill ms/token | peak RSS GB | KV cache GB |")
    print("|---|---|---|---|---|---|---|")
    for v in args.variants:
        for b in args.batches:
            for n in args.lengths:
                cmd = [sys.executable, __file__, "--child", v, str(n), str(b)]
                cmd += ["--llama3-8b"] * args.llama3_8b + ["--smoke"] * args.smoke
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                    print(f"| {v} | {n} | {b} | failed: {last} |")
                    failed += 1
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"| {v} | {n} | {b} | {row['ttft_s']:.1f} | "
                      f"{row['prefill_s_per_token'] * 1e3:.2f} | {row['peak_rss_gb']:.2f} | "
                      f"{row['kv_cache_gb']:.2f} |", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "long_context.json").write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
