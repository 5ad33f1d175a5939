"""Shared test helpers: tiny random Hugging Face checkpoints and the torch oracle."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qoq_jax.config import ModelConfig
from qoq_jax.hf import save_safetensors

REPO = Path(__file__).resolve().parents[1]

# Tiny configs covering what differs between the supported architectures.
TINY_CONFIGS = {
    # tied embeddings, GQA 2, Llama-3 rope scaling (factor chosen so all three bands are hit)
    "llama3": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96,
                   hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
    # Llama 2 style with attention and MLP biases, no GQA, untied
    "llama_bias": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=80,
                       hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=3, rope_theta=10000.0,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                       rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1,
                       eos_token_id=2),
    # Mistral: GQA 4, untied
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=90,
                    hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                    rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None,
                    rms_norm_eps=1e-5, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2),
    # Qwen2: q/k/v bias, GQA 3 (not a power of two), tied
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=100,
                  hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, rope_theta=1000000.0,
                  tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
}


def random_hf_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.08) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    out = {"model.embed_tokens.weight": w(cfg.vocab_size, d) * 10, "model.norm.weight": norm(d)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = w(cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        dims = {"self_attn.q_proj": (cfg.num_heads * hd, d), "self_attn.k_proj": (cfg.num_kv_heads * hd, d),
                "self_attn.v_proj": (cfg.num_kv_heads * hd, d), "self_attn.o_proj": (d, cfg.num_heads * hd),
                "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
        for name, shape in dims.items():
            out[p + name + ".weight"] = w(*shape)
            is_qkv = name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            if (is_qkv and cfg.qkv_bias) or (name == "self_attn.o_proj" and cfg.o_bias) or (
                    name.startswith("mlp.") and cfg.mlp_bias):
                out[p + name + ".bias"] = w(shape[0])
        out[p + "input_layernorm.weight"] = norm(d)
        out[p + "post_attention_layernorm.weight"] = norm(d)
    return out


def random_moe_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.05,
                       router_gain: float = 20.0) -> dict[str, np.ndarray]:
    """Random weights of a Mixtral / Qwen3-MoE model under the checkpoint's own names (one
    tensor per expert: block_sparse_moe.experts.{e}.w1/w3/w2, or mlp.experts.{e}.gate/up/
    down_proj; Qwen3-MoE's q/k norms), without transformers. router_gain: the router's weights
    are that much larger than the rest, so tokens pick their experts clearly (no near-ties that
    float summation order could flip)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.head_dim

    def rand(*shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    mixtral = cfg.architecture == "MixtralForCausalLM"
    out = {"model.embed_tokens.weight": rand(cfg.vocab_size, d),
           "lm_head.weight": rand(cfg.vocab_size, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": rand(cfg.num_heads * hd, d),
                p + "self_attn.k_proj.weight": rand(cfg.num_kv_heads * hd, d),
                p + "self_attn.v_proj.weight": rand(cfg.num_kv_heads * hd, d),
                p + "self_attn.o_proj.weight": rand(d, cfg.num_heads * hd),
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
        if cfg.qk_norm:
            out |= {p + "self_attn.q_norm.weight": 1 + rand(hd), p + "self_attn.k_norm.weight": 1 + rand(hd)}
        moe = p + ("block_sparse_moe." if mixtral else "mlp.")
        out[moe + "gate.weight"] = rand(cfg.num_experts, d) * router_gain
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(cfg.num_experts):
            for name, shape in zip(names, ((f, d), (f, d), (d, f))):
                out[f"{moe}experts.{e}.{name}.weight"] = rand(*shape)
    return out


def make_moe_checkpoint(path: Path, hf: dict, seed: int = 0) -> Path:
    """An HF-layout MoE checkpoint directory (config.json, random_moe_weights, byte tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    save_safetensors(random_moe_weights(ModelConfig.from_hf_dict(hf), seed), path)
    write_byte_tokenizer(path)
    return path


def make_tiny_checkpoint(path: Path, name: str, seed: int = 0, **overrides) -> Path:
    hf = {**TINY_CONFIGS[name], **overrides}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf_dict(hf)
    save_safetensors(random_hf_weights(cfg, seed), path)
    return path


def run_oracle(jobs: list[dict], out_dir: Path) -> Path:
    """Run tests/reference/hf_oracle.py in the oracle's interpreter ($QOQ_REF_PYTHON)."""
    ref = os.environ.get("QOQ_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
    if not Path(ref).exists():
        msg = (f"the torch oracle's interpreter {ref} is missing (make ref-venv builds it, "
               "or set QOQ_REF_PYTHON)")
        if os.environ.get("QOQ_REQUIRE_REF"):
            pytest.fail(msg)
        pytest.skip(msg)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    proc = subprocess.run([ref, str(REPO / "tests" / "reference" / "hf_oracle.py"), f.name,
                           str(out_dir)], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"oracle failed:\n{proc.stderr[-4000:]}")
    return out_dir


def abstract_h100_mesh(n: int = 1, axis: str = "x"):
    """An AbstractMesh of n H100s on one axis (Explicit for one device, as lower_for_h100 has
    always used; Auto for several, the tensor-parallel mesh's type)."""
    import jax

    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=1, platform="cuda")
    kind = jax.sharding.AxisType.Explicit if n == 1 else jax.sharding.AxisType.Auto
    return jax.sharding.AbstractMesh((n,), (axis,), (kind,), abstract_device=dev)


def lower_for_h100(fn, *args, mesh=None) -> str:
    """Trace and lower `fn` for CUDA under an abstract H100 (no GPU needed); returns the HLO text.

    This runs the whole Pallas -> Triton IR lowering, which catches what Triton will not accept
    (value slicing, concatenation along K, non-power-of-two loads) that interpret mode lets through.
    mesh: an abstract mesh of several H100s (abstract_h100_mesh(8, "tp")) for a sharded `fn`.
    """
    import jax

    mesh = abstract_h100_mesh() if mesh is None else mesh
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


TRITON_CALL = "__gpu$xla.gpu.triton"


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


# The shared kernel-test switch: on CPU the Pallas kernels run in interpret mode; on a GPU
# (benchmarks/gpu_check.sh sets JAX_PLATFORMS=cuda) the same tests run the compiled kernels.
PALLAS = {"backend": "pallas", "interpret": not on_gpu()}


# Tiny configs whose projections fit the W4 formats (N and K multiples of 64), with a
# byte-level tokenizer (vocab 256 + 4 specials) so the converter and the CLIs run end to end.
TINY_QUANT_CONFIGS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=260,
                  hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  max_position_embeddings=512, bos_token_id=256, eos_token_id=257),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=260,
                    hidden_size=192, intermediate_size=384, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                    rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=None,
                    rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=256,
                    eos_token_id=257),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=260,
                  hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                  rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=257),
}


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges: ids 0..255 are bytes, 256.. are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # order the 256 byte symbols by byte value, as GPT-2's bytes_to_unicode does
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_sym = dict(zip(bs, (chr(c) for c in cs)))
    assert set(byte_sym.values()) == set(alphabet)
    vocab = {byte_sym[b]: b for b in range(256)}
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    for i, s in enumerate(specials):
        vocab[s] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"}))


def make_tiny_quant_checkpoint(path: Path, name: str, seed: int = 0) -> Path:
    hf = TINY_QUANT_CONFIGS[name]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf_dict(hf)
    save_safetensors(random_hf_weights(cfg, seed, std=0.05), path)
    write_byte_tokenizer(path)
    return path


def write_text(path: Path, n_words: int = 4000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["the", "model", "quantized", "weights", "cache", "river", "light", "stone", "blue",
             "seven", "tokens", "attention", "small", "bright", "quiet", "paper", "kernel"]
    path.write_text(" ".join(rng.choice(words, n_words)))
    return path


def numpy_kv4(x, ratios=None):
    """Independent NumPy reference of the KV4 quantizer (pallas_kernels/kv4.py): per row, each
    candidate range [mid - r h, mid + r h] (mid, h: the row's midpoint and half range) gives an
    fp16 scale and zero and half-even rounded codes; the first candidate with the smallest
    squared error wins. ratios None: the kernel's RANGE_RATIOS; (1.0,): QServe's min/max.
    Returns codes uint8 [..., D], scale fp16, zero fp16 [...], x_hat float32 [..., D]."""
    if ratios is None:
        from pallas_kernels.kv4 import RANGE_RATIOS as ratios
    x = np.asarray(x, np.float32)
    mx, mn = x.max(-1), x.min(-1)
    mid, half = (mx + mn) * np.float32(0.5), (mx - mn) * np.float32(0.5)
    best = None
    for r in ratios:
        hi, lo = (mx, mn) if r == 1.0 else (mid + half * np.float32(r), mid - half * np.float32(r))
        rng = hi - lo
        scale = np.where(rng > 0, rng / np.float32(15), 1).astype(np.float16)
        zero = (-lo / scale.astype(np.float32)).astype(np.float16)
        s, z = scale.astype(np.float32)[..., None], zero.astype(np.float32)[..., None]
        q = np.clip(np.rint(x * (1 / s) + z), 0, 15)
        xhat = (q - z) * s
        err = np.square(xhat - x).sum(-1)
        if best is None:
            best = [q, scale, zero, xhat, err]
            continue
        better = err < best[4]
        for i, new in enumerate((q, scale, zero, xhat, err)):
            cond = better[..., None] if new.ndim == x.ndim else better
            best[i] = np.where(cond, new, best[i])
    return best[0].astype(np.uint8), best[1], best[2], best[3]


# The newer families, built by transformers itself in the oracle's interpreter (their HF
# names and layouts, fused or per expert, are then transformers' own). Sizes fit the W4
# formats (N and K multiples of 64) and the byte-level tokenizer (vocab 260).
_FAMILY_COMMON = dict(vocab_size=260, hidden_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258,
                      tie_word_embeddings=False)
FAMILY_CONFIGS = {
    # per-head q/k norm, no bias, head_dim (32) given apart from hidden / heads
    "qwen3": dict(_FAMILY_COMMON, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                  intermediate_size=256, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  use_sliding_window=False),
    # fused qkv_proj / gate_up_proj; LongRoPE with a short original context (32), so decoding
    # crosses from the short factors to the long ones
    "phi3": dict(_FAMILY_COMMON, model_type="phi3", architectures=["Phi3ForCausalLM"],
                 intermediate_size=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                 original_max_position_embeddings=32,
                 rope_scaling={"type": "longrope",
                               "short_factor": [1.0 + 0.05 * i for i in range(16)],
                               "long_factor": [1.0 + 0.5 * i for i in range(16)]}),
    # 4 experts, top 2, weights always renormalised; saved one tensor per expert (w1/w3/w2)
    "mixtral": dict(_FAMILY_COMMON, model_type="mixtral", architectures=["MixtralForCausalLM"],
                    intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                    rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None),
    # q/k norms and experts; top-2 weights not renormalised (norm_topk_prob false)
    "qwen3moe": dict(_FAMILY_COMMON, model_type="qwen3_moe",
                     architectures=["Qwen3MoeForCausalLM"], intermediate_size=256,
                     moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                     norm_topk_prob=False, head_dim=32, rope_theta=1000000.0,
                     rms_norm_eps=1e-6, use_sliding_window=False, decoder_sparse_step=1,
                     mlp_only_layers=[]),
}


def build_family_checkpoints(root: Path, configs: dict[str, dict], extra_jobs=(), seed: int = 0,
                             std: float = 0.05) -> tuple[dict[str, Path], Path]:
    """Random-weight checkpoints built and saved by transformers (save_pretrained; sharded with
    an index file), each with the byte tokenizer, then `extra_jobs` (a function of the model
    directories -> oracle jobs) in the same oracle run. Returns ({name: dir}, oracle output)."""
    dirs = {name: root / name for name in configs}
    jobs = [{"kind": "build", "name": name, "config": cfg, "model": str(dirs[name]),
             "seed": seed, "std": std, "max_shard_size": "200KB"}
            for name, cfg in configs.items()]
    out = run_oracle(jobs + list(extra_jobs(dirs) if callable(extra_jobs) else extra_jobs),
                     root / "oracle")
    for d in dirs.values():
        write_byte_tokenizer(d)
    return dirs, out


# QoQ with a small calibration and without GPTQ's rounding search: these change which integers
# the weights hold, not the runtime path (the same packed formats, INT8 activations and KV4
# cache), which is what the engine tests on the real model are about.
QUICK_QOQ = dict(calib_samples=2, calib_seq_len=64, clip_grid=4, gptq=False)


def quick_qoq_default_model(weight_format: str = "g128"):
    """The default model quantized with QUICK_QOQ, converted once per machine (and per version
    of the quantization code) into a checkpoint in the cache, loaded from there (float32): the
    tests of several files use it, and quantizing takes longer than loading."""
    import hashlib
    import shutil

    import qoq_jax
    from qoq_jax import assets
    from qoq_jax.convert import convert
    from qoq_jax.quant.config import QuantConfig

    pkg = REPO / "qoq_jax"
    sources = sorted([*pkg.glob("quant/*.py"), pkg / "convert.py", pkg / "checkpoint.py",
                      REPO / "pallas_kernels" / "packing.py"])
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    name = f"test-quick-qoq-{weight_format}-{digest}"
    target = assets.cache_dir() / "models" / name
    with assets.cache_lock(name):
        if not (target / "config.json").exists():
            if target.exists():
                shutil.rmtree(target)
            convert(None, str(target), QuantConfig(weight_format=weight_format, **QUICK_QOQ),
                    progress=False)
    return qoq_jax.load(target, dtype="float32")
