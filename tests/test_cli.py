"""The command-line entry points, run as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qoq_jax import assets

REPO = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_generate_without_prompt_explains():
    r = run("-m", "qoq_jax.generate")
    assert r.returncode == 2 and "at least one --prompt" in r.stderr


def test_generate_help_lists_the_options():
    r = run("-m", "qoq_jax.generate", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--prompts-file", "--max-new-tokens", "--temperature", "--top-k",
                "--top-p", "--seed", "--chat", "--batch-size", "--json", "--dtype", "--kv-cache",
                "--quantize"):
        assert opt in r.stdout


def test_generate_with_a_missing_model_path(tmp_path):
    r = run("-m", "qoq_jax.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 1 and "no model at" in r.stderr


@pytest.mark.slow
def test_generate_json_batch_from_a_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nName a color.\nSay hello.\n")
    r = run("-m", "qoq_jax.generate", "--prompts-file", str(prompts), "--chat", "--json",
            "--max-new-tokens", "10", "--batch-size", "2", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["What is the capital of France?", "Name a color.",
                                               "Say hello."]
    assert rows[0]["text"].startswith("The capital of France is Paris")
    assert all(1 <= len(row["token_ids"]) <= 10 for row in rows)
    assert "tokens/s" in r.stderr


@pytest.mark.slow
def test_generate_rejects_an_empty_prompt():
    r = run("-m", "qoq_jax.generate", "--prompt", "", "--max-new-tokens", "2")
    assert r.returncode == 1 and "prompt 0 is empty" in r.stderr


@pytest.mark.slow
def test_gguf_to_hf_converts_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "hf"
    r = run("convert/gguf_to_hf.py", str(assets.default_gguf_path()), str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json"}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 30
    again = run("convert/gguf_to_hf.py", str(assets.default_gguf_path()), str(out), "--quiet")
    assert again.returncode == 1 and "not empty" in again.stderr


def test_gguf_to_hf_on_a_damaged_file_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    out = tmp_path / "hf"
    r = run("convert/gguf_to_hf.py", str(bad), str(out), "--quiet")
    assert r.returncode == 1 and "error:" in r.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


@pytest.mark.slow
def test_generate_quantizes_on_the_fly():
    r = run("-m", "qoq_jax.generate", "--quantize", "rtn", "--chat", "--prompt",
            "What is the capital of France?", "--max-new-tokens", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "rtn on the fly" in r.stderr and "kv4 KV cache" in r.stderr
    assert "Paris" in r.stdout
