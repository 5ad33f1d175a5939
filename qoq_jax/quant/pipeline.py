"""The QoQ pipeline, in the paper's order: rotate, reorder, smooth, quantize weights.

``quantize_weights`` walks the model one decoder layer at a time. For each layer it
1. reads the layer's float weights (float64 for the transforms) and, with rotation on, folds
   the RMSNorm weights and applies the Hadamard rotation (and, with rotate_v, the per-head
   Hadamard on v_proj -> o_proj; rotate_k changes no weight: the returned ModelConfig tells the
   model to rotate q and k after RoPE, and with smooth_rotated_keys to scale them per channel
   by each layer's self_attn.key_scale);
2. runs the layer once on the calibration inputs (``calibration.run_layer``): activation
   maxima, input Hessians, and the first ``search_tokens`` tokens' activations;
3. applies SmoothAttention and the output smoothing (v->o, up->down), with strengths searched
   per layer on those activations (``search.py``) or fixed; smoothing divides o_proj's and
   down_proj's inputs by lambda per channel, so their maxima and Hessians are rescaled rather
   than measured again;
4. reorders channels (groups) and quantizes every projection: clipping (per-channel: q/k_proj
   by the attention-output search, the others per row; groups: per row and group), then GPTQ
   or round-to-nearest;
5. passes the layer's float outputs on as the next layer's calibration inputs (the reference
   code calibrates each block on the transformed, not yet quantized, network; the transforms
   preserve the function, so the outputs are the transformed layer's), or with
   quantized_inputs the outputs of the layer with its new W4 weights (one more forward).
A mixture-of-experts layer goes through the same steps with its experts in place of the MLP
(quant/experts.py): each expert's input rotated as the MLP's (the 16-bit router rotated with
them), up->down smoothing, reordering, clipping and GPTQ per expert on the calibration tokens
routed to it; an expert no calibration token reached is quantized by RTN.
Only one layer's weights and activations are held at a time. The result is a flat mapping of
Hugging Face-style names to arrays: float tensors (embeddings, norms, lm_head, biases) and, per
projection, the packed format fields (``...q_proj.qweight``, ``.s1``, ``.s2``, ``.szero`` or
``.scale``, ``.szero``), which ``qoq_jax.model.from_hf_weights`` loads into W4A8 layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from pallas_kernels import packing
from qoq_jax.config import ModelConfig
from qoq_jax.hf import canonical_weights
from qoq_jax.kv_cache import kv_range_ratios
from qoq_jax.quant import experts, gptq, search, transforms
from qoq_jax.quant.calibration import HESSIAN_OF, LINEAR_NAMES, run_layer
from qoq_jax.quant.clipping import clip_ratios, search_group, search_per_channel
from qoq_jax.quant.config import QuantConfig
from qoq_jax.quant.hadamard import rotation_matrix

NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3's per-head norms


def layer_norms(cfg: ModelConfig) -> tuple[str, ...]:
    return NORMS + (QK_NORMS if cfg.qk_norm else ())


def linear_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The layer's dense projections quantized one by one (an MoE layer: attention's; its
    experts go through quant/experts.py)."""
    return tuple(n for n in LINEAR_NAMES if not (cfg.is_moe and n.startswith("mlp.")))


def layer_weight_names(cfg: ModelConfig) -> list[str]:
    names = [n + ".weight" for n in linear_names(cfg)] + [n + ".weight" for n in layer_norms(cfg)]
    if cfg.is_moe:  # the router and the stacked experts
        names += ["mlp.gate.weight"] + [n + ".weight" for n in experts.EXPERT_LINEARS]
    for n in linear_names(cfg):
        is_qkv = n in transforms.IN_LINEARS_ATTN
        if (is_qkv and cfg.qkv_bias) or (n == "self_attn.o_proj" and cfg.o_bias) or (
                n.startswith("mlp.") and cfg.mlp_bias):
            names.append(n + ".bias")
    return names


def format_fields(fmt) -> dict[str, np.ndarray]:
    if isinstance(fmt, packing.W4Group):
        return {"qweight": fmt.qweight, "s1": fmt.s1, "s2": fmt.s2, "szero": fmt.szero}
    return {"qweight": fmt.qweight, "scale": fmt.scale, "szero": fmt.szero}


@dataclasses.dataclass
class QuantReport:
    """What the pipeline chose, layer by layer: the searched strengths (SmoothAttention's and
    the output smoothing's (alpha, beta), q/k clipping ratios) and each projection's effective
    weight format (g128 falls back to g64 where K % 128 != 0). Stored in the checkpoint's
    config.json next to the recipe."""

    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"formats": dict(self.formats), "layers": [dict(x) for x in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantReport":
        return cls(dict(d.get("formats", {})), [dict(x) for x in d.get("layers", [])])

    def describe(self, i: int) -> str:
        """One line for layer i: its searched choices (and its experts', for MoE)."""
        parts = [f"{k} {v[0]:.2f}/{v[1]:.2f}" if isinstance(v, (list, tuple)) else f"{k} {v:.2f}"
                 for k, v in self.layers[i].items() if k != "experts"]
        if "experts" in self.layers[i]:
            parts.append(experts.describe(self.layers[i]["experts"]))
        return f"layer {i}: " + (", ".join(parts) if parts else "no search")


def quantize_linear(w: np.ndarray, qcfg: QuantConfig, hessian: np.ndarray | None,
                    ratio: float | None = None):
    """One projection's packed format: clipping ranges (per-channel), then GPTQ or RTN codes.
    ratio: a clipping ratio searched for the whole projection (q/k_proj), instead of the per-row
    search."""
    w = np.asarray(w, np.float32)
    use_gptq = qcfg.gptq and hessian is not None
    fmt = qcfg.weight_format
    if not fmt.is_group:
        lo = hi = None
        if ratio is not None:
            lo = np.minimum(w.min(axis=1), 0.0) * ratio
            hi = np.maximum(w.max(axis=1), 0.0) * ratio
        elif qcfg.clip and hessian is not None:
            lo, hi = search_per_channel(w, hessian, qcfg.clip_grid, qcfg.clip_min)
        if use_gptq:
            return gptq.gptq_per_channel(w, hessian, lo, hi, qcfg.gptq_damp)
        return packing.quantize_per_channel(w, lo, hi)
    ratio = None
    if qcfg.clip and hessian is not None:
        group_size = fmt.for_input_size(w.shape[1]).group_size
        ratio = search_group(w, hessian, group_size, qcfg.clip_grid, qcfg.clip_min)
    if use_gptq:
        return gptq.gptq_group(w, hessian, fmt.group_size, qcfg.gptq_damp, ratio)
    return packing.quantize_group(w, fmt.group_size, ratio=ratio)


def _served(cfg: ModelConfig, qcfg: QuantConfig) -> ModelConfig:
    """The config the quantized model runs with: the searches score what it will compute (the
    calibration itself runs the original layer: its statistics are of unrotated keys)."""
    return dataclasses.replace(cfg, key_rotation=bool(qcfg.rotate_k),
                               key_scale=bool(qcfg.smooth_rotated_keys))


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


@dataclasses.dataclass
class _Layer:
    """One transformed layer on its way to quantization."""

    index: int
    weights: dict[str, np.ndarray]
    hessians: dict[str, np.ndarray] | None
    qkv_input: np.ndarray | None  # captured q/k/v_proj input (for the q/k clipping search)
    choices: dict[str, Any]
    inputs: np.ndarray | None = None  # the layer's calibration inputs [S, T, D]
    expert_tokens: np.ndarray | None = None  # MoE: calibration rows routed to each expert
    # Set by the consumer before asking for the next layer: the next layer's calibration
    # inputs (the outputs of this layer with its weights quantized); None: the float outputs.
    next_inputs: np.ndarray | None = None


def _smooth(w: dict, cfg: ModelConfig, qcfg: QuantConfig, stats, choices: dict):
    """SmoothAttention, then v->o and up->down smoothing, each searched or fixed. Returns the
    weights and the lambdas that now divide o_proj's and down_proj's inputs (ones if off)."""
    lam_o = np.ones(cfg.num_heads * cfg.head_dim)
    lam_d = np.ones(cfg.intermediate_size)  # (MoE: per expert, in quant/experts.py)
    fmt = qcfg.weight_format
    steps = qcfg.search_grid
    cap = stats.captured
    lam_qk = np.ones((cfg.num_kv_heads, cfg.head_dim))  # q multiplied by it, k divided
    if qcfg.smooth_attention:
        if qcfg.search_smooth_attention:
            alpha, beta = search.search_smooth_attention(cap, stats.k_absmax, stats.q_absmax,
                                                         _served(cfg, qcfg), steps,
                                                         kv_range_ratios(qcfg.kv_cache))
            choices["smooth_attention"] = (alpha, beta)
        else:
            alpha, beta = qcfg.smooth_attention_alpha, 0.0
        w, lam_qk = transforms.smooth_attention(w, cfg, stats.k_absmax, alpha, stats.q_absmax,
                                                beta)
    if qcfg.smooth_rotated_keys:  # on the captured q/k, as the smoothed layer computes them
        w["self_attn.key_scale"] = transforms.rotated_key_scale(
            cap["q"] * np.repeat(lam_qk, cfg.q_per_kv, axis=0), cap["k"] / lam_qk, cfg,
            rotation_matrix(cfg.head_dim), qcfg.smooth_rotated_keys_alpha)
    # (on?, the choice's name, its lambda of (weights, alpha, beta), its transform, consumer,
    # the consumer's captured input); each transform returns (weights, lambda applied)
    outputs = (
        (qcfg.smooth_out, "smooth_out",
         lambda w, a, b: transforms.out_lambda(w, cfg, stats.o_absmax, a, b),
         lambda w, a, b: transforms.smooth_out(w, cfg, stats.o_absmax, a, b),
         "self_attn.o_proj", "o_in"),
        (qcfg.smooth_down, "smooth_down",
         lambda w, a, b: transforms.down_lambda(w, stats.down_absmax, a, b),
         lambda w, a, b: transforms.smooth_down(w, stats.down_absmax, a, b),
         "mlp.down_proj", "down_in"))
    lams = {"smooth_out": lam_o, "smooth_down": lam_d}
    for on, name, lambda_of, apply, consumer, inputs in outputs:
        if not on or (cfg.is_moe and name == "smooth_down"):
            continue
        ab = (qcfg.smooth_alpha, qcfg.smooth_beta)
        if qcfg.search_smoothing:
            ab = search.search_output_smoothing(cap[inputs], w[consumer + ".weight"],
                                                functools.partial(lambda_of, w), fmt, steps)
            choices[name] = ab
        w, lams[name] = apply(w, *ab)
    lam_o, lam_d = lams["smooth_out"], lams["smooth_down"]
    return w, lam_o, lam_d


def _transformed_layers(cfg: ModelConfig, weights, qcfg: QuantConfig, rot, embed,
                        calib_tokens, want_hessians: bool):
    """Yields each layer transformed (a _Layer), one layer at a time."""
    x = None if calib_tokens is None or not qcfg.needs_calibration else embed[calib_tokens]
    names = layer_weight_names(cfg)
    searching = (qcfg.search_smooth_attention or qcfg.search_smoothing or qcfg.search_qk_clip
                 or qcfg.smooth_rotated_keys)  # (these need the captured activations too)
    capture = 0
    if x is not None and searching:  # whole samples, at least one
        capture = max(1, min(x.shape[0], qcfg.search_tokens // x.shape[1]))
    for i in range(cfg.num_layers):
        w = {n: np.asarray(weights[f"model.layers.{i}.{n}"], np.float64) for n in names}
        if rot is not None:
            w = transforms.rotate_layer(w, rot)
        if qcfg.rotate_v:
            w = transforms.rotate_v_heads(w, cfg, rotation_matrix(cfg.head_dim))
        hessians, qkv_input, choices, expert_tokens = None, None, {}, None
        if cfg.is_moe and x is None:  # no calibration (RTN): the report still lists experts
            choices["experts"] = [{"tokens": None} for _ in range(cfg.num_experts)]
        if x is not None:
            x_next, stats = run_layer(w, cfg, x, hessians=want_hessians, capture=capture)
            w, lam_o, lam_d = _smooth(w, cfg, qcfg, stats, choices)
            qkv_input = None if stats.captured is None else stats.captured["h"]
            # The smoothed layer computes the same function (its output is x_next) and its
            # o_proj / down_proj inputs are the ones measured, divided by lambda per channel:
            # their maxima and Hessians follow without running the layer a second time. The
            # q/k/v and gate/up inputs (RMSNorm outputs) do not change at all.
            o_absmax = stats.o_absmax / lam_o
            down_absmax = None if cfg.is_moe else stats.down_absmax / lam_d
            hessians = stats.hessians
            if hessians is not None:
                hessians["o"] = hessians["o"] / np.outer(lam_o, lam_o)
                if not cfg.is_moe:
                    hessians["down"] = hessians["down"] / np.outer(lam_d, lam_d)
            if cfg.is_moe:  # up->down smoothing and reordering per expert
                w, choices["experts"] = experts.smooth_and_reorder(w, stats, qcfg, hessians)
                expert_tokens = stats.expert_tokens
            elif qcfg.reorder:
                w, perm = transforms.reorder_down(w, down_absmax)
                if hessians is not None:  # the same permutations, applied to the Hessians
                    hessians["down"] = hessians["down"][perm][:, perm]
            if qcfg.reorder and not qcfg.rotate_v:  # rotated heads have no salient channels
                w, perms = transforms.reorder_out(w, cfg, o_absmax)
                if hessians is not None:
                    o_idx = (np.arange(cfg.num_heads)[:, None] * cfg.head_dim
                             + np.repeat(perms, cfg.q_per_kv, axis=0)).reshape(-1)
                    hessians["o"] = hessians["o"][o_idx][:, o_idx]
        layer = _Layer(i, w, hessians, qkv_input, choices, inputs=x,
                       expert_tokens=expert_tokens)
        yield layer
        if x is not None:
            x = x_next if layer.next_inputs is None else layer.next_inputs


def quantize_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], qcfg: QuantConfig,
                     calib_tokens: np.ndarray | None = None, progress: bool = True
                     ) -> tuple[dict[str, np.ndarray], ModelConfig, QuantReport]:
    """Returns (named tensors of the quantized model, its ModelConfig, what was chosen)."""
    from tqdm.auto import tqdm

    if qcfg.needs_calibration and calib_tokens is None:
        raise ValueError(f"method {qcfg.method!r} with these steps needs calibration tokens")
    weights = canonical_weights(cfg, weights)
    report = QuantReport()
    rot = rotation_matrix(cfg.hidden_size) if qcfg.rotate else None
    out, qcfg_model = _transformed_ends(cfg, weights, rot)
    qcfg_model = _served(qcfg_model, qcfg)
    layers = _transformed_layers(cfg, weights, qcfg, rot, out["model.embed_tokens.weight"],
                                 calib_tokens, want_hessians=qcfg.clip or qcfg.gptq)
    bar = tqdm(layers, total=cfg.num_layers, desc=f"quantizing ({qcfg.method})", unit="layer",
               disable=not progress)
    ratios = clip_ratios(qcfg.clip_grid, qcfg.clip_min)
    for layer in bar:
        w, prefix = layer.weights, f"model.layers.{layer.index}."
        ratio_of = {}
        if qcfg.search_qk_clip and layer.qkv_input is not None:
            rq, rk = search.search_qk_clipping(layer.qkv_input, w, _served(cfg, qcfg), ratios,
                                               kv_ratios=kv_range_ratios(qcfg.kv_cache))
            ratio_of = {"self_attn.q_proj": rq, "self_attn.k_proj": rk}
            layer.choices["clip_q"], layer.choices["clip_k"] = rq, rk
        report.layers.append(layer.choices)
        if layer.choices and progress:
            bar.write(report.describe(layer.index))
        formats = {}
        for name in linear_names(cfg):
            h = None if layer.hessians is None else layer.hessians[HESSIAN_OF[name]]
            fmt = formats[name] = quantize_linear(w[name + ".weight"], qcfg, h,
                                                  ratio_of.get(name))
            report.formats[name] = qcfg.weight_format.for_input_size(
                w[name + ".weight"].shape[1]).value
            for field, value in format_fields(fmt).items():
                out[f"{prefix}{name}.{field}"] = np.asarray(value)
            if name + ".bias" in w:
                out[f"{prefix}{name}.bias"] = w[name + ".bias"].astype(np.float32)
        if cfg.is_moe:  # the router stays 16-bit; the experts one by one, stacked
            out[f"{prefix}mlp.gate.weight"] = w["mlp.gate.weight"].astype(np.float32)
            per_expert = experts.quantize_experts(w, qcfg, layer.hessians, layer.expert_tokens,
                                                  quantize_linear)
            for name, fmts in per_expert.items():
                report.formats[name] = qcfg.weight_format.for_input_size(
                    w[name + ".weight"].shape[2]).value
                for field, value in experts.stacked_fields(fmts).items():
                    out[f"{prefix}{name}.{field}"] = value
        for norm in layer_norms(cfg):
            out[f"{prefix}{norm}.weight"] = w[norm + ".weight"].astype(np.float32)
        if "self_attn.key_scale" in w:
            out[f"{prefix}self_attn.key_scale"] = w["self_attn.key_scale"].astype(np.float32)
        if qcfg.quantized_inputs and layer.inputs is not None:
            # GPTQ's sequential mode: the next layer calibrates on what this one computes with
            # its W4 weights, so its rounding can make up for this layer's error.
            wq = dict(w) | {n + ".weight": packing.dequantize(f).astype(np.float64)
                            for n, f in formats.items()}
            if cfg.is_moe:
                wq |= {n + ".weight": experts.dequantized(f) for n, f in per_expert.items()}
            layer.next_inputs, _ = run_layer(wq, cfg, layer.inputs)
    return out, qcfg_model, report


def transformed_float_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray],
                              qcfg: QuantConfig, calib_tokens: np.ndarray | None = None
                              ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """The float model after QoQ's function-preserving transforms only (rotation, smoothing,
    reordering), in HF names: it must compute the same logits as the original (tests check)."""
    weights = canonical_weights(cfg, weights)
    rot = rotation_matrix(cfg.hidden_size) if qcfg.rotate else None
    out, new_cfg = _transformed_ends(cfg, weights, rot)
    new_cfg = _served(new_cfg, qcfg)
    for layer in _transformed_layers(cfg, weights, qcfg, rot, out["model.embed_tokens.weight"],
                                     calib_tokens, want_hessians=False):
        out.update({f"model.layers.{layer.index}.{n}": v.astype(np.float32)
                    for n, v in layer.weights.items()})
    return out, new_cfg
