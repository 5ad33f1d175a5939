"""QoQ's function-preserving weight transforms (qserve_spec.md sections 1.7-1.10).

Each function takes the weights of one decoder layer, named relative to the layer
("self_attn.q_proj.weight", ...; float64 numpy, HF layout [out, in]) and returns new ones that
compute the same function (up to rounding), with activations or weights that quantize better.

- rotate_layer:        fold RMSNorm weights into the next linears, then rotate the residual
                       stream by an orthogonal Hadamard R (inputs W R, outputs Rᵀ W)
- smooth_attention:    q_proj rows x lambda, k_proj rows / lambda, lambda = max|K_c|^alpha /
                       max|Q_c|^beta from post-RoPE maxima, shared by each RoPE pair (c, c + d/2)
                       and each GQA group; with Qwen3's per-head q/k RMSNorm, lambda goes into
                       the norms' weights instead (shared by all heads, as those weights are)
- smooth_out / smooth_down: SmoothQuant-style lambda_j = max|X_j|^alpha / max|W_:,j|^beta
                       moved from o_proj's inputs into v_proj's rows (GQA-aware), and from
                       down_proj's inputs into up_proj's rows
- reorder_down / reorder_out: permute input channels by ascending max|X_j| so channels of similar
                       size share a quantization group (g128)
- rotate_v_heads:      a Hadamard of size head_dim per head on v_proj's outputs and o_proj's
                       inputs (deepcompressor's addition): the V cache is stored rotated, its
                       outlier channels spread over the head, which KV4 rounds far better
"""

from __future__ import annotations

import numpy as np

from qoq_jax.config import ModelConfig

IN_LINEARS_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
IN_LINEARS_MLP = ("mlp.gate_proj", "mlp.up_proj")
# a mixture-of-experts layer's readers of the normalised input: the router and every expert's
# gate/up (stacked [E, F, D]); its writer: every expert's down_proj [E, D, F]
IN_LINEARS_MOE = ("mlp.gate", "mlp.experts.gate_proj", "mlp.experts.up_proj")
OUT_LINEARS_MLP = ("mlp.down_proj",)
OUT_LINEARS_MOE = ("mlp.experts.down_proj",)


def _mlp_linears(w: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(readers, writers) of the MLP block: the dense projections or the experts'."""
    if "mlp.experts.down_proj.weight" in w:
        return IN_LINEARS_MOE, OUT_LINEARS_MOE
    return IN_LINEARS_MLP, OUT_LINEARS_MLP


def _scale_rows(w: dict, name: str, factor: np.ndarray) -> None:
    w[name + ".weight"] = w[name + ".weight"] * factor[:, None]
    if name + ".bias" in w:
        w[name + ".bias"] = w[name + ".bias"] * factor


def fold_norm_into(w: dict, norm: str, linears: tuple[str, ...]) -> None:
    gamma = w[norm + ".weight"]
    for name in linears:
        w[name + ".weight"] = w[name + ".weight"] * gamma[None, :]
    w[norm + ".weight"] = np.ones_like(gamma)


def rotate_layer(w: dict, rot: np.ndarray) -> dict:
    """Fold both norms, then W <- W R for the residual's readers and W <- Rᵀ W for its writers.
    An MoE layer's readers are its router (16-bit, rotated all the same: it reads the rotated
    residual) and its experts' gate/up, its writers the experts' down_proj (stacked: numpy's
    matmul applies R to each expert)."""
    w = dict(w)
    mlp_in, mlp_out = _mlp_linears(w)
    fold_norm_into(w, "input_layernorm", IN_LINEARS_ATTN)
    fold_norm_into(w, "post_attention_layernorm", mlp_in)
    for name in IN_LINEARS_ATTN + mlp_in:
        w[name + ".weight"] = w[name + ".weight"] @ rot
    for name in ("self_attn.o_proj",) + mlp_out:
        w[name + ".weight"] = rot.T @ w[name + ".weight"]
        if name + ".bias" in w:
            w[name + ".bias"] = rot.T @ w[name + ".bias"]
    return w


def rotate_v_heads(w: dict, cfg: ModelConfig, rot: np.ndarray) -> dict:
    """v <- Rᵀ v per KV head (v_proj rows and bias), o_proj's columns of every query head <- W R:
    attention mixes tokens, not channels, so each head's output arrives rotated by Rᵀ and o_proj
    undoes it. rot: an orthogonal [head_dim, head_dim] matrix."""
    hd, hkv, hq = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    w = dict(w)
    v = w["self_attn.v_proj.weight"].reshape(hkv, hd, -1)
    w["self_attn.v_proj.weight"] = np.einsum("dc,hdi->hci", rot, v).reshape(hkv * hd, -1)
    if "self_attn.v_proj.bias" in w:
        w["self_attn.v_proj.bias"] = (w["self_attn.v_proj.bias"].reshape(hkv, hd) @ rot
                                      ).reshape(-1)
    o = w["self_attn.o_proj.weight"]
    w["self_attn.o_proj.weight"] = (o.reshape(o.shape[0], hq, hd) @ rot).reshape(o.shape)
    return w


def _safe(lam: np.ndarray) -> np.ndarray:
    lam = np.where((lam > 0) & np.isfinite(lam), lam, 1.0)
    return lam if np.all(np.isfinite(lam)) else np.ones_like(lam)


def attention_lambda(k_span: np.ndarray, q_span: np.ndarray | None, cfg: ModelConfig,
                     alpha: float, beta: float = 0.0, xp=np) -> np.ndarray:
    """SmoothAttention's lambda [Hkv, D] = K_span^alpha / Q_span^beta from post-RoPE maxima
    (k_span [Hkv * D], q_span [Hq * D]), one value per RoPE pair (c, c + D/2) and per KV head (the
    query span is max-reduced over the group's query heads). xp: numpy, or jax.numpy under jit."""
    hd, hkv, g = cfg.head_dim, cfg.num_kv_heads, cfg.q_per_kv
    pos = lambda t: xp.where(t > 0, t, 1.0)  # noqa: E731  (zero spans count as 1)
    k_pair = k_span.reshape(hkv, 2, hd // 2).max(axis=1)
    q_pair = None if q_span is None else q_span.reshape(hkv, g, 2, hd // 2).max(axis=(1, 2))
    if cfg.qk_norm:
        # Qwen3 normalises each head's q and k before RoPE: a scale of the projection rows
        # would be undone by the norm, so lambda is folded into the norm weights, which every
        # head shares: one lambda for all heads (spans max-reduced over them)
        k_pair = xp.broadcast_to(k_pair.max(axis=0, keepdims=True), k_pair.shape)
        if q_pair is not None:
            q_pair = xp.broadcast_to(q_pair.max(axis=0, keepdims=True), q_pair.shape)
    lam = pos(k_pair) ** alpha
    if q_pair is not None:
        lam = lam / pos(q_pair) ** beta
    lam = xp.where(xp.isfinite(lam) & (lam > 0), lam, 1.0)
    return xp.concatenate([lam, lam], axis=1)


def smooth_attention(w: dict, cfg: ModelConfig, k_absmax: np.ndarray, alpha: float = 0.5,
                     q_absmax: np.ndarray | None = None, beta: float = 0.0
                     ) -> tuple[dict, np.ndarray]:
    """q rows x lambda, k rows / lambda, lambda from attention_lambda (the paper: beta = 0).
    Returns (weights, lambda [Hkv, D])."""
    lam = attention_lambda(k_absmax, q_absmax if beta else None, cfg, alpha, beta)
    w = dict(w)
    if cfg.qk_norm:  # into the per-head norms (RMSNorm(x) * weight: linear in the weight)
        w["self_attn.q_norm.weight"] = w["self_attn.q_norm.weight"] * lam[0]
        w["self_attn.k_norm.weight"] = w["self_attn.k_norm.weight"] / lam[0]
        return w, lam
    _scale_rows(w, "self_attn.k_proj", 1.0 / lam.reshape(-1))
    _scale_rows(w, "self_attn.q_proj", np.repeat(lam, cfg.q_per_kv, axis=0).reshape(-1))
    return w, lam


def rotated_key_scale(q: np.ndarray, k: np.ndarray, cfg: ModelConfig, rot: np.ndarray,
                      alpha: float = 0.5) -> np.ndarray:
    """The model's key_scale [Hkv, D] (ModelConfig.key_scale): lambda = rms(K)^alpha /
    rms(Q)^(1 - alpha) per channel of the keys and queries as the model rotates them per head
    after RoPE (q [..., Hq, D], k [..., Hkv, D] post-RoPE, times rot [D, D]; a KV head's query
    heads pooled). The keys are divided by it, the queries multiplied.

    Why: KV4 rounds each key row with one step, proportional to the row's range; a score's
    error is then sum_c q_c e_c, of variance ~ step^2 * sum_c E[q_c^2] / d_c^2 for keys scaled
    by d = 1 / lambda. With the range taken as the scaled row's norm, the product
    sum_c rms(k_c)^2 d_c^2 * sum_c rms(q_c)^2 / d_c^2 is least (Cauchy-Schwarz) at
    d_c^2 = rms(q_c) / rms(k_c): alpha = 0.5; a range closer to the row's max favours larger
    alpha. In the rotated basis a channel is free of its RoPE pair, so each gets its own
    lambda. Root mean squares, not SmoothAttention's maxima, which a few thousand calibration
    tokens estimate poorly (docs/ACCURACY.md). Normalized to a geometric mean of 1 per head."""
    hkv, hd = cfg.num_kv_heads, cfg.head_dim
    kr = np.asarray(k, np.float64).reshape(-1, hkv, hd) @ rot
    qr = np.asarray(q, np.float64).reshape(-1, hkv, cfg.q_per_kv, hd) @ rot
    k_rms = np.sqrt(np.mean(kr * kr, axis=0))
    q_rms = np.sqrt(np.mean(qr * qr, axis=(0, 2)))
    pos = lambda t: np.where(t > 0, t, 1.0)  # noqa: E731  (zero channels count as 1)
    lam = pos(k_rms) ** alpha / pos(q_rms) ** (1.0 - alpha)
    return lam / np.exp(np.log(lam).mean(axis=1, keepdims=True))


def smooth_lambda(x_absmax: np.ndarray, w_colmax: np.ndarray, alpha: float,
                  beta: float) -> np.ndarray:
    """lambda_j = max|X_j|^alpha / max|W_:,j|^beta (zeros and non-finite values -> 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if alpha == 0:
            lam = w_colmax ** -beta
        else:
            lam = x_absmax ** alpha / w_colmax ** beta
    return _safe(lam)


def out_lambda(w: dict, cfg: ModelConfig, o_absmax: np.ndarray, alpha: float,
               beta: float) -> np.ndarray:
    """v->o lambda for o_proj's input channels [Hq * D]. With GQA one v row feeds several query
    heads; the lambda of the group's first head is used for all of them."""
    hd, hkv, g = cfg.head_dim, cfg.num_kv_heads, cfg.q_per_kv
    lam = smooth_lambda(o_absmax, np.abs(w["self_attn.o_proj.weight"]).max(axis=0), alpha, beta)
    return np.repeat(lam.reshape(hkv, g, hd)[:, :1, :], g, axis=1).reshape(-1)


def smooth_out(w: dict, cfg: ModelConfig, o_absmax: np.ndarray, alpha: float,
               beta: float) -> tuple[dict, np.ndarray]:
    """Move lambda (out_lambda) from o_proj's input channels into v_proj's rows. Returns the
    new weights and lambda (o_proj's inputs are now divided by it)."""
    hd, hkv, g = cfg.head_dim, cfg.num_kv_heads, cfg.q_per_kv
    lam = out_lambda(w, cfg, o_absmax, alpha, beta)
    lam_v = lam.reshape(hkv, g, hd)[:, 0, :]  # [Hkv, D]
    w = dict(w)
    _scale_rows(w, "self_attn.v_proj", 1.0 / lam_v.reshape(-1))
    w["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"] * lam[None, :]
    return w, lam


def down_lambda(w: dict, down_absmax: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """up->down lambda for down_proj's input channels [F]."""
    return smooth_lambda(down_absmax, np.abs(w["mlp.down_proj.weight"]).max(axis=0), alpha, beta)


def smooth_down(w: dict, down_absmax: np.ndarray, alpha: float,
                beta: float) -> tuple[dict, np.ndarray]:
    """Move lambda from down_proj's input channels into up_proj's rows (SwiGLU is linear in up).
    Returns the new weights and lambda (down_proj's inputs are now divided by it)."""
    lam = down_lambda(w, down_absmax, alpha, beta)
    w = dict(w)
    _scale_rows(w, "mlp.up_proj", 1.0 / lam)
    w["mlp.down_proj.weight"] = w["mlp.down_proj.weight"] * lam[None, :]
    return w, lam


def reorder_down(w: dict, down_absmax: np.ndarray) -> tuple[dict, np.ndarray]:
    """Permute the intermediate channels by ascending max|X|: gate/up rows, down columns."""
    perm = np.argsort(down_absmax, kind="stable")
    w = dict(w)
    for name in IN_LINEARS_MLP:
        w[name + ".weight"] = w[name + ".weight"][perm]
        if name + ".bias" in w:
            w[name + ".bias"] = w[name + ".bias"][perm]
    w["mlp.down_proj.weight"] = w["mlp.down_proj.weight"][:, perm]
    return w, perm


def reorder_out(w: dict, cfg: ModelConfig, o_absmax: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per KV head, permute the head's channels by ascending max|X| (over the group's query
    heads): v_proj rows and the matching o_proj columns of every head in the group."""
    hd, hkv, g = cfg.head_dim, cfg.num_kv_heads, cfg.q_per_kv
    metric = o_absmax.reshape(hkv, g, hd).max(axis=1)
    perms = np.stack([np.argsort(m, kind="stable") for m in metric])  # [Hkv, D]
    v_idx = (np.arange(hkv)[:, None] * hd + perms).reshape(-1)
    o_idx = (np.arange(hkv * g)[:, None] * hd + np.repeat(perms, g, axis=0)).reshape(-1)
    w = dict(w)
    w["self_attn.v_proj.weight"] = w["self_attn.v_proj.weight"][v_idx]
    if "self_attn.v_proj.bias" in w:
        w["self_attn.v_proj.bias"] = w["self_attn.v_proj.bias"][v_idx]
    w["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"][:, o_idx]
    return w, perms
