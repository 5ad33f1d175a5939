"""What the logit processing costs: a batch of 16 requests with penalties, min_p and logit_bias
against the same batch without them, side by side in one process (interleaved repeats).

    .venv/bin/python benchmarks/sampling_params.py [--variant fp32|w4a8kv4] [--repeats 3]

Both loads sample (temperature 0.8, top_p 0.95, a seed per request) or both are greedy
(--greedy), so the only difference is the processing. Prints decode tokens/s of each and their
ratio; writes sampling_params.json to $OUT (or ./out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--greedy", action="store_true", help="greedy loads instead of sampled")
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax.sampling import SamplingParams

    llm = qoq_jax.load(args.model, dtype="float32",
                       quantize="rtn" if args.variant == "w4a8kv4" else None,
                       max_slots=args.batch)
    prompts = [llm.encode(f"Tell me about topic number {i} in a few sentences.", chat=True)
               for i in range(args.batch)]
    vocab = llm.config.vocab_size
    base = [SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=(),
                           temperature=0.0 if args.greedy else 0.8, top_p=0.95, seed=i)
            for i in range(args.batch)]
    processed = [dataclasses.replace(
        sp, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, min_p=0.05,
        min_tokens=8, logit_bias={(17 * i + j) % vocab: -5.0 for j in range(8)})
        for i, sp in enumerate(base)]
    engine = llm.engine
    engine.warmup()
    for params in (base, processed):  # first calls: the history program, caches
        engine.generate(prompts[:2], params[:2])
    rates = {"plain": [], "processed": []}
    for _ in range(args.repeats):
        for name, params in (("plain", base), ("processed", processed)):
            engine.clear_prefix_cache()  # each load prefills its prompts the same way
            t0 = time.perf_counter()
            results = engine.generate(prompts, params)
            dt = time.perf_counter() - t0
            rates[name].append(sum(len(r.tokens) for r in results) / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    row = {"variant": args.variant, "batch": args.batch, "greedy": args.greedy,
           "max_new_tokens": args.max_new_tokens, "tokens_per_s": med, "runs": rates,
           "ratio": med["processed"] / med["plain"]}
    print(f"| {args.variant} | batch {args.batch} | plain {med['plain']:.1f} tok/s | "
          f"processed {med['processed']:.1f} tok/s | ratio {row['ratio']:.3f} |")
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_params.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
