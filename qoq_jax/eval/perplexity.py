"""Perplexity on real text, GPTQ-style: the text tokenized and joined, non-overlapping windows.

    python -m qoq_jax.eval.perplexity                       # default model, Wikipedia summaries
    python -m qoq_jax.eval.perplexity --model CKPT --text botchan --max-windows 16 --json

Each window of --seq-len tokens is one prefill; perplexity = exp(mean negative log-likelihood
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

import jax
import jax.numpy as jnp
import numpy as np


def _window_nll(graphdef, params, kv_kind, tokens, page_size):
    """Sum of NLL over the predicted positions of each window [B, T] -> [B]."""
    from flax import nnx

    from qoq_jax.kv_cache import make_cache
    from qoq_jax.model import prefill

    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, t = tokens.shape
    per = -(-t // page_size)
    cache = make_cache(kv_kind, cfg.num_layers, 1 + b * per, page_size, cfg.num_kv_heads,
                       cfg.head_dim, model.dtype)
    table = 1 + jnp.arange(b * per, dtype=jnp.int32).reshape(b, per)
    lengths = jnp.full((b,), t, jnp.int32)
    logits, _ = prefill(model, tokens, lengths, cache, table, all_logits=True,
                        attend_stored_kv=True)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -picked.sum(axis=-1)


_window_nll_jit = jax.jit(_window_nll, static_argnums=(0, 2, 4))


def perplexity(llm, token_ids, *, seq_len: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `llm` (qoq_jax.LLM) on token_ids; returns a dict of the figures."""
    from tqdm.auto import tqdm

    if seq_len > llm.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context "
                         f"{llm.config.max_position_embeddings}")
    n = len(token_ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens: not one window of {seq_len}")
    ids = np.asarray(token_ids[:n * seq_len], np.int32).reshape(n, seq_len)
    engine = llm.engine
    total, t0 = 0.0, time.perf_counter()
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    for start in range(0, n, batch_size):
        chunk = ids[start:start + batch_size]
        nll = _window_nll_jit(engine.graphdef, engine.params, engine.kv_cache,
                              jnp.asarray(chunk), engine.page_size)
        total += float(np.asarray(nll, np.float64).sum())
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{math.exp(total / ((start + len(chunk)) * (seq_len - 1))):.3f}")
    bar.close()
    count = n * (seq_len - 1)
    return {"perplexity": math.exp(total / count), "nll": total / count, "windows": n,
            "seq_len": seq_len, "tokens": count, "seconds": time.perf_counter() - t0}


def resolve_text(name: str) -> str:
    from qoq_jax import assets

    return {"wiki": lambda: str(assets.wiki_summaries_path()),
            "botchan": lambda: str(assets.botchan_path())}.get(name, lambda: name)()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qoq_jax.eval.perplexity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF directory, .gguf file, or quantized checkpoint "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default="wiki",
                    help="'wiki' (Wikipedia summaries, default), 'botchan', a plain-text file, "
                         "or a JSON file of documents")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kv-cache", choices=["16bit", "kv4"],
                    help="default: kv4 for quantized checkpoints, 16bit otherwise")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax.eval.data import load_documents, tokenize_joined

    try:
        kw = {} if args.kv_cache is None else {"kv_cache": args.kv_cache}
        llm = qoq_jax.load(args.model, dtype=args.dtype, **kw)
        docs = load_documents(resolve_text(args.text))  # read from the start
        need = None if args.max_windows is None else args.max_windows * args.seq_len
        ids = tokenize_joined(llm.tokenizer, docs, need)
        result = perplexity(llm, ids, seq_len=args.seq_len, max_windows=args.max_windows,
                            batch_size=args.batch_size, progress=not args.json)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
