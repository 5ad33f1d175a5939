"""Config and checkpoint loading, and the clear errors on bad input."""

import json

import numpy as np
import pytest
from helpers import TINY_CONFIGS, make_tiny_checkpoint

import qoq_jax
from qoq_jax.config import ModelConfig, UnsupportedModelError, rope_inv_freq
from qoq_jax.hf import CheckpointError, SafetensorsCheckpoint, save_safetensors


def test_config_reads_each_architecture():
    llama = ModelConfig.from_hf_dict(TINY_CONFIGS["llama3"])
    assert (llama.num_heads, llama.num_kv_heads, llama.q_per_kv, llama.head_dim) == (4, 2, 2, 16)
    assert llama.tie_word_embeddings and llama.rope_scaling["rope_type"] == "llama3"
    qwen = ModelConfig.from_hf_dict(TINY_CONFIGS["qwen2"])
    assert qwen.qkv_bias and not qwen.o_bias and qwen.head_dim == 8
    bias = ModelConfig.from_hf_dict(TINY_CONFIGS["llama_bias"])
    assert bias.qkv_bias and bias.o_bias and bias.mlp_bias


def test_config_accepts_transformers5_rope_parameters():
    hf = dict(TINY_CONFIGS["mistral"])
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert ModelConfig.from_hf_dict(hf).rope_theta == 1234.0


def test_config_roundtrips_through_hf_dict():
    for name, hf in TINY_CONFIGS.items():
        cfg = ModelConfig.from_hf_dict(hf)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, name


def test_llama3_rope_scaling_changes_only_low_frequencies():
    cfg = ModelConfig.from_hf_dict(TINY_CONFIGS["llama3"])
    plain = ModelConfig.from_hf_dict({**TINY_CONFIGS["llama3"], "rope_scaling": None})
    scaled, base = rope_inv_freq(cfg), rope_inv_freq(plain)
    assert scaled[0] == base[0]  # the highest frequency is kept
    np.testing.assert_allclose(scaled[-1], base[-1] / 8.0, rtol=1e-6)  # the lowest is divided


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "must be a multiple of"),
])
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(UnsupportedModelError, match=message) as e:
        ModelConfig.from_hf_dict({**TINY_CONFIGS["llama3"], **change})
    if "architecture" in message:
        assert "LlamaForCausalLM" in str(e.value)  # lists what is supported


def test_sliding_window_caps_the_context():
    cfg = ModelConfig.from_hf_dict({**TINY_CONFIGS["mistral"], "sliding_window": 64})
    assert cfg.max_position_embeddings == 64
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        ModelConfig.from_hf_dict({**TINY_CONFIGS["qwen2"], "use_sliding_window": True})


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["llama3"]))
    with pytest.raises(CheckpointError, match="no weights in"):
        qoq_jax.load(tmp_path)


def test_missing_shard(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "llama3")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors.*missing"):
        SafetensorsCheckpoint(d)


def test_sharded_checkpoint_loads(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "mistral")
    weights = dict(SafetensorsCheckpoint(d))
    names = sorted(weights)
    half = len(names) // 2
    (d / "model.safetensors").unlink()
    save_safetensors({k: weights[k] for k in names[:half]}, d)
    (d / "model.safetensors").rename(d / "a.safetensors")
    save_safetensors({k: weights[k] for k in names[half:]}, d)
    (d / "model.safetensors").rename(d / "b.safetensors")
    wmap = {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    ckpt = SafetensorsCheckpoint(d)
    assert len(ckpt) == len(weights)
    np.testing.assert_array_equal(ckpt["model.norm.weight"], weights["model.norm.weight"])


def test_truncated_safetensors(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "llama3")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt = SafetensorsCheckpoint(d)
        for k in ckpt:
            ckpt[k]


def test_tensor_of_wrong_shape(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "llama3")
    weights = dict(SafetensorsCheckpoint(d))
    weights["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_safetensors(weights, d)
    from qoq_jax.model import from_hf_weights

    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(95, 64\).*\(96, 64\)"):
        from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d))


def test_missing_tensor(tmp_path):
    d = make_tiny_checkpoint(tmp_path / "m", "mistral")
    weights = dict(SafetensorsCheckpoint(d))
    del weights["lm_head.weight"]
    save_safetensors(weights, d)
    from qoq_jax.model import from_hf_weights

    with pytest.raises(CheckpointError, match="no tensor 'lm_head.weight'"):
        from_hf_weights(ModelConfig.from_json(d), SafetensorsCheckpoint(d))


def test_bf16_checkpoint_loads(tmp_path):
    import ml_dtypes

    d = make_tiny_checkpoint(tmp_path / "m", "qwen2")
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in SafetensorsCheckpoint(d).items()}
    save_safetensors(weights, d)
    ckpt = SafetensorsCheckpoint(d)
    assert ckpt["model.norm.weight"].dtype == ml_dtypes.bfloat16
    from qoq_jax.model import from_hf_weights

    model = from_hf_weights(ModelConfig.from_json(d), ckpt)
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]),
                                  weights["model.norm.weight"].astype(np.float32))
