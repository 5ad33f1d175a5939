"""Load generator for OpenAI-compatible servers: ours and `transformers serve`, side by side.

Starts each server in a subprocess on 127.0.0.1, warms it up, then drives it with the `openai`
client: --concurrency streams each sending chat requests back to back (or, with --rate, Poisson
arrivals at that many requests per second), every request streaming --max-tokens tokens. It
reports output tokens/s (all completion tokens / wall time of the load), time to first token and
time per output token (median and p99), per server, in one run.

    .venv/bin/python benchmarks/serve.py                                  # ours (fp32) vs transformers
    .venv/bin/python benchmarks/serve.py --variant w4a8kv4 --no-transformers
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000/v1   # a server already running
    .venv/bin/python benchmarks/serve.py --shared-prefix 1500 --concurrency 16 --requests 16 \
        --max-tokens 32 --no-transformers                                 # prefix caching on/off

--shared-prefix N: every request is the same N-token system prompt (real text: "Botchan") and
a short question of its own; our server is started with prefix caching and with
--no-prefix-caching, and each meets this load and the same questions each with a short system
prompt of its own (no KV page shared), so the table shows what caching gains and that it
costs nothing without sharing.

transformers serve runs in the test oracle's interpreter (.venv-ref, `make ref-venv`), with
--continuous-batching, on the same model files (the default model's HF directory), float32, CPU.
Completion tokens are counted by tokenizing each response with the model's tokenizer, so both
servers are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the ocean", "a lighthouse", "mountains", "coffee", "the moon", "trains", "autumn",
          "a library", "bees", "the desert", "rain", "chess", "volcanoes", "bread", "owls",
          "the river", "a garden", "winter", "a robot", "the city"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n"
                               f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def start_ours(model: str | None, variant: str, port: int, extra: list[str]) -> subprocess.Popen:
    """Our server as a user starts it (W4A8KV4: --quantize rtn, the runtime path of QoQ
    checkpoints)."""
    # --warmup: every prefill and decode shape compiled before serving, as a deployment would
    # start it (the load's own warm-up round does not reach every shape the load meets).
    cmd = [sys.executable, "-m", "qoq_jax.serve", "--port", str(port), "--log-level", "warning",
           "--served-model-name", "model", "--warmup", *extra]
    if model:
        cmd += ["--model", model]
    if variant == "w4a8kv4":
        cmd += ["--quantize", "rtn"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def start_transformers(model_dir: str, port: int, ref_python: str) -> subprocess.Popen:
    cli = Path(ref_python).with_name("transformers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return subprocess.Popen([str(cli), "serve", "--continuous-batching", "--device", "cpu",
                             "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1",
                             model_dir], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


QUESTIONS = ["Who is the narrator?", "Where does the story take place?", "What is the tone?",
             "Summarize the first paragraph.", "Name one character.", "What happens next?",
             "Is the narrator honest?", "What does the father think?", "Describe the house.",
             "Why is he punished?", "What is a samurai?", "Who is Kiyo?", "What year is it?",
             "What is the main conflict?", "Give the story a title.", "What would you change?"]


def shared_system_prompt(tokenizer, num_tokens: int) -> str:
    """The first `num_tokens` tokens of real text (Botchan, public domain) as a string."""
    from qoq_jax import assets

    ids = tokenizer.encode(assets.botchan_path().read_text(encoding="utf-8"),
                           add_special_tokens=False)[:num_tokens]
    if len(ids) < num_tokens:
        raise ValueError(f"the text has only {len(ids)} tokens")
    return tokenizer.decode(ids)


def make_prompts(n: int, offset: int = 0, system=None) -> list[list[dict]]:
    """n chat conversations. Without `system`: story requests on distinct topics; with it (a
    string, or a function of the request's index): that system prompt and a short question
    each (distinct for n <= 16 per offset)."""
    out = []
    for i in range(offset, offset + n):
        if system is None:
            out.append([{"role": "user",
                         "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}])
        else:
            q = QUESTIONS[i % len(QUESTIONS)]
            text = system(i) if callable(system) else system
            out.append([{"role": "system", "content": text},
                        {"role": "user", "content": f"Question {i}: {q}"}])
    return out


def distinct_system(i: int) -> str:
    """A system prompt of its own per request, different from its first words on: no full KV
    page is shared (without one, the chat template's default system prompt would be)."""
    return f"{i} is your number. You answer questions."


async def _one(client, model, messages, max_tokens, ignore_eos):
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    extra = {"ignore_eos": True} if ignore_eos else {}
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens,
        temperature=0, stream=True, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(chunk.choices[0].delta.content)
    return {"start": t0, "first": first, "last": last, "text": "".join(pieces)}


async def drive(base_url: str, *, concurrency: int, requests: int, max_tokens: int,
                rate: float | None, ignore_eos: bool, seed: int = 0, offset: int = 0,
                system: str | None = None) -> tuple[list, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    prompts = make_prompts(requests, offset, system)
    results = []
    t0 = time.perf_counter()
    if rate is None:
        queue = list(range(requests))

        async def worker():
            while queue:
                i = queue.pop(0)
                results.append(await _one(client, model, prompts[i], max_tokens, ignore_eos))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        rng = random.Random(seed)
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(_one(client, model, prompts[i], max_tokens,
                                                  ignore_eos)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def summarize(name: str, results: list, wall: float, tokenizer) -> dict:
    n_tokens = [len(tokenizer.encode(r["text"], add_special_tokens=False)) for r in results]
    ttft = sorted(r["first"] - r["start"] for r in results if r["first"])
    tpot = sorted((r["last"] - r["first"]) / (n - 1)
                  for r, n in zip(results, n_tokens) if r["first"] and n > 1)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"server": name, "requests": len(results), "output_tokens": sum(n_tokens),
            "wall_s": wall, "output_tokens_per_s": sum(n_tokens) / wall,
            "ttft_median_s": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p99_s": pct(ttft, 0.99),
            "tpot_median_s": statistics.median(tpot) if tpot else float("nan"),
            "tpot_p99_s": pct(tpot, 0.99)}


def start_vllm(model_dir: str, port: int) -> subprocess.Popen:
    """vLLM's CPU build, as ../shared/tools/vllm_cpu.sh installs and starts it."""
    tool = REPO.parent / "shared" / "tools" / "vllm_cpu.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return subprocess.Popen(["bash", str(tool), "serve", model_dir, "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def run_against(name, url, proc, args, tokenizer, ignore_eos, loads=((None, None),)):
    """Every concurrency level of args.concurrency, under each (label, system prompt) of
    `loads`, against one server (started once)."""
    rows = []
    try:
        if proc is not None:
            _wait_healthy(url.removesuffix("/v1"), proc)
        for label, system in loads:
            for c in args.concurrency:
                n = args.requests or max(8, 2 * c)
                # warm-up: compiles (ours) and first-call costs, with the load's own shapes;
                # its questions differ from the measured ones (a cache must not see them)
                asyncio.run(drive(url, concurrency=c, requests=c, max_tokens=args.max_tokens,
                                  rate=None, ignore_eos=ignore_eos, offset=1000, system=system))
                results, wall = asyncio.run(drive(url, concurrency=c, requests=n,
                                                  max_tokens=args.max_tokens, rate=args.rate,
                                                  ignore_eos=ignore_eos, system=system))
                row = {**summarize(name, results, wall, tokenizer), "concurrency": c}
                if label is not None:
                    row["load"] = label
                rows.append(row)
                print(_row(rows[-1]), flush=True)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _row(r: dict) -> str:
    server = r["server"] + (f" ({r['load']})" if "load" in r else "")
    return (f"| {server} | {r['concurrency']} | {r['output_tokens_per_s']:.1f} | "
            f"{r['ttft_median_s']:.2f} | {r['ttft_p99_s']:.2f} | {r['tpot_median_s'] * 1e3:.1f} | "
            f"{r['tpot_p99_s'] * 1e3:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model for our server (default: the embedded default)")
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], nargs="+", default=["fp32"],
                    help="our server's variants (each started on its own)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16],
                    help="concurrent streams; several values give a curve (e.g. 1 4 16)")
    ap.add_argument("--requests", type=int,
                    help="requests in each measured load (default: 2 x concurrency, >= 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rate", type=float, help="Poisson arrivals (requests/s) instead of "
                                               "closed-loop streams")
    ap.add_argument("--url", help="measure a running server at this /v1 URL instead")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers serve")
    ap.add_argument("--vllm", action="store_true",
                    help="also vLLM's CPU build (../shared/tools/vllm_cpu.sh install first)")
    ap.add_argument("--shared-prefix", type=int, metavar="N",
                    help="requests share an N-token system prompt: our server with and without "
                         "prefix caching, each under this load and the same questions alone")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for our server (repeatable)")
    ap.add_argument("--out-dir", default="out", help="JSON and PNG go here (default ./out; "
                                                     "$OUT when set)")
    args = ap.parse_args(argv)

    import qoq_jax  # noqa: F401  (the tokenizer for counting)
    from qoq_jax import assets
    from qoq_jax.hf import load_tokenizer

    model_dir = args.model or str(assets.default_model_dir())
    tokenizer = load_tokenizer(model_dir)
    print("| server | streams | output tok/s | TTFT median s | TTFT p99 s | TPOT median ms | "
          "TPOT p99 ms |\n|---|---|---|---|---|---|---|", flush=True)
    rows = []
    if args.shared_prefix:
        return shared_prefix_main(args, tokenizer)
    if args.url:
        rows += run_against("given", args.url, None, args, tokenizer, ignore_eos=False)
    else:
        for variant in args.variant:
            port = _free_port()
            proc = start_ours(args.model, variant, port, args.server_arg)
            rows += run_against(f"qoq-jax {variant}", f"http://127.0.0.1:{port}/v1", proc,
                                args, tokenizer, ignore_eos=True)
        if not args.no_transformers:
            ref = os.environ.get("QOQ_REF_PYTHON") or str(REPO / ".venv-ref" / "bin" / "python")
            port = _free_port()
            proc = start_transformers(model_dir, port, ref)
            rows += run_against("transformers serve --continuous-batching",
                                f"http://127.0.0.1:{port}/v1", proc, args, tokenizer,
                                ignore_eos=False)
        if args.vllm:
            port = _free_port()
            rows += run_against("vLLM 0.32 CPU", f"http://127.0.0.1:{port}/v1",
                                start_vllm(model_dir, port), args, tokenizer, ignore_eos=True)
    out = Path(os.environ.get("OUT") or args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(rows, indent=1))
    servers = list(dict.fromkeys(r["server"] for r in rows))

    def series(key, scale=1.0):
        return {name: ([r["concurrency"] for r in rows if r["server"] == name],
                       [r[key] * scale for r in rows if r["server"] == name])
                for name in servers}

    from _plot import plot_curves

    png = plot_curves(out / "serve.png", f"chat, {args.max_tokens} tokens per request",
                      "concurrent streams", [("output tokens/s", series("output_tokens_per_s")),
                                              ("median time to first token (s)",
                                               series("ttft_median_s"))])
    print(f"wrote {out / 'serve.json'} and {png}")
    print(json.dumps(rows))
    return 0


def shared_prefix_main(args, tokenizer) -> int:
    """--shared-prefix: prefix caching on and off, each under the shared-prompt load and the
    same questions without it; a table of ratios, serve_prefix.json and serve_prefix.png."""
    system = shared_system_prompt(tokenizer, args.shared_prefix)
    loads = ((f"shared {args.shared_prefix}-token prefix", system),
             ("no shared prefix", distinct_system))
    rows = []
    for variant in args.variant:
        for caching in (True, False):
            port = _free_port()
            extra = args.server_arg + ([] if caching else ["--no-prefix-caching"])
            name = f"qoq-jax {variant} caching {'on' if caching else 'off'}"
            rows += run_against(name, f"http://127.0.0.1:{port}/v1",
                                start_ours(args.model, variant, port, extra), args, tokenizer,
                                ignore_eos=True, loads=loads)
    print("\n| variant | load | streams | TTFT on/off | output tok/s on/off |\n|---|---|---|---|---|")
    for variant in args.variant:
        for label, _ in loads:
            for c in args.concurrency:
                on, off = (next(r for r in rows if r["server"] == f"qoq-jax {variant} caching "
                                f"{state}" and r["load"] == label and r["concurrency"] == c)
                           for state in ("on", "off"))
                print(f"| {variant} | {label} | {c} | "
                      f"{on['ttft_median_s'] / off['ttft_median_s']:.3f} | "
                      f"{on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f} |")
    out = Path(os.environ.get("OUT") or args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_prefix.json").write_text(json.dumps(rows, indent=1))
    from _plot import plot_bars

    groups = [f"{r['server'].removeprefix('qoq-jax ')}\n{r['load']}" for r in rows]
    png = plot_bars(out / "serve_prefix.png",
                    f"{args.requests or max(8, 2 * args.concurrency[0])} chat requests, "
                    f"{args.max_tokens} tokens each, {args.concurrency[0]} streams",
                    groups, [("output tokens/s", [r["output_tokens_per_s"] for r in rows]),
                             ("median time to first token (s)",
                              [r["ttft_median_s"] for r in rows])])
    print(f"wrote {out / 'serve_prefix.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
