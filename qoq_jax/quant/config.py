"""QuantConfig: the whole QoQ recipe, recorded in a quantized checkpoint's config.json.

Frozen: what the user asked for is what the checkpoint records. Steps left at None take the
method's default ("qoq": the paper's recipe (reordering for group formats, clipping for
per-channel) with deepcompressor's per-head V rotation in place of v->o smoothing, the K cache
rotated per head when it is KV4, and the clipping search for group formats too (each measured
in docs/ACCURACY.md); nothing for "rtn"); an explicit value is kept, and one that contradicts
the method (a transform with "rtn") is an error, not silently overridden. What the pipeline
*chose* (searched strengths, the effective format per projection) is not the recipe: it comes
back separately, as ``pipeline.QuantReport``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pallas_kernels.packing import WeightFormat

METHODS = ("qoq", "rtn")
# The steps of the pipeline, in the paper's order; None = the method's default.
STEPS = ("rotate", "rotate_v", "rotate_k", "smooth_attention", "smooth_rotated_keys",
         "smooth_out", "smooth_down", "reorder", "clip", "gptq")
SEARCHES = ("search_smooth_attention", "search_smoothing", "search_qk_clip")

# Output-smoothing (alpha, beta) of the paper's code per model (qserve_spec.md section 1.12):
# lambda_j = max|X_j|^alpha / max|W_:,j|^beta on out_proj (v->o) and down_proj (up->down).
SMOOTH_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "llama-2-7b": {"per_channel": (0.0, 1.0), "group": (0.3, 0.7)},
    "llama-2-13b": {"per_channel": (0.15, 0.85), "group": (0.25, 0.75)},
    "llama-2-70b": {"per_channel": (0.15, 0.85), "group": (0.3, 0.7)},
    "llama-7b": {"per_channel": (0.05, 0.95), "group": (0.3, 0.7)},
    "llama-13b": {"per_channel": (0.1, 0.9), "group": (0.1, 0.9)},
    "llama-30b": {"per_channel": (0.1, 0.9), "group": (0.2, 0.8)},
    "llama-3-8b": {"per_channel": (0.05, 0.95), "group": (0.3, 0.7)},
    "mistral-7b": {"per_channel": (0.1, 0.9), "group": (0.15, 0.85)},
    "yi-34b": {"per_channel": (0.2, 0.8), "group": (0.3, 0.7)},
    "mixtral-8x7b": {"per_channel": (0.05, 0.95), "group": (0.2, 0.8)},
}
DEFAULT_PRESET = "llama-3-8b"
PAPER_DAMP = 0.01  # GPTQ damping of the paper's code (qserve_spec.md section 1.11)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str = "qoq"
    weight_format: WeightFormat = WeightFormat.G128  # also accepts "g64", "per-channel", -1/128/64
    kv_cache: str = "kv4"  # the cache the model is served with: "kv4", "kv4-minmax", "16bit"
    rotate: bool | None = None  # block input rotation (Hadamard), norms folded first
    smooth_attention: bool | None = None  # SmoothAttention on post-RoPE keys
    smooth_attention_alpha: float = 0.5  # the fixed strength (when not searched)
    rotate_v: bool | None = None  # per-head Hadamard on v_proj -> o_proj (the V cache is rotated)
    rotate_k: bool | None = None  # per-head Hadamard on q and k after RoPE (the K cache is rotated)
    # SmoothAttention again after rotate_k's rotation, where it is free of RoPE's pairs: the
    # model divides the rotated keys per channel by rms(K)^a / rms(Q)^(1-a) (and multiplies
    # the queries), a = smooth_rotated_keys_alpha, from the calibration tokens the searches
    # use. Off by default: on the default model it moved perplexity by no more than the
    # noise (docs/ACCURACY.md).
    smooth_rotated_keys: bool = False
    smooth_rotated_keys_alpha: float = 0.5
    smooth_out: bool | None = None  # v_proj -> o_proj output smoothing
    smooth_down: bool | None = None  # up_proj -> down_proj output smoothing
    smooth_alpha: float | None = None  # None: from the preset (when not searched)
    smooth_beta: float | None = None
    preset: str = DEFAULT_PRESET
    reorder: bool | None = None  # None: on for group formats (the paper's g128 recipe)
    clip: bool | None = None  # clipping search; None: on (the paper: per-channel only)
    clip_grid: int = 80  # ratios 1.0, 1 - 0.8/grid, ..., 0.2
    clip_min: float = 0.2
    gptq: bool | None = None  # GPTQ rounding (the paper's recipe uses it for both formats)
    # GPTQ's Hessian damping, a fraction of its mean diagonal: the paper's 1% overfits small
    # calibration sets (docs/ACCURACY.md measures 10% better on held-out text)
    gptq_damp: float = 0.1
    # Calibrate each layer on the outputs of the layers before it with their W4 weights (GPTQ's
    # sequential mode) instead of the float outputs (the paper's code); one more layer forward.
    quantized_inputs: bool = False
    # The paper code's searches (quant/search.py): per-layer strengths instead of fixed ones.
    search_smooth_attention: bool | None = None  # grid over (alpha, beta) of SmoothAttention
    search_smoothing: bool | None = None  # grid over (alpha, beta) of v->o and up->down
    search_qk_clip: bool | None = None  # q/k_proj clipping on the attention output
    search_grid: int = 10  # alpha in steps of 1/search_grid
    search_tokens: int = 4096  # calibration tokens the searches score candidates on
    calib_samples: int = 128
    calib_seq_len: int = 1024
    calib_text: tuple[str, ...] = ()
    seed: int = 42

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        set_("weight_format", WeightFormat.parse(self.weight_format))
        set_("calib_text", tuple(self.calib_text))
        if self.preset not in SMOOTH_PRESETS:
            raise ValueError(f"unknown smoothing preset {self.preset!r}; known: "
                             f"{', '.join(SMOOTH_PRESETS)}")
        group = self.weight_format.is_group
        if self.method == "rtn":  # the baseline: no transform, plain round-to-nearest
            given = [s for s in STEPS + SEARCHES if getattr(self, s)]
            if given:
                raise ValueError(f"method 'rtn' is plain round-to-nearest: it takes no "
                                 f"{', '.join(given)} (use method 'qoq')")
            defaults = dict.fromkeys(STEPS + SEARCHES[:2], False)
        else:
            rotate_v = True if self.rotate_v is None else self.rotate_v
            defaults = dict(rotate=True, rotate_v=rotate_v, rotate_k=self.kv_cache.startswith("kv4"),
                            smooth_attention=True, smooth_out=not rotate_v, smooth_down=True,
                            reorder=group, clip=True, gptq=True,
                            search_smooth_attention=True, search_smoothing=True)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                set_(name, value)
        if self.smooth_rotated_keys and not self.rotate_k:
            raise ValueError("smooth_rotated_keys scales the keys rotate_k rotates: it needs "
                             "rotate_k")
        if not 0 <= self.smooth_rotated_keys_alpha <= 1:
            raise ValueError("smooth_rotated_keys_alpha must be in [0, 1]")
        if self.search_qk_clip is None:
            set_("search_qk_clip", bool(self.clip and not group))
        if self.search_qk_clip and (group or not self.clip):
            raise ValueError("search_qk_clip searches the clipping ratio of q/k_proj: it needs "
                             "clip and the per-channel format")
        variant = "group" if group else "per_channel"
        alpha, beta = SMOOTH_PRESETS[self.preset][variant]
        set_("smooth_alpha", alpha if self.smooth_alpha is None else self.smooth_alpha)
        set_("smooth_beta", beta if self.smooth_beta is None else self.smooth_beta)
        if not 0 < self.clip_min <= 1 or self.clip_grid < 1:
            raise ValueError("clip_min must be in (0, 1] and clip_grid >= 1")
        if not self.gptq_damp > 0:
            raise ValueError("gptq_damp must be > 0 (a fraction of the Hessian's mean diagonal)")
        if self.search_grid < 2 or self.search_tokens < 1:
            raise ValueError("search_grid must be >= 2 and search_tokens >= 1")
        if self.kv_cache not in ("kv4", "kv4-minmax", "16bit"):
            raise ValueError(f"kv_cache must be 'kv4', 'kv4-minmax' or '16bit', "
                             f"not {self.kv_cache!r}")

    @property
    def needs_calibration(self) -> bool:
        return (self.smooth_attention or self.smooth_out or self.smooth_down or self.reorder
                or self.clip or self.gptq)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weight_format"] = self.weight_format.value
        d["calib_text"] = list(self.calib_text)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Reads this recipe, and the older ones (group_size -1/128/64, steps the method turned
        off written as False, a layer_group_sizes entry, no rotate_v / rotate_k: those steps
        were not run) that earlier checkpoints carry."""
        d = dict(d)
        if "weight_format" not in d and "group_size" in d:
            d["weight_format"] = d["group_size"]
        for step in ("rotate_v", "rotate_k"):  # recipes written before these steps existed
            d.setdefault(step, False)
        if d.get("method") == "rtn":  # older recipes wrote rtn's steps out as False
            for name in STEPS + SEARCHES:
                if d.get(name) is False:
                    d.pop(name)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
