"""lm-evaluation-harness (`lm_eval`, run from the oracle's interpreter: it pulls in torch) with
its `local-completions` model against our server on 127.0.0.1, on a small multiple-choice task
of our own: it runs to the end, and every per-choice log-likelihood it logs equals our own
scoring of the same context + continuation tokens (an engine of its own, same checkpoint) to
1e-3; its is_greedy flags are our top-1's, and its acc / exact_match are what our scores give.

lm-eval's loglikelihood requests are completions with echo=true, logprobs=1, max_tokens=1,
temperature 0 and a seed; it sums token_logprobs[ctxlen:-1] and calls a choice greedy when each
of its tokens' log-probability equals the largest of its top_logprobs."""

import glob
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY_QUANT_CONFIGS, random_hf_weights, write_byte_tokenizer
from test_server import Server

import qoq_jax
from qoq_jax.config import ModelConfig
from qoq_jax.hf import save_safetensors
from qoq_jax.serve import create_app

MODEL = "tiny-lm-eval"
TASK = "qoq_tiny_mc"
ENGINE = dict(max_slots=8, page_size=16, num_pages=200, decode_steps=4, prefill_chunk=64,
              max_queue=512)
N_ITEMS = 8


def _lm_eval_python() -> str:
    """The oracle's interpreter, if it has lm_eval; else skip (fail under QOQ_REQUIRE_REF)."""
    ref = os.environ.get("QOQ_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
    msg = None
    if not Path(ref).exists():
        msg = (f"the oracle's interpreter {ref} is missing (make ref-venv builds it, "
               "or set QOQ_REF_PYTHON)")
    elif subprocess.run([ref, "-c", "import importlib.util, sys; "
                         "sys.exit(importlib.util.find_spec('lm_eval') is None)"]).returncode:
        msg = (f"the oracle's interpreter {ref} has no lm_eval (tests/reference/requirements.txt "
               "lists it: make ref-venv installs it)")
    if msg is not None:
        if os.environ.get("QOQ_REQUIRE_REF"):
            pytest.fail(msg)
        pytest.skip(msg)
    return ref


@pytest.fixture(scope="module")
def ref_python():
    return _lm_eval_python()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """tests/helpers.py's tiny quantizable Llama with its byte-level tokenizer (tokenizer.json,
    which lm-eval's Hugging Face tokenizer loads), its embeddings scaled down: the helper's
    puts nearly all the probability on repeating the last byte (log-likelihoods of 0 and
    -300), these spread it (about -5 a token), as a real model's do."""
    path = tmp_path_factory.mktemp("lmeval") / "m"
    path.mkdir()
    hf = TINY_QUANT_CONFIGS["llama"]
    (path / "config.json").write_text(json.dumps(hf))
    weights = random_hf_weights(ModelConfig.from_hf_dict(hf), seed=11, std=0.05)
    weights["model.embed_tokens.weight"] *= 0.2
    save_safetensors(weights, path)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def server(ref_python, ckpt):
    srv = Server(create_app(qoq_jax.load(ckpt, **ENGINE), model_name=MODEL))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same checkpoint in an engine of its own: our scoring, apart from the server's."""
    return qoq_jax.load(ckpt, **ENGINE)


def _printable(ids) -> bool:
    return all(33 <= t <= 126 for t in ids)  # single ASCII bytes of the byte tokenizer, no spaces


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, reference):
    """A task YAML and its jsonl: 8 items of 4 choices each. Each item's first choice is the
    model's own greedy next character where that is a printable byte (and, where the next is
    too, the second is the greedy two), so that some choices are greedy and most are not; two
    contexts end with a space (lm-eval moves it into the continuation); the gold label varies."""
    root = tmp_path_factory.mktemp("task")
    words = ["river", "stone", "light", "paper", "kernel", "quiet", "seven", "blue", "cache"]
    # endings vary; a trailing space is moved into the continuation by lm-eval (and by us)
    endings = ["?", " ", ":", " =", "", ", then"]
    candidates = [f"Q{i}: after the {words[i % 9]} {words[(4 * i + 1) % 9]} comes"
                  f"{endings[i % 6]}" for i in range(96)]
    outs = reference.generate(candidates, max_new_tokens=2, temperature=0, stop_token_ids=())
    items = []
    for ctx, out in zip(candidates, outs):
        ids = list(out.token_ids)
        k = len(items)
        spaced = ctx.endswith(" ") and sum(it["context"].endswith(" ") for it in items) < 2
        if not (_printable(ids[:1]) or spaced):
            continue
        greedy = [bytes(ids[:1]).decode()] if _printable(ids[:1]) else []
        if _printable(ids[:2]) and len(ids) == 2:
            greedy.append(bytes(ids[:2]).decode())
        filler = [f" {words[(k + j) % 9]}" for j in range(4)]
        choices = (greedy + filler)[:4]
        items.append({"context": ctx, "choices": choices, "label": k % 4})
        if len(items) == N_ITEMS:
            break
    assert len(items) == N_ITEMS, "too few contexts whose greedy next byte is printable"
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    (root / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return root, items


def _completions_requests(server) -> dict[str, float]:
    """The server's count of completions requests by status (its /metrics)."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^qoq_requests_total\{route="completions",status="(\d+)"\} (\S+)$', text, re.M)}


def _encode_pair(llm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own split (api/model.py, _encode_pair): trailing spaces of the context move to
    the continuation; the whole is encoded and the context's tokens cut off its front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = llm.encode(context + continuation, add_special_tokens=False)
    ctx = llm.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("tokenized,batch_size", [(True, 4), (False, 2)],
                         ids=["token-ids", "strings"])
def test_lm_eval_local_completions_loglikelihoods_equal_our_scoring(
        ref_python, server, reference, task_dir, ckpt, tmp_path, tokenized, batch_size):
    root, items = task_dir
    out_dir = tmp_path / "out"
    model_args = ",".join([
        f"model={MODEL}", f"base_url={server.url}/v1/completions", f"tokenizer={ckpt}",
        "tokenizer_backend=huggingface", f"tokenized_requests={tokenized}",
        "num_concurrent=1", "max_retries=1", "max_length=512"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    cmd = [ref_python, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", model_args, "--tasks", TASK, "--include_path", str(root),
           "--batch_size", str(batch_size), "--log_samples", "--output_path", str(out_dir),
           "--seed", "1234"]
    before = _completions_requests(server)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"lm_eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    # every request succeeded, batch_size prompts each (a list of token-id lists or strings)
    after = _completions_requests(server)
    sent = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert sent == {"200": math.ceil(4 * N_ITEMS / batch_size)}

    [samples_file] = glob.glob(str(out_dir / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    [results_file] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(N_ITEMS))  # it ran to the end

    diffs, greedy_flags, acc, exact = [], [], [], []
    for s, item in zip(samples, items):
        assert s["doc"] == item
        assert len(s["resps"]) == len(s["filtered_resps"]) == len(item["choices"])
        lls = []
        for j, choice in enumerate(item["choices"]):
            args = s["arguments"][f"gen_args_{j}"]
            ctx_arg, cont_arg = args["arg_0"], args["arg_1"]
            assert (ctx_arg, cont_arg) == (item["context"], choice)
            # logged as strings: ["-12.34", "False"]
            [resp] = s["resps"][j]
            assert s["filtered_resps"][j] == resp and resp[1] in ("True", "False")
            ll, is_greedy = float(resp[0]), resp[1] == "True"
            ctx, cont = _encode_pair(reference, ctx_arg, cont_arg)
            assert ctx and cont
            ours = reference.engine.prompt_logprobs(ctx + cont, n_top=1)
            want = float(np.sum(ours.logprobs[len(ctx):], dtype=np.float64))
            our_greedy = all(top[0][0] == t for top, t in
                             zip(ours.top[len(ctx):], cont))
            diffs.append(abs(ll - want))
            assert ll == pytest.approx(want, abs=1e-3), (item, choice)
            assert is_greedy == our_greedy, (item, choice)
            greedy_flags.append(is_greedy)
            lls.append(want)
        acc.append(float(np.argmax(lls) == item["label"]))
        exact.append(float(greedy_flags[-len(item["choices"]) + item["label"]]))
    # the task has greedy choices and others, so the flags were tested both ways
    assert any(greedy_flags) and not all(greedy_flags)
    results = json.loads(Path(results_file).read_text())["results"][TASK]
    assert results["acc,none"] == pytest.approx(np.mean(acc))
    assert results["exact_match,none"] == pytest.approx(np.mean(exact))
    print(f"lm-eval vs our scoring: {len(diffs)} log-likelihoods, max |diff| {max(diffs):.2e}")
