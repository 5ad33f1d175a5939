"""QuantConfig: the whole QoQ recipe, recorded in a quantized checkpoint's config.json."""

from __future__ import annotations

import dataclasses
from typing import Any

METHODS = ("qoq", "rtn")
GROUP_SIZES = (-1, 64, 128)

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


@dataclasses.dataclass
class QuantConfig:
    method: str = "qoq"
    group_size: int = 128  # -1: per-channel
    kv_cache: str = "kv4"
    rotate: bool = True  # block input rotation (Hadamard), norms folded first
    smooth_attention: bool = True  # SmoothAttention on post-RoPE keys
    smooth_attention_alpha: float = 0.5
    smooth_out: bool = True  # v_proj -> o_proj output smoothing
    smooth_down: bool = True  # up_proj -> down_proj output smoothing
    smooth_alpha: float | None = None  # None: from the preset
    smooth_beta: float | None = None
    preset: str = DEFAULT_PRESET
    reorder: bool | None = None  # None: on for group quantization (the paper's g128 recipe)
    clip: bool | None = None  # None: on for per-channel (the paper's recipe)
    clip_grid: int = 80  # ratios 1.0, 1 - 0.8/grid, ..., 0.2
    clip_min: float = 0.2
    gptq: bool = True  # GPTQ rounding (the paper's recipe uses it for both variants)
    calib_samples: int = 128
    calib_seq_len: int = 1024
    calib_text: list[str] = dataclasses.field(default_factory=list)
    seed: int = 42
    # Filled in by the converter: the effective group size of each projection (128 -> 64 where
    # the input size is not a multiple of 128).
    layer_group_sizes: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, not {self.group_size}")
        if self.preset not in SMOOTH_PRESETS:
            raise ValueError(f"unknown smoothing preset {self.preset!r}; known: "
                             f"{', '.join(SMOOTH_PRESETS)}")
        if self.method == "rtn":  # the baseline: no transform, plain round-to-nearest
            self.rotate = self.smooth_attention = self.smooth_out = self.smooth_down = False
            self.reorder = self.clip = self.gptq = False
        if self.reorder is None:
            self.reorder = self.group_size != -1
        if self.clip is None:
            self.clip = self.group_size == -1
        variant = "per_channel" if self.group_size == -1 else "group"
        alpha, beta = SMOOTH_PRESETS[self.preset][variant]
        self.smooth_alpha = alpha if self.smooth_alpha is None else self.smooth_alpha
        self.smooth_beta = beta if self.smooth_beta is None else self.smooth_beta
        if not 0 < self.clip_min <= 1 or self.clip_grid < 1:
            raise ValueError("clip_min must be in (0, 1] and clip_grid >= 1")

    @property
    def needs_calibration(self) -> bool:
        return (self.smooth_attention or self.smooth_out or self.smooth_down or self.reorder
                or self.clip or self.gptq)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
