"""Model configuration, read from a Hugging Face ``config.json``.

One dataclass describes every supported architecture (the Llama family as Hugging Face
writes it): ``LlamaForCausalLM`` (Llama 2/3/3.x, SmolLM2), ``MistralForCausalLM`` and
``Qwen2ForCausalLM``. Anything else stops here with an error that names it, so that no
later stage runs a model it would compute wrongly.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or an option this library does not implement."""


class ConfigError(ValueError):
    """A config.json that is not valid JSON, lacks a required key or holds a wrong value."""


_REQUIRED = object()


def _int_field(hf: dict[str, Any], key: str, default: Any = _REQUIRED, *, positive: bool = True,
               value: Any = _REQUIRED) -> int:
    """An integer field of a config (given as `value`, or hf[key]), with a clear error."""
    if value is _REQUIRED:
        if key not in hf or hf[key] is None:
            if default is _REQUIRED:
                raise ConfigError(f"missing the required key {key!r}")
            return default
        value = hf[key]
    try:
        if isinstance(value, bool) or int(value) != value:
            raise TypeError
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if positive and v < 1:
        raise ConfigError(f"{key} must be >= 1, got {v}")
    return v


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config.json; errors name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        hf = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object")
    return hf


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Normalised rope scaling: None, or a dict with "rope_type" in SUPPORTED_ROPE_TYPES.
    rope_scaling: dict[str, Any] | None = None
    # The longest sequence (prompt + generated) the model may see.
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # QoQ checkpoints converted with rotate_k: queries and keys are rotated per head by a
    # Hadamard after RoPE (q.k unchanged), so the KV4 cache stores keys whose outlier channels
    # are spread over the head. Stored in config.json as "qoq_key_rotation".
    key_rotation: bool = False
    # With key_rotation, a per-channel SmoothAttention in the rotated basis: each layer holds
    # self_attn.key_scale [KV heads, head_dim]; the rotated keys are divided by it and the
    # rotated queries multiplied (q.k unchanged). Stored in config.json as "qoq_key_scale".
    key_scale: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.key_scale and not self.key_rotation:
            raise ConfigError("qoq_key_scale scales the rotated keys: it needs qoq_key_rotation")

    def __hash__(self) -> int:
        # The config is static metadata of jitted modules; rope_scaling is a dict, so hash the JSON.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        if not isinstance(hf, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(hf).__name__}")
        try:
            return cls._from_hf_dict(hf)
        except (UnsupportedModelError, ConfigError):
            raise
        except KeyError as e:
            raise ConfigError(f"missing the required key {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ConfigError(f"invalid config: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(hf.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}); "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}; supported: 'silu'")

        num_heads = _int_field(hf, "num_attention_heads")
        hidden = _int_field(hf, "hidden_size")
        head_dim = _int_field(hf, "head_dim", hidden // num_heads)
        if head_dim < 1:
            raise ConfigError(f"head_dim must be >= 1, got {head_dim}")
        max_pos = _int_field(hf, "max_position_embeddings", 2048)
        max_pos = _limit_by_sliding_window(arch, hf, max_pos)

        theta, scaling = _rope_from_hf(hf)
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))

        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=_int_field(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(hf, "intermediate_size"),
            num_layers=_int_field(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_int_field(hf, "num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=hf.get("pad_token_id"),
            key_rotation=bool(hf.get("qoq_key_rotation", False)),
            key_scale=bool(hf.get("qoq_key_scale", False)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        hf = read_config_json(path)
        try:
            return cls.from_hf_dict(hf)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of from_hf_dict: a config.json that transformers loads as the same model."""
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]),
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.key_rotation:
            d["qoq_key_rotation"] = True
        if self.key_scale:
            d["qoq_key_scale"] = True
        if self.architecture == "LlamaForCausalLM":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.architecture == "MistralForCausalLM":
            d["sliding_window"] = None
        if self.architecture == "Qwen2ForCausalLM":
            d["use_sliding_window"] = False
        return d


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}.get(model_type or "", f"<model_type {model_type!r}>")


def _limit_by_sliding_window(arch: str, hf: dict[str, Any], max_pos: int) -> int:
    """Sliding-window attention is not implemented; within the window it equals full attention.

    So a model that declares a window is accepted with its context capped at the window: every
    sequence it can then see is computed exactly. Qwen2 only slides when use_sliding_window is on
    (and then only in some layers), which we reject outright.
    """
    if arch == "Qwen2ForCausalLM":
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "sliding-window attention (use_sliding_window=true) is not supported")
        return max_pos
    window = hf.get("sliding_window")
    if window:
        return min(max_pos, int(window))
    return max_pos


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes rope_parameters (theta included); older configs rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    out: dict[str, Any] = {"rope_type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise UnsupportedModelError(f"llama3 rope scaling is missing {key!r}")
            out[key] = params[key]
    return theta, out


def rope_inv_freq(config: ModelConfig) -> "Any":
    """Per-pair inverse frequencies (numpy float32, head_dim // 2), scaling applied.

    Llama-3 scaling follows the published formula: wavelengths longer than
    original_max / low_freq_factor are divided by `factor`, shorter than
    original_max / high_freq_factor are kept, and the band between is interpolated.
    """
    import numpy as np

    # float32, as transformers computes it, so that fp32 parity holds to rounding level.
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return (inv / np.float32(s["factor"])).astype(np.float32)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
