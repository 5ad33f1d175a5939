"""convert_hf_checkpoint end to end on tiny random models; loading, generating, atomicity."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_QUANT_CONFIGS, make_tiny_quant_checkpoint, write_text

import qoq_jax
from qoq_jax import checkpoint
from qoq_jax.convert import convert, quantize
from qoq_jax.layers import W4A8Linear
from qoq_jax.loading import load_source
from qoq_jax.quant.config import QuantConfig

REPO = Path(__file__).resolve().parents[1]


def _qcfg(text, **kw):
    return QuantConfig(calib_text=[str(text)], calib_samples=4, calib_seq_len=64, clip_grid=8,
                       **kw)


# Every architecture and every method, each architecture with at least one QoQ variant (not the
# full product: each conversion costs 10-20 s of CI).
def _as_stored(a: np.ndarray) -> np.ndarray:
    """What a checkpoint must give back: float32 tensors rounded to bfloat16 (the storage
    format), everything else (packed codes, fp16 and integer scales) bit for bit."""
    if a.dtype == np.float32:
        return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
    return a


@pytest.mark.parametrize("name,method,fmt", [
    ("llama", "qoq", "g128"), ("llama", "rtn", "g128"), ("mistral", "qoq", "per-channel"),
    ("qwen2", "qoq", "g128"), ("qwen2", "qoq", "per-channel")])
def test_convert_reload_generate(tmp_path, name, method, fmt):
    from flax import nnx

    src = make_tiny_quant_checkpoint(tmp_path / "src", name, seed=2)
    text = write_text(tmp_path / "calib.txt")
    key_scale = name == "qwen2"  # the opt-in SmoothAttention of the rotated keys, on one model
    qcfg = _qcfg(text, method=method, weight_format=fmt, smooth_rotated_keys=key_scale)
    out = convert(str(src), str(tmp_path / "out"), qcfg, progress=False)
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization"]["method"] == method
    assert hf["quantization"]["weight_format"] == fmt
    assert QuantConfig.from_dict(hf["quantization"]) == qcfg  # the recipe, as asked
    c = TINY_QUANT_CONFIGS[name]
    inputs = {"self_attn.o_proj": c["num_attention_heads"] * c["head_dim"],
              "mlp.down_proj": c["intermediate_size"]}
    report = hf["quantization_report"]
    for layer, got in report["formats"].items():
        k = inputs.get(layer, c["hidden_size"])
        assert got == (fmt if fmt == "per-channel" else "g128" if k % 128 == 0 else "g64"), layer
    assert len(report["layers"]) == c["num_hidden_layers"]
    if method == "qoq":  # the searched strengths, per layer
        assert all({"smooth_attention", "smooth_down"} <= set(x) for x in report["layers"])
        assert not any("smooth_out" in x for x in report["layers"])  # V rotated instead
        assert hf["qoq_key_rotation"] is True  # the model rotates q and k after RoPE
        assert hf.get("qoq_key_scale", False) is key_scale  # ... and scales them if asked
        assert all(("clip_q" in x) == (fmt == "per-channel") for x in report["layers"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial leftovers

    llm = qoq_jax.load(out, dtype="float32")
    assert llm.engine.kv_cache == "kv4"
    assert llm.model.config.key_rotation == (method == "qoq")
    assert llm.model.config.key_scale == key_scale
    assert hasattr(llm.model.layers.self_attn, "key_scale") == key_scale
    assert isinstance(llm.model.layers.mlp.down_proj, W4A8Linear)
    assert llm.model.lm_head is None or not isinstance(llm.model.lm_head, W4A8Linear)
    # the whole state tree survives the round trip: same paths, dtypes and values (floats as
    # bfloat16 stores them, the quantized fields bit for bit) ...
    cfg, weights, tok, _ = load_source(str(src))
    fresh, _ = quantize(cfg, weights, tok, qcfg, dtype="float32", progress=False)
    saved = nnx.to_flat_state(nnx.split(fresh)[1])
    loaded = dict(nnx.to_flat_state(nnx.split(llm.model)[1]))
    assert sorted(p for p, _ in saved) == sorted(loaded)
    for path, var in saved:
        a, b = np.asarray(var[...]), np.asarray(loaded[path][...])
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(_as_stored(a), b, err_msg=str(path))
    # ... so the reloaded model computes what the saved one did (with its floats so rounded)
    nnx.update(fresh, nnx.from_flat_state([(p, v.replace(value=jnp.asarray(_as_stored(
        np.asarray(v[...]))))) for p, v in saved]))
    fresh_llm = qoq_jax.api.LLM(fresh, tok, source="fresh", kv_cache="kv4")
    tokens = list(range(3, 40))
    np.testing.assert_array_equal(_all_logits(fresh_llm, tokens), _all_logits(llm, tokens))
    # and the model generates
    out_tokens = llm.engine.generate([[1, 2, 3, 4, 5]], qoq_jax.SamplingParams(
        max_new_tokens=6, stop_token_ids=()))[0].tokens
    assert len(out_tokens) == 6 and all(0 <= t < 260 for t in out_tokens)


def _all_logits(llm, tokens):
    from qoq_jax.kv_cache import make_cache
    from qoq_jax.model import prefill

    model = llm.model
    cfg = model.config
    cache = make_cache(llm.engine.kv_cache, cfg.num_layers, 9, 16, cfg.num_kv_heads,
                       cfg.head_dim, jnp.float32)
    table = jnp.arange(1, 9, dtype=jnp.int32)[None]
    logits, _ = prefill(model, jnp.asarray([tokens]), jnp.asarray([len(tokens)]), cache, table,
                        all_logits=True)
    return np.asarray(logits[0])


def test_quantized_model_tracks_the_float_model(tmp_path):
    """W4A8KV4 logits stay close to the float model's (a sanity bound on the whole path)."""
    src = make_tiny_quant_checkpoint(tmp_path / "src", "llama", seed=4)
    text = write_text(tmp_path / "calib.txt")
    fp = qoq_jax.load(src, dtype="float32")
    tokens = list(range(20, 120))
    ref = _all_logits(fp, tokens)
    for method in ("rtn", "qoq"):
        q = qoq_jax.load(src, dtype="float32", quantize=_qcfg(text, method=method))
        got = _all_logits(q, tokens)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert 1e-4 < rel < 0.2, (method, rel)  # quantized, but not broken


def test_failed_conversion_leaves_nothing_loadable(tmp_path, monkeypatch):
    src = make_tiny_quant_checkpoint(tmp_path / "src", "qwen2")
    text = write_text(tmp_path / "calib.txt")

    def broken_save(model, qcfg, tokenizer, out_dir, report=None):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(str(src), str(tmp_path / "out"), _qcfg(text, method="rtn"), progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]


def test_convert_cli(tmp_path):
    src = make_tiny_quant_checkpoint(tmp_path / "src", "mistral")
    text = write_text(tmp_path / "calib.txt")
    out = tmp_path / "ckpt"
    args = [sys.executable, "-m", "qoq_jax.convert", "--hf-dir", str(src), "--out", str(out),
            "--calib-text", str(text), "--calib-samples", "4", "--calib-seq-len", "64",
            "--weight-format", "per-channel", "--clip-grid", "4", "--quiet"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    again = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 1 and "already exists and is not empty" in again.stderr
    gen = subprocess.run([sys.executable, "-m", "qoq_jax.generate", "--model", str(out),
                          "--prompt", "the model", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, cwd=REPO)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout.splitlines()[0])["token_ids"]) <= 4
    assert "kv4 KV cache" in gen.stderr  # a quantized checkpoint runs with its KV4 cache
    ppl = subprocess.run([sys.executable, "-m", "qoq_jax.eval.perplexity", "--model", str(out),
                          "--text", str(text), "--seq-len", "128", "--max-windows", "2",
                          "--json"], capture_output=True, text=True, cwd=REPO)
    assert ppl.returncode == 0, ppl.stderr
    res = json.loads(ppl.stdout)
    assert res["windows"] == 2 and res["kv_cache"] == "kv4" and np.isfinite(res["perplexity"])
    bad = subprocess.run([sys.executable, "-m", "qoq_jax.convert", "--hf-dir",
                          str(tmp_path / "missing"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "no Hugging Face checkpoint" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_convert_flags_turn_each_step_on_and_off():
    """--STEP / --no-STEP for every step (None: the method's default), and --gptq-damp."""
    from qoq_jax.convert import build_parser, config_from_args

    parse = lambda *a: config_from_args(build_parser().parse_args(["--out", "x", *a]))  # noqa: E731
    assert parse() == QuantConfig()
    q = parse("--no-clip", "--no-rotate-k", "--quantized-inputs", "--gptq-damp", "0.05",
              "--no-search-smoothing")
    assert not q.clip and not q.rotate_k and q.quantized_inputs and q.gptq_damp == 0.05
    assert not q.search_smoothing and q.rotate_v and q.reorder
    assert parse("--no-rotate-v").smooth_out  # the paper's v->o smoothing comes back
    with pytest.raises(ValueError, match="takes no rotate_k"):
        parse("--method", "rtn", "--rotate-k")
    with pytest.raises(SystemExit):
        parse("--gptq-damp", "0")
