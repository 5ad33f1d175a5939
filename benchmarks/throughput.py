"""End-to-end throughput in QServe's setting, and decode-step latency: W4A8KV4 vs bf16, one engine.

QServe's benchmark (qserve_spec.md section 4.1): prompts of 1024 tokens, 512 generated tokens
each (stop tokens ignored), throughput = generated tokens / wall time, prefill included. Here on
a Llama-3-8B-shaped model with random weights (benchmarks/_models.py), W4A8 (g128 weights, KV4
cache) against the same engine in bf16 with a 16-bit cache, over batch sizes; then the time of
one decode step at batch 1, 16, 64 and 256 (context 1024), on the engine of the largest batch.
Each engine is warmed up (its programs compiled) by the same workload on other prompts and its
prefix cache emptied before the timed run, so nothing of the timed prompts is cached
("cached_tokens" in the JSON says so; "compiles_in_run" counts compilations inside it).
--quick (batch 16, 64, 256; gpu_check.sh passes --batches 256) skips that warm-up, a second
run of the whole workload: the timed run compiles its programs and its figure leaves their
compile time out ("warmed_up": false); decode-step latency only for W4A8KV4 at batch 1.

    PYTHONPATH=. python benchmarks/throughput.py                 # on a GPU
    PYTHONPATH=. python benchmarks/throughput.py --quick         # fewer batch sizes
    .venv/bin/python benchmarks/throughput.py --smoke            # CPU, a tiny model

Results go to $OUT/throughput.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _models import LLAMA3_8B, TINY, random_model  # noqa: E402
from _timing import header  # noqa: E402

from qoq_jax.engine import Engine  # noqa: E402
from qoq_jax.sampling import SamplingParams  # noqa: E402
from qoq_jax.scheduler import Status  # noqa: E402


def _engine(hf, variant, batch, prompt, gen, dtype, smoke, tensor_parallel=1):
    # a model per engine: the engine keeps its own runtime copy of the weights, and two copies
    # of an 8B bf16 model beside a batch-256 pool would not fit an 80 GB card
    model = random_model(hf, dtype=dtype, w4a8_format="g128" if variant == "w4a8kv4" else None,
                         max_context=prompt + gen)
    tokens_each = prompt + gen
    page = 16
    pages = 1 + batch * -(-tokens_each // page)
    from qoq_jax.sharding import make_mesh

    return Engine(model, mesh=make_mesh(tensor_parallel),
                  kv_cache="kv4" if variant == "w4a8kv4" else "16bit", page_size=page,
                  max_slots=batch, num_pages=pages, prefill_chunk=512 if smoke else 1024,
                  prefill_budget=512 if smoke else 4096, decode_steps=4 if smoke else 16)


def throughput(engine, batch, prompt, gen, vocab, seed=0, warm_up=True):
    """Generated tokens per second over one run of `batch` prompts. Without warm_up (--quick)
    the run compiles its programs itself and the figure leaves their compile time out
    (Engine.last_stats' tokens_per_s_excluding_compile; each compile may also hide up to one
    in-flight iteration of device work, a few percent at most)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, vocab, prompt).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=gen, stop_token_ids=())
    if warm_up:
        _warm_up(engine, batch, prompt, params, vocab, seed)
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    wall = time.perf_counter() - t
    n = sum(len(r.tokens) for r in out)
    st = engine.last_stats
    return {"batch": batch, "generated": n, "wall_s": wall,
            "tokens_per_s": n / wall if warm_up else st["tokens_per_s_excluding_compile"],
            "tokens_per_s_with_compiles": n / wall, "warmed_up": warm_up,
            "last_first_token_s": st["first_token_s"], "compiles_in_run": st["compiles"],
            "compile_s_in_run": st["compile_s"],
            "cached_tokens": sum(r.cached_tokens for r in out)}


def _warm_up(engine, batch, prompt, params, vocab, seed):
    # warm-up: the same workload on other prompts. The schedule depends on the lengths alone
    # (no stop tokens), so it compiles exactly the programs the timed run needs (a shorter
    # warm-up misses some: e.g. the decode dispatch of every row at once); other prompts and
    # an emptied prefix cache, so that the timed run computes every prompt token.
    rng_warm = np.random.default_rng(seed + 1000)
    warm = [rng_warm.integers(2, vocab, prompt).tolist() for _ in range(batch)]
    engine.generate(warm, params)
    engine.clear_prefix_cache()


def step_latency(engine, batch, context, vocab, steps=4):
    """Milliseconds per decode step with `batch` sequences at about `context` tokens."""
    rng = np.random.default_rng(1)
    new = (steps + 3) * engine.decode_steps
    context = min(context, engine.max_context - new)  # --smoke's tiny context
    params = SamplingParams(max_new_tokens=new, stop_token_ids=())
    ids = [engine.submit(rng.integers(2, vocab, context).tolist(), params)
           for _ in range(batch)]
    engine.step()
    while engine.scheduler.waiting or any(s.status == Status.PREFILLING
                                          for s in engine.scheduler.running):
        engine.step()
    engine.step()  # the first decode chunk (compiles if needed)
    jax.block_until_ready(engine.runner.cache)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    jax.block_until_ready(engine.runner.cache)
    ms = (time.perf_counter() - t) / (steps * engine.decode_steps) * 1e3
    for i in ids:
        engine.cancel(i)
    engine.run(lambda: all(engine.finished(i) for i in ids))
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny model, tiny sizes")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                    help="split each model over N devices (qoq_jax.sharding)")
    ap.add_argument("--out-dir", default="out", help="where the JSON and PNG go (default ./out; "
                                                     "$OUT when set)")
    args = ap.parse_args(argv)
    if args.smoke:
        hf, prompt, gen, batches, lat_batches, dtype = TINY, 64, 32, [2, 4], [1, 2], "float32"
        if args.quick:
            lat_batches = [1]
    else:
        hf, prompt, gen, dtype = LLAMA3_8B, 1024, 512, "bfloat16"
        batches = [16, 64, 256] if args.quick else [16, 64, 128, 256]
        lat_batches = [1] if args.quick else [1, 16, 64, 256]
    batches = sorted(args.batches or batches)
    lat_variants = ("w4a8kv4",) if args.quick else ("w4a8kv4", "bf16")
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype)
    rows, lat = [], []
    for variant in ("w4a8kv4", "bf16"):
        engine = None
        for b in batches:
            del engine
            gc.collect()
            engine = _engine(hf, variant, b, prompt, gen, dtype, args.smoke,
                             args.tensor_parallel)
            r = {"variant": variant, **throughput(engine, b, prompt, gen, hf["vocab_size"],
                                                  warm_up=not args.quick)}
            rows.append(r)
            if (r["compiles_in_run"] and r["warmed_up"]) or r["cached_tokens"]:
                print(f"WARNING: the timed run compiled {r['compiles_in_run']} programs and "
                      f"found {r['cached_tokens']} prompt tokens cached: its figure is off")
            print(f"{variant} batch {b}: {r['tokens_per_s']:.0f} tokens/s "
                  f"({r['generated']} tokens in {r['wall_s']:.1f} s; "
                  f"{r['compiles_in_run']} compiles, {r['cached_tokens']} cached prompt "
                  f"tokens in the timed run)", flush=True)
        if variant not in lat_variants:
            del engine
            gc.collect()
            continue
        if engine.max_slots < max(lat_batches):  # else: the compiled engine of the last batch
            del engine
            gc.collect()
            engine = _engine(hf, variant, max(lat_batches), prompt, gen, dtype, args.smoke,
                             args.tensor_parallel)
        engine.clear_prefix_cache()
        for b in lat_batches:
            ms = step_latency(engine, b, prompt, hf["vocab_size"])
            lat.append({"variant": variant, "batch": b, "ms_per_step": ms,
                        "tokens_per_s_per_user": 1e3 / ms})
            print(f"{variant} decode step, batch {b}: {ms:.2f} ms ({1e3 / ms:.0f} tokens/s "
                  f"per user)", flush=True)
        del engine
        gc.collect()
    print("| batch | W4A8KV4 tok/s | bf16 tok/s | ratio |\n|---|---|---|---|")
    for b in batches:
        w = next(r for r in rows if r["variant"] == "w4a8kv4" and r["batch"] == b)
        f = next(r for r in rows if r["variant"] == "bf16" and r["batch"] == b)
        print(f"| {b} | {w['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} | "
              f"{w['tokens_per_s'] / f['tokens_per_s']:.2f}x |")
    out = Path(os.environ.get("OUT") or args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = header()
    (out / "throughput.json").write_text(json.dumps(
        {**meta, "tensor_parallel": args.tensor_parallel, "prompt": prompt, "generated": gen,
         "rows": rows, "latency": lat}, indent=1))
    from _plot import plot_curves

    def series(key):
        return {v: ([r["batch"] for r in rows if r["variant"] == v],
                    [r[key] for r in rows if r["variant"] == v]) for v in ("w4a8kv4", "bf16")}

    png = plot_curves(out / "throughput.png",
                      f"{prompt} in / {gen} out, {meta.get('device')} ({meta.get('commit', '')})",
                      "batch (concurrent sequences)",
                      [("output tokens/s", series("tokens_per_s")),
                       ("time to the last first token (s)", series("last_first_token_s"))])
    print(f"wrote {out / 'throughput.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
