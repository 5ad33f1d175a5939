"""Perplexity on real text, GPTQ-style: the text tokenized and joined, non-overlapping windows.

    python -m qoq_jax.eval.perplexity                       # default model, Wikipedia summaries
    python -m qoq_jax.eval.perplexity --model CKPT --text botchan --max-windows 16 --json

Each window of --seq-len tokens is prefilled (in chunks) through the engine; perplexity = exp(mean negative log-likelihood
of every predicted token); the last partial window is dropped. A quantized checkpoint runs its
real inference path: packed W4 weights through the W4A8 GEMM, INT8 activations, and attention
over K/V exactly as the KV4 cache stores them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qoq_jax.cli import (ArgumentParser, CliError, add_kv_cache_arg, bounded_int, positive_int,
                         run_cli)


def perplexity(llm, token_ids, *, seq_len: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity of `llm` (qoq_jax.LLM) on token_ids; returns a dict of the figures.

    Windows go through qoq_jax.eval.scoring (the runner's score verb): the same paged cache,
    kernels and chunked prefill as generation, so a KV4 model is measured with its keys and
    values exactly as the cache stores them."""
    from tqdm.auto import tqdm

    from qoq_jax.eval.scoring import score

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one token predicts the next), got {seq_len}")
    if seq_len > llm.engine.max_context:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context "
                         f"{llm.engine.max_context}")
    n = len(token_ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens: not one window of {seq_len}")
    windows = np.asarray(token_ids[:n * seq_len], np.int32).reshape(n, seq_len)
    t0 = time.perf_counter()
    with tqdm(total=n, desc="perplexity", unit="window", disable=not progress) as bar:
        logp = score(llm.engine, windows, progress=bar.update)
    total = -float(logp.astype(np.float64).sum())
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": n,
            "seq_len": seq_len, "tokens": count, "seconds": time.perf_counter() - t0}


def resolve_text(name: str) -> str:
    from qoq_jax import assets

    return {"wiki": lambda: str(assets.wiki_summaries_path()),
            "botchan": lambda: str(assets.botchan_path())}.get(name, lambda: name)()


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m qoq_jax.eval.perplexity", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory, .gguf file, or quantized checkpoint "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default="wiki",
                    help="'wiki' (Wikipedia summaries, default), 'botchan', a plain-text file, "
                         "or a JSON file of documents")
    ap.add_argument("--seq-len", type=bounded_int(2, None), default=2048,
                    help="tokens per window (default 2048)")
    ap.add_argument("--max-windows", type=positive_int, help="evaluate only the first N windows")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    add_kv_cache_arg(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    import qoq_jax
    from qoq_jax.eval.data import load_documents, tokenize_joined

    kw = {} if args.kv_cache is None else {"kv_cache": args.kv_cache}
    text = resolve_text(args.text)
    if args.text not in ("wiki", "botchan") and not Path(text).exists():
        raise CliError(f"--text {args.text}: no such file (give 'wiki', 'botchan', a text file "
                       f"or a JSON file of documents)")
    docs = load_documents(text)  # first: a bad file fails before the model is loaded
    if not docs:
        raise ValueError(f"the text {args.text} holds no document")
    llm = qoq_jax.load(args.model, dtype=args.dtype, **kw)
    need = None if args.max_windows is None else args.max_windows * args.seq_len
    ids = tokenize_joined(llm.tokenizer, docs, need)
    result = perplexity(llm, ids, seq_len=args.seq_len, max_windows=args.max_windows,
                        progress=not args.json)
    result.update(model=llm.source, text=args.text, kv_cache=llm.engine.kv_cache,
                  dtype=jnp.dtype(llm.engine.dtype).name)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['windows']} windows of "
              f"{result['seq_len']} tokens ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
