"""The QoQ pipeline, in the paper's order: rotate, reorder, smooth, quantize weights.

``quantize_weights`` walks the model one decoder layer at a time. For each layer it
1. reads the layer's float weights (float64 for the transforms) and, with rotation on, folds
   the RMSNorm weights and applies the Hadamard rotation;
2. runs the layer on the calibration inputs to collect activation maxima, and applies
   SmoothAttention and the output smoothing (v->o, up->down);
3. runs the smoothed layer again for the input Hessians, reorders channels (g128), and
   quantizes every projection (clipping search for per-channel; progressive groups for g128);
4. passes the smoothed float layer's outputs on as the next layer's calibration inputs (the
   reference code calibrates each block on the transformed, not yet quantized, network).
Only one layer's weights and activations are held at a time. The result is a flat mapping of
Hugging Face-style names to arrays: float tensors (embeddings, norms, lm_head, biases) and, per
projection, the packed format fields (``...q_proj.qweight``, ``.s1``, ``.s2``, ``.szero`` or
``.scale``, ``.szero``), which ``qoq_jax.model.from_hf_weights`` loads into W4A8 layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from pallas_kernels import packing
from qoq_jax.config import ModelConfig
from qoq_jax.quant import gptq, transforms
from qoq_jax.quant.calibration import HESSIAN_OF, LINEAR_NAMES, run_layer
from qoq_jax.quant.clipping import search_per_channel
from qoq_jax.quant.config import QuantConfig
from qoq_jax.quant.hadamard import rotation_matrix

NORMS = ("input_layernorm", "post_attention_layernorm")


def layer_weight_names(cfg: ModelConfig) -> list[str]:
    names = [n + ".weight" for n in LINEAR_NAMES] + [n + ".weight" for n in NORMS]
    for n in LINEAR_NAMES:
        is_qkv = n in transforms.IN_LINEARS_ATTN
        if (is_qkv and cfg.qkv_bias) or (n == "self_attn.o_proj" and cfg.o_bias) or (
                n.startswith("mlp.") and cfg.mlp_bias):
            names.append(n + ".bias")
    return names


def format_fields(fmt) -> dict[str, np.ndarray]:
    if isinstance(fmt, packing.W4Group):
        return {"qweight": fmt.qweight, "s1": fmt.s1, "s2": fmt.s2, "szero": fmt.szero}
    return {"qweight": fmt.qweight, "scale": fmt.scale, "szero": fmt.szero}


def quantize_linear(w: np.ndarray, qcfg: QuantConfig, hessian: np.ndarray | None):
    """One projection's packed format: clipping ranges (per-channel), then GPTQ or RTN codes."""
    w = np.asarray(w, np.float32)
    use_gptq = qcfg.gptq and hessian is not None
    if qcfg.group_size == -1:
        lo = hi = None
        if qcfg.clip and hessian is not None:
            lo, hi = search_per_channel(w, hessian, qcfg.clip_grid, qcfg.clip_min)
        if use_gptq:
            return gptq.gptq_per_channel(w, hessian, lo, hi)
        return packing.quantize_per_channel(w, lo, hi)
    if use_gptq:
        return gptq.gptq_group(w, hessian, qcfg.group_size)
    return packing.quantize_group(w, qcfg.group_size)


def _transformed_ends(cfg: ModelConfig, weights, rot):
    """Embedding, final norm and lm_head after rotation (the final norm folded into lm_head,
    which unties tied embeddings). Returns (tensors, config)."""
    f64 = lambda name: np.asarray(weights[name], np.float64)  # noqa: E731
    embed = f64("model.embed_tokens.weight")
    head = embed if cfg.tie_word_embeddings else f64("lm_head.weight")
    final_norm = f64("model.norm.weight")
    if rot is not None:
        head, embed = (head * final_norm[None, :]) @ rot, embed @ rot
        final_norm = np.ones_like(final_norm)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    out = {"model.embed_tokens.weight": embed.astype(np.float32),
           "model.norm.weight": final_norm.astype(np.float32)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = head.astype(np.float32)
    return out, cfg


def _transformed_layers(cfg: ModelConfig, weights, qcfg: QuantConfig, rot, embed,
                        calib_tokens, want_hessians: bool):
    """Yields (layer index, transformed float64 weights, input Hessians or None), layer by layer."""
    x = None if calib_tokens is None or not qcfg.needs_calibration else embed[calib_tokens]
    names = layer_weight_names(cfg)
    for i in range(cfg.num_layers):
        w = {n: np.asarray(weights[f"model.layers.{i}.{n}"], np.float64) for n in names}
        if rot is not None:
            w = transforms.rotate_layer(w, rot)
        hessians = None
        if x is not None:
            _, stats = run_layer(w, cfg, x)
            if qcfg.smooth_attention:
                w = transforms.smooth_attention(w, cfg, stats.k_absmax,
                                                qcfg.smooth_attention_alpha)
            if qcfg.smooth_out:
                w = transforms.smooth_out(w, cfg, stats.o_absmax, qcfg.smooth_alpha,
                                          qcfg.smooth_beta)
            if qcfg.smooth_down:
                w = transforms.smooth_down(w, stats.down_absmax, qcfg.smooth_alpha,
                                           qcfg.smooth_beta)
            x_next, stats = run_layer(w, cfg, x, hessians=want_hessians)
            hessians = stats.hessians
            if qcfg.reorder:
                w, perm = transforms.reorder_down(w, stats.down_absmax)
                w, perms = transforms.reorder_out(w, cfg, stats.o_absmax)
                if hessians is not None:  # the same permutations, applied to the Hessians
                    hessians["down"] = hessians["down"][perm][:, perm]
                    o_idx = (np.arange(cfg.num_heads)[:, None] * cfg.head_dim
                             + np.repeat(perms, cfg.q_per_kv, axis=0)).reshape(-1)
                    hessians["o"] = hessians["o"][o_idx][:, o_idx]
            x = x_next
        yield i, w, hessians


def quantize_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], qcfg: QuantConfig,
                     calib_tokens: np.ndarray | None = None, progress: bool = True
                     ) -> tuple[dict[str, np.ndarray], ModelConfig, QuantConfig]:
    """Returns (named tensors of the quantized model, its ModelConfig, the filled QuantConfig)."""
    from tqdm.auto import tqdm

    if qcfg.needs_calibration and calib_tokens is None:
        raise ValueError(f"method {qcfg.method!r} with these steps needs calibration tokens")
    qcfg = dataclasses.replace(qcfg, layer_group_sizes={})
    rot = rotation_matrix(cfg.hidden_size) if qcfg.rotate else None
    out, qcfg_model = _transformed_ends(cfg, weights, rot)
    layers = _transformed_layers(cfg, weights, qcfg, rot, out["model.embed_tokens.weight"],
                                 calib_tokens, want_hessians=qcfg.clip or qcfg.gptq)
    for i, w, hessians in tqdm(layers, total=cfg.num_layers, desc=f"quantizing ({qcfg.method})",
                               unit="layer", disable=not progress):
        prefix = f"model.layers.{i}."
        for name in LINEAR_NAMES:
            h = None if hessians is None else hessians[HESSIAN_OF[name]]
            fmt = quantize_linear(w[name + ".weight"], qcfg, h)
            qcfg.layer_group_sizes[name] = -1 if qcfg.group_size == -1 else fmt.group_size
            for field, value in format_fields(fmt).items():
                out[f"{prefix}{name}.{field}"] = np.asarray(value)
            if name + ".bias" in w:
                out[f"{prefix}{name}.bias"] = w[name + ".bias"].astype(np.float32)
        for norm in NORMS:
            out[f"{prefix}{norm}.weight"] = w[norm + ".weight"].astype(np.float32)
    return out, qcfg_model, qcfg


def transformed_float_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray],
                              qcfg: QuantConfig, calib_tokens: np.ndarray | None = None
                              ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """The float model after QoQ's function-preserving transforms only (rotation, smoothing,
    reordering), in HF names: it must compute the same logits as the original (tests check)."""
    rot = rotation_matrix(cfg.hidden_size) if qcfg.rotate else None
    out, new_cfg = _transformed_ends(cfg, weights, rot)
    for i, w, _ in _transformed_layers(cfg, weights, qcfg, rot, out["model.embed_tokens.weight"],
                                       calib_tokens, want_hessians=False):
        out.update({f"model.layers.{i}.{n}": v.astype(np.float32) for n, v in w.items()})
    return out, new_cfg
