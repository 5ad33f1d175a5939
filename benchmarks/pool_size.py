"""Decode speed against the KV pool's size: a step must not cost more with a bigger pool.

The default model, float32 (or W4A8KV4 with --variant), one engine per pool size from 0.25 to
4 GiB, each measured at batch 1 and 16 (chat prompts, 64 greedy tokens, eos ignored; best of
--repeats after a warm-up). Writes pool_size.json and pool_size.png to --out-dir ($OUT).

    .venv/bin/python benchmarks/pool_size.py [--sizes 0.25 0.5 1 2 4] [--variant w4a8kv4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import header  # noqa: E402
from cpu_generate import TOPICS  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4],
                    help="KV pool sizes in GiB")
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", default="out")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax.engine import Engine

    if args.variant == "fp32":
        llm, kv = qoq_jax.load(dtype="float32"), "16bit"
    else:
        from qoq_jax.quant.config import QuantConfig

        llm, kv = qoq_jax.load(dtype="float32", quantize=QuantConfig(method="rtn")), "kv4"
    ids = [llm.encode(f"Write a short story about {t}.", chat=True) for t in TOPICS]
    params = qoq_jax.SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=())
    rows = []
    print("| pool GiB | pages | " + " | ".join(f"batch {b} tok/s" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for gb in args.sizes:
        eng = Engine(llm.model, kv_cache=kv, kv_memory=int(gb * 2**30))
        eng.warmup()
        row = {"pool_gib": gb, "pages": eng.num_pages}
        for b in args.batches:
            eng.generate(ids[:b], params)
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = eng.generate(ids[:b], params)
                best = min(best, time.perf_counter() - t)
            row[f"batch_{b}"] = sum(len(r.tokens) for r in out) / best
        rows.append(row)
        print(f"| {gb:g} | {eng.num_pages} | "
              + " | ".join(f"{row[f'batch_{b}']:.1f}" for b in args.batches) + " |", flush=True)
        del eng
        gc.collect()
    out = Path(os.environ.get("OUT") or args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = header()
    (out / "pool_size.json").write_text(json.dumps({**meta, "variant": args.variant,
                                                    "rows": rows}, indent=1))
    from _plot import plot_curves

    png = plot_curves(out / "pool_size.png",
                      f"{args.variant}, default model, {meta['date']} {meta['commit']}",
                      "KV pool (GiB)", [("tokens/s", {
                          f"batch {b}": ([r["pool_gib"] for r in rows],
                                         [r[f"batch_{b}"] for r in rows])
                          for b in args.batches})])
    print(f"wrote {out / 'pool_size.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
