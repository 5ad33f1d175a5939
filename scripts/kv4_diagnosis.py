"""Where does KV4 lose accuracy? Perplexity of a checkpoint with K and V each rounded by a chosen
KV4 quantizer (or not at all), the numbers of docs/ACCURACY.md's KV4 section.

    .venv/bin/python scripts/kv4_diagnosis.py --model ckpt-g128 --k minmax --v none

The model runs with a 16-bit cache whose write is replaced: it rounds the keys (after RoPE, and
after the per-head rotation when the checkpoint has one) and the values through
quantize -> dequantize of pallas_kernels/kv4.py, so any quantizer can be tried without a kernel.
With --k searched --v searched it scores exactly what the "kv4" cache does.

Quantizers (--k / --v):
  none              16-bit
  minmax            QServe's: each row's [min, max]
  searched          today's KV4 write: the range searched over kv4.RANGE_RATIOS
  clip:R            [min, max] shrunk about the midpoint by the fixed ratio R
  search:LO:N       the range searched over N ratios from 1.0 down to LO
  asym:LO:N         max and min shrunk separately, N x N ratios from 1.0 down to LO
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np


def quantizer(spec: str):
    """The float function x [..., D] -> x_hat that a --k/--v spec names."""
    from pallas_kernels.kv4 import RANGE_RATIOS, _codes, _scale_zero, dequantize_kv4, quantize_kv4

    def kv4(ratios):  # the kernel's own quantizer over these candidate ranges
        return lambda x: dequantize_kv4(*quantize_kv4(x, tuple(ratios)))

    name, *args = spec.split(":")
    if name == "none":
        return lambda x: x
    if name == "minmax":
        return kv4((1.0,))
    if name == "searched":
        return kv4(RANGE_RATIOS)
    if name == "clip":
        return kv4((float(args[0]),))
    rs = np.linspace(1.0, float(args[0]), int(args[1]))
    if name == "search":
        return kv4(rs)
    if name != "asym":
        raise SystemExit(f"unknown quantizer {spec!r}")

    def asym(x):  # max shrunk by a, min by b, about the midpoint; per row the closest to x
        mx, mn = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
        mid, half = (mx + mn) / 2, (mx - mn) / 2
        outs = []
        for a in rs:
            for b in rs:
                scale, zero = _scale_zero(mid + half * a, mid - half * b)
                s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
                outs.append((_codes(x, scale, zero) - z32) * s32)
        outs = jnp.stack(outs)
        pick = jnp.square(outs - x).sum(-1).argmin(0)
        return jnp.take_along_axis(outs, pick[None, ..., None], 0)[0]

    return asym


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a QoQ checkpoint directory")
    ap.add_argument("--k", default="searched", help="the keys' quantizer (see above)")
    ap.add_argument("--v", default="searched", help="the values' quantizer (see above)")
    ap.add_argument("--first-exact", action="store_true",
                    help="keep position 0's K/V (the attention sink) in 16 bits")
    ap.add_argument("--windows", type=int, default=4, help="2048-token windows per text")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax import assets, kv_cache
    from qoq_jax.eval.data import load_documents, tokenize_joined
    from qoq_jax.eval.perplexity import perplexity
    from qoq_jax.layers import apply_rope

    fk, fv = quantizer(args.k), quantizer(args.v)

    def write(self, layer, k, v, cos, sin, page, slot):
        k = apply_rope(k, cos, sin)
        kq, vq = (f(a.astype(jnp.float32)).astype(a.dtype) for f, a in ((fk, k), (fv, v)))
        if args.first_exact:  # one prefill chunk per window: its row 0 is position 0
            first = (jnp.arange(k.shape[1]) == 0)[None, :, None, None] & (k.shape[1] > 1)
            kq, vq = jnp.where(first, k, kq), jnp.where(first, v, vq)
        at = (layer, page, slice(None), slot)
        return kv_cache.PagedKVCache(self.k.at[at].set(kq.astype(self.k.dtype)),
                                     self.v.at[at].set(vq.astype(self.v.dtype)))

    kv_cache.PagedKVCache.write = write
    t0 = time.perf_counter()
    llm = qoq_jax.load(args.model, dtype="float32", kv_cache="16bit", prefill_chunk=2048)
    tok = llm.tokenizer
    texts = {"wiki": tokenize_joined(tok, load_documents(assets.wiki_summaries_path()),
                                     args.windows * 2048),
             "botchan": tokenize_joined(tok, load_documents(assets.botchan_path()))}
    result = {name: perplexity(llm, ids, seq_len=2048, max_windows=args.windows,
                               progress=False)["perplexity"] for name, ids in texts.items()}
    print(json.dumps({**vars(args), **result, "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
