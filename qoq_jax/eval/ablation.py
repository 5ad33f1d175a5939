"""The accuracy table of docs/ACCURACY.md: float vs RTN vs QoQ, and QoQ's steps added in turn.

    python -m qoq_jax.eval.ablation --out docs/accuracy.json

Every row is W4A8KV4 through the real inference path (packed weights, INT8 activations, KV4)
except "float". Steps are added in the paper's pipeline order: rotation, SmoothAttention, output
smoothing, reordering (groups) or clipping (per-channel), GPTQ, all with fixed strengths; then
the searches of the paper's code one by one (SmoothAttention's and the output smoothing's
(alpha, beta) per layer, q/k clipping on the attention output for per-channel); then the per-head
Hadamard rotations of the V cache (deepcompressor's, in place of v->o smoothing) and of the K
cache, GPTQ's damping raised from the paper's 1% to 10% of the Hessian's mean diagonal,
(groups) the clipping search per group, and the KV4 quantizer's range search (every row before
it, RTN included, quantizes K/V over each row's min/max, as QServe: kv_cache "kv4-minmax"): the
last row of each format is the converter's default recipe. Perplexity is measured on the
Wikipedia summaries from the start (calibration draws from their second half) and on Botchan.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from qoq_jax.quant.config import PAPER_DAMP, SEARCHES, STEPS, QuantConfig

DEFAULT_DAMP = QuantConfig.gptq_damp


def rows_for(fmt: str) -> list[tuple[str, dict]]:
    """(label, QuantConfig overrides) for one weight format, each step added to the one before:
    the paper's steps with fixed strengths first, then each search of the paper's code in turn,
    then the per-head rotation of the V cache (in place of v->o smoothing, as deepcompressor),
    GPTQ's damping 10%, the K cache's rotation, (groups) the clipping search per group and the
    KV4 range search (before it: QServe's min/max KV4 quantizer). The last row is the
    converter's default recipe."""
    group = fmt != "per-channel"
    last = "reorder" if group else "clip"
    ladder = [("rotation", ["rotate"]), ("+ SmoothAttention", ["smooth_attention"]),
              ("+ output smoothing", ["smooth_out", "smooth_down"]),
              (f"+ {'reordering' if group else 'clipping'}", [last]),
              ("+ GPTQ (fixed strengths)", ["gptq"]),
              ("+ SmoothAttention search", ["search_smooth_attention"]),
              ("+ output smoothing search", ["search_smoothing"])]
    if not group:
        ladder.append(("+ q/k clipping search", ["search_qk_clip"]))
    ladder += [("+ V rotation (in place of v->o smoothing)", ["rotate_v", "-smooth_out"]),
               (f"+ GPTQ damping {DEFAULT_DAMP}", ["damp"]),
               ("+ K rotation", ["rotate_k"])]
    if group:
        ladder.append(("+ clipping search (per group)", ["clip"]))
    ladder.append(("+ KV4 range search", ["kv4_range"]))
    minmax = {"kv_cache": "kv4-minmax"}
    rows = [("RTN", {"method": "rtn", **minmax})]
    on: list[str] = []
    for label, steps in ladder:
        for step in steps:
            if step.startswith("-"):
                on.remove(step[1:])
            else:
                on.append(step)
        damp = DEFAULT_DAMP if "damp" in on else PAPER_DAMP
        kv = {} if "kv4_range" in on else minmax
        rows.append((label, {"gptq_damp": damp, **kv,
                             **{s: (s in on) for s in STEPS + SEARCHES}}))
    return rows


def _recipe(text: str) -> dict:
    try:
        overrides = json.loads(text)
        if not isinstance(overrides, dict):
            raise ValueError("not a JSON object")
        QuantConfig(**overrides)  # a bad field or value fails now, not after the float row
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qoq_jax.eval.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows per text")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--formats", nargs="+", default=["g128", "per-channel"],
                    choices=["g128", "g64", "per-channel"])
    ap.add_argument("--only-last", action="store_true",
                    help="only RTN and the full recipe (the last row) of each format")
    ap.add_argument("--rows", nargs="+", metavar="TEXT",
                    help="only the rows whose label contains one of these texts")
    ap.add_argument("--recipe", nargs="+", type=_recipe, metavar="JSON",
                    help="instead of the ladder, one row per recipe: QuantConfig fields as a "
                         "JSON object over the defaults, e.g. '{\"rotate_k\": false}'")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax import assets
    from qoq_jax.eval.data import load_documents, tokenize_joined
    from qoq_jax.eval.perplexity import perplexity

    fp = qoq_jax.load(args.model, dtype="float32")
    need = args.windows * args.seq_len
    texts = {"wiki": tokenize_joined(fp.tokenizer, load_documents(assets.wiki_summaries_path()),
                                     need),
             "botchan": tokenize_joined(fp.tokenizer, load_documents(assets.botchan_path()))}

    def measure(llm):
        return {name: perplexity(llm, ids, seq_len=args.seq_len, max_windows=args.windows,
                                 progress=False)["perplexity"] for name, ids in texts.items()}

    results = [{"variant": "float", "step": "float (16-bit KV)", **measure(fp)}]
    print(f"| variant | step | wiki | botchan |\n|---|---|---|---|\n| float | - | "
          f"{results[0]['wiki']:.3f} | {results[0]['botchan']:.3f} |", flush=True)
    for variant in args.formats:
        rows = rows_for(variant)
        if args.recipe:
            rows = [(json.dumps(r), r) for r in args.recipe]
        elif args.only_last:
            rows = rows[:1] + rows[-1:]
        if args.rows:
            rows = [r for r in rows if any(t in r[0] for t in args.rows)]
        for label, overrides in rows:
            t0 = time.perf_counter()
            qcfg = QuantConfig(**{"weight_format": variant, "calib_samples": args.calib_samples,
                                  "calib_seq_len": args.calib_seq_len, **overrides})
            llm = qoq_jax.load(args.model, dtype="float32", quantize=qcfg)
            row = {"variant": variant, "step": label, **measure(llm),
                   "recipe": qcfg.to_dict(),
                   "seconds": time.perf_counter() - t0}
            results.append(row)
            print(f"| {variant} | {label} | {row['wiki']:.3f} | {row['botchan']:.3f} |",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
