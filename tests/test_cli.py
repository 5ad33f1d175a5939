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
                "--quantize", "--no-prefix-caching", "--min-p", "--repetition-penalty",
                "--presence-penalty", "--frequency-penalty", "--min-tokens"):
        assert opt in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),
    (["--seed", str(2**32)], "--seed: must be in [0, 4294967295]"),
    (["--page-size", "0"], "--page-size: must be >= 1, got 0"),
    (["--page-size", "-16"], "--page-size: must be >= 1"),
    (["--page-size", "12"], "--page-size: must be a power of two"),
    (["--temperature", "nan"], "--temperature: must be a finite number"),
    (["--top-p", "0"], "--top-p: must be in (0.0, 1.0]"),
    (["--max-new-tokens", "2.5"], "--max-new-tokens: '2.5' is not an integer"),
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--batch-size", "0"], "--max-slots: must be >= 1"),
    (["--min-p", "1.5"], "--min-p: must be in [0.0, 1.0], got 1.5"),
    (["--repetition-penalty", "0"], "--repetition-penalty: must be in (0.0, 100.0]"),
    (["--presence-penalty", "-3"], "--presence-penalty: must be in [-2.0, 2.0]"),
])
def test_generate_refuses_bad_numbers_with_one_line(args, message):
    r = run("-m", "qoq_jax.generate", "--prompt", "hi", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_generate_refuses_bad_prompt_files_and_bad_utf8(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    cases = [(["--prompts-file", str(tmp_path)], "is a directory"),
             (["--prompts-file", str(blank)], "has no non-blank line"),
             (["--prompts-file", str(binary)], "is not UTF-8 text"),
             (["--prompts-file", str(tmp_path / "none.txt")], "no prompts file")]
    for args, message in cases:
        r = run("-m", "qoq_jax.generate", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable.encode(), b"-m", b"qoq_jax.generate", b"--prompt",
                        b"caf\xe9"], capture_output=True, cwd=REPO, timeout=600)
    assert r.returncode == 2 and b"is not valid UTF-8 text" in r.stderr


def test_serve_help_lists_the_options():
    r = run("-m", "qoq_jax.serve", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--host", "--port", "--api-key", "--max-slots", "--num-pages",
                "--max-queue", "--kv-cache", "--warmup", "--no-prefix-caching"):
        assert opt in r.stdout


def test_generate_shares_prompt_prefixes_unless_told_not_to(tmp_path, capsys):
    from helpers import make_tiny_quant_checkpoint

    from qoq_jax import generate

    ckpt = make_tiny_quant_checkpoint(tmp_path / "m", "llama", seed=3)
    prompt = "one system prompt shared by every request, long enough for pages " * 3
    args = ["--model", str(ckpt), "--prompt", prompt + "first", "--prompt", prompt + "second",
            "--max-new-tokens", "3", "--json"]
    outputs = {}
    for extra in ([], ["--no-prefix-caching"]):
        assert generate.main(args + extra) == 0
        out, err = capsys.readouterr()
        outputs[bool(extra)] = [json.loads(line)["token_ids"] for line in out.splitlines()]
        cached = int(err.split(" prompt tokens from the prefix cache")[0].rsplit(" ", 1)[-1])
        if extra:
            assert cached == 0 and "(off)" in err, err
        else:
            assert cached >= 16, err
    assert outputs[False] == outputs[True]
    # the sampling flags reach the engine: the same tokens as LLM.generate with those params
    import qoq_jax

    flags = ["--repetition-penalty", "3", "--frequency-penalty", "1.5", "--min-tokens", "2"]
    assert generate.main(args[:4] + ["--max-new-tokens", "6", "--json", *flags]) == 0
    got = json.loads(capsys.readouterr()[0].splitlines()[0])["token_ids"]
    llm = qoq_jax.load(ckpt)
    want = llm.generate(prompt + "first", max_new_tokens=6, repetition_penalty=3,
                        frequency_penalty=1.5, min_tokens=2)[0].token_ids
    assert got == want
    assert want != llm.generate(prompt + "first", max_new_tokens=6)[0].token_ids


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
    assert "tokens/s" in r.stderr and "compilation" in r.stderr


@pytest.mark.slow
def test_generate_streams_and_stops_at_a_stop_string():
    r = run("-m", "qoq_jax.generate", "--chat", "--prompt", "What is the capital of France?",
            "--stream", "--stop", " is", "--max-new-tokens", "12", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France"


@pytest.mark.slow
def test_generate_rejects_an_empty_prompt():
    r = run("-m", "qoq_jax.generate", "--prompt", "", "--max-new-tokens", "2")
    assert r.returncode == 1 and "prompt 0: the prompt is empty" in r.stderr


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


_CACHE_PROBE = """
import jax, numpy as np
from qoq_jax.cli import enable_compilation_cache
from qoq_jax.engine import COMPILES
path = enable_compilation_cache()
jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
print(path, COMPILES.count)
"""


def test_the_command_line_tools_keep_compiled_programs_on_disk(tmp_path):
    """The CLIs' on-disk compilation cache: the first process compiles, the second loads (and the
    engine's compile counter sees both); QOQ_JAX_COMPILATION_CACHE=0 turns it off."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(QOQ_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")

    def probe(**extra):
        r = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True,
                           cwd=REPO, env={**env, **extra}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        path, count = r.stdout.split()
        return path, int(count)

    assert probe() == (str(tmp_path / "xla"), 1)
    entries = list((tmp_path / "xla").iterdir())
    assert entries, "nothing was written to the cache"
    assert probe() == (str(tmp_path / "xla"), 1)  # loaded from the cache: still counted
    assert len(list((tmp_path / "xla").iterdir())) == len(entries)  # and not compiled again
    assert probe(QOQ_JAX_COMPILATION_CACHE="0") == ("None", 1)


_SCRIPT_HOLDING_AN_LLM = """
import qoq_jax
llm = qoq_jax.load(None, dtype="float32")  # a module global: alive until interpreter exit
print(llm.generate("Say hi.", chat=True, max_new_tokens=2)[0].text)
"""


@pytest.mark.slow
def test_a_script_holding_an_llm_exits_quietly():
    """Nothing printed at interpreter exit: the compiled programs shared between runners
    (runner.SHARED_EXECUTABLES, weak entries) die after the modules their keys' hashes used."""
    r = run("-c", _SCRIPT_HOLDING_AN_LLM)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
