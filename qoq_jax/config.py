"""Model configuration, read from a Hugging Face ``config.json``.

One dataclass describes every supported architecture (the Llama family as Hugging Face
writes it): ``LlamaForCausalLM`` (Llama 2/3/3.x, SmolLM2), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (q/k/v bias), ``Qwen3ForCausalLM`` (per-head RMSNorm of q and k before
RoPE) and ``Phi3ForCausalLM`` (fused qkv_proj / gate_up_proj in the checkpoint, split at load:
``hf.canonical_weights``; LongRoPE scaling). Anything else stops here with an error that names
it, so that no later stage runs a model it would compute wrongly. The mixture-of-experts
``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM`` replace every layer's MLP by top-k routed
experts (``num_experts`` > 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
                           "Qwen3MoeForCausalLM")
# config.json's model_type of each architecture (to_hf_dict, and configs without "architectures")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3",
               "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


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
    # Qwen3: RMSNorm over each head's q and k (weights [head_dim], shared by the heads), after
    # the projection and before RoPE
    qk_norm: bool = False
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is `num_experts` SwiGLU experts
    # of `moe_intermediate_size` channels, each token routed to `num_experts_per_tok` of them by
    # a 16-bit router (softmax, top-k; the k weights renormalised to sum 1 when
    # norm_topk_prob: always for Mixtral, Qwen3-MoE's norm_topk_prob). 0: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
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
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in [1, {self.num_experts}], got "
                              f"{self.num_experts_per_tok}")
        if self.key_scale and not self.key_rotation:
            raise ConfigError("qoq_key_scale scales the rotated keys: it needs qoq_key_rotation")

    def __hash__(self) -> int:
        # The config is static metadata of jitted modules; rope_scaling is a dict, so hash the JSON.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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

        theta, scaling = _rope_from_hf(hf, max_pos)
        partial = (hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if float(partial or 1.0) != 1.0:
            # RoPE on part of each head (Phi-4-mini's 0.75): the fused RoPE + KV4 kernel
            # rotates whole heads
            raise UnsupportedModelError(
                f"partial_rotary_factor {partial} (RoPE on part of each head) is not "
                f"supported; supported: 1.0")
        if arch == "Qwen2ForCausalLM":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))

        moe = _moe_from_hf(arch, hf)
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
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            **moe,
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
        model_type = MODEL_TYPES[self.architecture]
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
            if self.rope_scaling["rope_type"] == "longrope":  # Phi-3 keeps it beside
                d["original_max_position_embeddings"] = self.rope_scaling[
                    "original_max_position_embeddings"]
        if self.key_rotation:
            d["qoq_key_rotation"] = True
        if self.key_scale:
            d["qoq_key_scale"] = True
        if self.architecture == "LlamaForCausalLM":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.architecture == "MistralForCausalLM":
            d["sliding_window"] = None
        if self.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            d["use_sliding_window"] = False
        if self.architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            d["attention_bias"] = self.qkv_bias
        if self.architecture == "MixtralForCausalLM":
            d.update(num_local_experts=self.num_experts,
                     num_experts_per_tok=self.num_experts_per_tok, sliding_window=None)
        if self.architecture == "Qwen3MoeForCausalLM":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                     mlp_only_layers=[])
        if self.architecture == "Phi3ForCausalLM":
            d["sliding_window"] = None
        return d


def _arch_from_model_type(model_type: str | None) -> str:
    by_type = {t: a for a, t in MODEL_TYPES.items()}
    return by_type.get(model_type or "", f"<model_type {model_type!r}>")


def _limit_by_sliding_window(arch: str, hf: dict[str, Any], max_pos: int) -> int:
    """Sliding-window attention is not implemented; within the window it equals full attention.

    So a model that declares a window is accepted with its context capped at the window: every
    sequence it can then see is computed exactly. Qwen2 only slides when use_sliding_window is on
    (and then only in some layers), which we reject outright.
    """
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "sliding-window attention (use_sliding_window=true) is not supported")
        return max_pos
    window = hf.get("sliding_window")
    if window:
        return min(max_pos, int(window))
    return max_pos


def _moe_from_hf(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral / Qwen3-MoE config (empty for the others)."""
    if arch == "MixtralForCausalLM":
        n = _int_field(hf, "num_local_experts", 8)
        return dict(num_experts=n, num_experts_per_tok=_int_field(hf, "num_experts_per_tok", 2),
                    moe_intermediate_size=_int_field(hf, "intermediate_size"),
                    norm_topk_prob=True)  # Mixtral always renormalises its top-k weights
    if arch != "Qwen3MoeForCausalLM":
        return {}
    # transformers 5 saves num_experts as num_local_experts
    n = _int_field(hf, "num_experts", value=hf.get("num_experts", hf.get("num_local_experts")))
    layers = _int_field(hf, "num_hidden_layers")
    step = _int_field(hf, "decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    # transformers' rule (Qwen3MoeDecoderLayer): experts in layer i unless i is one of
    # mlp_only_layers or (i + 1) is not a multiple of decoder_sparse_step
    sparse = [i for i in range(layers) if i not in dense_only and (i + 1) % step == 0]
    if len(sparse) != layers:
        # the layers are stacked and scanned as one: a mix of dense and expert layers would
        # need two layer kinds in the scan (no released Qwen3-MoE model has one)
        raise UnsupportedModelError(
            f"Qwen3-MoE with dense layers among the expert layers (decoder_sparse_step "
            f"{step}, mlp_only_layers {sorted(dense_only)}: experts in {len(sparse)} of "
            f"{layers} layers) is not supported; supported: experts in every layer")
    return dict(num_experts=n, num_experts_per_tok=_int_field(hf, "num_experts_per_tok"),
                moe_intermediate_size=_int_field(hf, "moe_intermediate_size"),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


def _rope_from_hf(hf: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    # transformers 5 writes rope_parameters (theta included); older configs rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "su":  # Phi-3's first name for LongRoPE
        rope_type = "longrope"
    if rope_type == "longrope":
        return theta, _longrope_from_hf(hf, params, max_pos)
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


def _longrope_from_hf(hf: dict[str, Any], params: dict[str, Any], max_pos: int) -> dict[str, Any]:
    """LongRoPE (Phi-3): per-pair frequency divisors for short and long contexts, and a
    cos/sin factor, as transformers computes them (modeling_rope_utils)."""
    # Phi-3 keeps original_max_position_embeddings beside rope_scaling, and it wins there
    orig = hf.get("original_max_position_embeddings", params.get(
        "original_max_position_embeddings"))
    for key, value in (("short_factor", params.get("short_factor")),
                       ("long_factor", params.get("long_factor")),
                       ("original_max_position_embeddings", orig)):
        if value is None:
            raise UnsupportedModelError(f"longrope rope scaling is missing {key!r}")
    # transformers' default factor is the config's own max_position_embeddings (not the one
    # capped by a sliding window) over the original context
    factor = params.get("factor") or (
        _int_field(hf, "max_position_embeddings", max_pos) / float(orig))
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return {"rope_type": "longrope", "short_factor": [float(x) for x in params["short_factor"]],
            "long_factor": [float(x) for x in params["long_factor"]],
            "original_max_position_embeddings": int(orig), "attention_factor": float(attention)}


def rope_tables(config: ModelConfig) -> tuple["Any", float]:
    """(inverse frequencies [head_dim // 2], cos/sin factor) of the model's RoPE.

    LongRoPE has two tables, for short and long contexts. transformers picks the long one for
    a call whose sequence is past original_max_position_embeddings, and when generation
    crosses that length it recomputes the whole cache with it (Phi3ForCausalLM.
    prepare_inputs_for_generation): a sequence is computed with one table throughout. A
    serving engine cannot recompute a sequence midway, and mixing tables within a sequence
    (short keys, long queries) breaks RoPE's relative positions. So, as llama.cpp does, the
    table is chosen once, by the context the model serves: long when max_position_embeddings
    exceeds the original context (Phi-3-*-128k), short otherwise (Phi-3-*-4k). With the long
    table, every sequence longer than the original context is computed exactly as
    transformers computes it; shorter ones differ (transformers uses the short table there)."""
    import numpy as np

    s = config.rope_scaling
    if s is None or s["rope_type"] != "longrope":
        return rope_inv_freq(config), 1.0
    d = config.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    base = np.float32(config.rope_theta) ** exponent
    long = config.max_position_embeddings > s["original_max_position_embeddings"]
    ext = np.asarray(s["long_factor" if long else "short_factor"], np.float32)
    return (np.float32(1.0) / (ext * base)).astype(np.float32), float(s["attention_factor"])


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
    if s["rope_type"] == "longrope":
        raise ValueError("longrope has two frequency tables: use rope_tables")
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
