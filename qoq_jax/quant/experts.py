"""QoQ for the experts of a mixture-of-experts layer: every expert quantized like a dense MLP.

The experts' weights arrive stacked (mlp.experts.gate_proj.weight [E, F, D], up_proj alike,
down_proj [E, D, F]) and already rotated with the layer (transforms.rotate_layer rotates each
expert's input as the dense MLP's; the router, 16-bit, is rotated with them). Then, expert by
expert, on the calibration tokens the router sent to it (calibration.run_layer records them):

- up->down smoothing with the expert's own down_proj input maxima, its (alpha, beta) searched on
  the expert's captured rows (or the preset's);
- channel reordering (group formats) by those maxima;
- clipping and GPTQ with the Hessians of the expert's routed rows.

An expert that got no calibration token has no statistics: it is not smoothed or reordered and
is quantized by plain round-to-nearest (no clipping search, no GPTQ: there is no Hessian to
weigh them with, and an identity Hessian would only add noise to RTN); the report says so
(``"fallback": "rtn"``). Each expert's choices go to the layer's report entry under "experts".
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from pallas_kernels import packing
from qoq_jax.quant import search, transforms
from qoq_jax.quant.config import QuantConfig

GATE, UP, DOWN = "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"
EXPERT_LINEARS = (GATE, UP, DOWN)
# the dense names each expert's slice takes, so the dense transforms apply to it unchanged
DENSE_NAME = {GATE: "mlp.gate_proj", UP: "mlp.up_proj", DOWN: "mlp.down_proj"}
HESSIAN_OF = {GATE: "gate_up", UP: "gate_up", DOWN: "down"}


def expert_weights(w: dict[str, np.ndarray], e: int) -> dict[str, np.ndarray]:
    """Expert e's three projections under the dense MLP's names."""
    return {DENSE_NAME[n] + ".weight": w[n + ".weight"][e] for n in EXPERT_LINEARS}


def _set_expert(w: dict[str, np.ndarray], e: int, view: dict[str, np.ndarray]) -> None:
    for n in EXPERT_LINEARS:
        w[n + ".weight"][e] = view[DENSE_NAME[n] + ".weight"]


def _padded_rows(rows: np.ndarray) -> np.ndarray:
    """Rows padded with zeros to a power of two (zero rows add no output error), so the search
    compiles for a few row counts, not one per expert."""
    n = max(1, 1 << max(0, int(len(rows)) - 1).bit_length())
    return np.concatenate([rows, np.zeros((n - len(rows), rows.shape[1]), rows.dtype)])


def smooth_and_reorder(w: dict[str, np.ndarray], stats, qcfg: QuantConfig,
                       hessians: dict[str, np.ndarray] | None
                       ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Per expert: up->down smoothing (searched or fixed), then reordering for groups; the
    expert's down_proj Hessian follows both (rescaled and permuted, not measured again).
    Returns (weights, each expert's report entry). `w` is not changed in place."""
    w = {k: (np.array(v) if k.startswith("mlp.experts.") else v) for k, v in w.items()}
    captured = (stats.captured or {}).get("down_in")
    entries = []
    for e, tokens in enumerate(stats.expert_tokens):
        entry: dict[str, Any] = {"tokens": int(tokens)}
        entries.append(entry)
        if tokens == 0:
            entry["fallback"] = "rtn"
            continue
        view = expert_weights(w, e)
        amax = stats.down_absmax[e]
        if qcfg.smooth_down:
            ab = (qcfg.smooth_alpha, qcfg.smooth_beta)
            rows = None if captured is None else captured[e]
            if qcfg.search_smoothing and rows is not None and len(rows):
                lambda_of = functools.partial(transforms.down_lambda, view, amax)
                ab = search.search_output_smoothing(
                    _padded_rows(rows), view["mlp.down_proj.weight"], lambda_of,
                    qcfg.weight_format, qcfg.search_grid)
                entry["smooth_down"] = ab
            view, lam = transforms.smooth_down(view, amax, *ab)
            amax = amax / lam
            if hessians is not None:
                hessians["down"][e] = hessians["down"][e] / np.outer(lam, lam)
        if qcfg.reorder:
            view, perm = transforms.reorder_down(view, amax)
            if hessians is not None:
                hessians["down"][e] = hessians["down"][e][perm][:, perm]
        _set_expert(w, e, view)
    return w, entries


def quantize_experts(w: dict[str, np.ndarray], qcfg: QuantConfig,
                     hessians: dict[str, np.ndarray] | None, tokens: np.ndarray | None,
                     quantize_linear) -> dict[str, list]:
    """Each expert's three projections in the recipe's format: {name: [E formats]}.
    quantize_linear: the pipeline's (w, qcfg, hessian) -> format (clipping, GPTQ or RTN)."""
    num = w[GATE + ".weight"].shape[0]
    out: dict[str, list] = {n: [] for n in EXPERT_LINEARS}
    for e in range(num):
        routed = hessians is not None and (tokens is None or tokens[e] > 0)
        for n in EXPERT_LINEARS:
            h = hessians[HESSIAN_OF[n]][e] if routed else None
            out[n].append(quantize_linear(w[n + ".weight"][e], qcfg, h))
    return out


def stacked_fields(formats: list) -> dict[str, np.ndarray]:
    """E formats of one projection -> its fields stacked on a leading expert axis."""
    first = formats[0]
    names = (("qweight", "s1", "s2", "szero") if isinstance(first, packing.W4Group)
             else ("qweight", "scale", "szero"))
    return {f: np.stack([np.asarray(getattr(x, f)) for x in formats]) for f in names}


def dequantized(formats: list) -> np.ndarray:
    """[E, N, K] float64: what the stacked formats represent (GPTQ's sequential mode)."""
    return np.stack([packing.dequantize(f).astype(np.float64) for f in formats])


def describe(entries: list[dict[str, Any]]) -> str:
    """One line for a layer's experts: tokens each, searched strengths, fallbacks."""
    if all(x["tokens"] is None for x in entries):
        return f"{len(entries)} experts (no calibration)"
    tokens = "/".join(str(x["tokens"]) for x in entries)
    parts = [f"experts' tokens {tokens}"]
    searched = [x["smooth_down"] for x in entries if "smooth_down" in x]
    if searched:
        parts.append("smooth_down " + " ".join(f"{a:.2f}/{b:.2f}" for a, b in searched))
    rtn = [str(i) for i, x in enumerate(entries) if x.get("fallback") == "rtn"]
    if rtn:
        parts.append(f"no calibration tokens: RTN for expert {','.join(rtn)}")
    return ", ".join(parts)
