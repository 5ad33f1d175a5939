"""An OpenAI-compatible HTTP server over the in-flight-batching engine.

    python -m qoq_jax.serve                          # the default model on 127.0.0.1:8000
    python -m qoq_jax.serve --model smollm2-qoq --port 8080 --api-key secret

Routes: /v1/completions and /v1/chat/completions (with streaming: server-sent events, and
``stream_options.include_usage``), /v1/models, /health, /metrics (Prometheus), /docs. Bad
requests get OpenAI-style JSON errors with 4xx codes; a full queue answers 429; the server
stays up. A client that disconnects cancels its request (its slot and KV pages are freed).
SIGTERM starts a drain: new requests get 503 (the port stays open), the running ones finish
(at most --drain-timeout seconds), then the process exits.

Security defaults: without --api-key on a loopback address, only requests for localhost,
127.0.0.1 or ::1 in the Host header are answered (--allowed-hosts to widen it); request bodies
must be application/json; special tokens that clients write as text stay text
(--allow-special-tokens to change it); /docs and /openapi.json need the key when there is one.

This module is the command line; the app is qoq_jax/server/ (create_app, EngineThread: the
engine runs in a thread of its own) and each request's generation is qoq_jax/session.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from qoq_jax.cli import (ArgumentParser, add_gemm_arg, add_kv_cache_arg, add_parallel_args,
                         add_speculative_args, add_weight_format_args, bounded_float, bounded_int,
                         init_parallel, page_size_arg, positive_int, run_cli, speculative_kwargs)
from qoq_jax.server import EngineThread, create_app

__all__ = ["EngineThread", "build_parser", "create_app", "main"]

log = logging.getLogger("qoq_jax.serve")


# ----------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qoq_jax.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="quantized checkpoint, HF checkpoint directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name",
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=8000,
                   help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    add_kv_cache_arg(p)
    p.add_argument("--quantize", choices=["qoq", "rtn"],
                   help="quantize a float model to W4A8KV4 at start-up (small calibration set; "
                        "convert_hf_checkpoint makes a reusable checkpoint)")
    add_weight_format_args(p, "with --quantize")
    add_gemm_arg(p)
    add_parallel_args(p)
    p.add_argument("--max-slots", type=positive_int,
                   help="sequences decoded together (default 16 on CPU, 128 on GPU)")
    p.add_argument("--num-pages", type=bounded_int(2, None),
                   help="KV-cache pages (default: what --kv-memory-gb holds)")
    p.add_argument("--kv-memory-gb", type=float,
                   help="memory for the KV cache in GiB (default: up to 2 on CPU, half the free "
                        "GPU memory)")
    p.add_argument("--page-size", type=page_size_arg, default=16, help="tokens per KV page")
    p.add_argument("--prefill-chunk", type=page_size_arg,
                   help="most prompt tokens of one request per engine step, a power of two "
                        "(default 512 CPU, 1024 GPU)")
    p.add_argument("--prefill-budget", type=positive_int,
                   help="tokens of one engine step: decode rows plus prompt chunks (default: "
                        "the chunk, at least 2 x max-slots; 2048 on GPU)")
    p.add_argument("--decode-steps", type=bounded_int(1, 16),
                   help="decode steps per dispatch when no prompt waits (default 8 CPU, 16 GPU)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full (by default the KV pages of identical "
                        "prompt prefixes, e.g. a shared system prompt, are computed once and "
                        "shared; /metrics shows the hit rate)")
    add_speculative_args(p)
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="waiting requests before new ones get 429 (default 256)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body (default 1 MiB)")
    p.add_argument("--max-tokens-default", type=positive_int, default=1024,
                   help="the limit of a chat request without max_tokens (or with null), cut to "
                        "what the context leaves (default 1024; completions: 16, as OpenAI's)")
    p.add_argument("--allowed-hosts", type=_host_list,
                   help="comma-separated Host names to answer ('*': any, '*.example.com': "
                        "subdomains); default: without --api-key on a loopback address only "
                        "localhost, 127.0.0.1 and ::1, otherwise any")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="encode special tokens written as text in prompts and messages "
                        "(<|im_start|>, </s>) as control tokens; by default they stay text "
                        "(a request may ask with \"allow_special_tokens\": true)")
    p.add_argument("--no-docs", dest="docs", action="store_false",
                   help="no /docs and /openapi.json (by default served, behind --api-key)")
    seconds = bounded_float(0, 86400, low_open=True)
    p.add_argument("--header-timeout", type=seconds, default=10.0,
                   help="seconds for a request's line and headers to arrive, from the "
                        "connection's start or the previous response (default 10)")
    p.add_argument("--keep-alive-timeout", type=seconds, default=5.0,
                   help="seconds an idle connection stays open between requests (default 5)")
    p.add_argument("--body-timeout", type=seconds, default=30.0,
                   help="seconds for a request body to arrive, else 408 (default 30)")
    p.add_argument("--drain-timeout", type=seconds, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish (new ones get 503) "
                        "before the rest are cancelled and the process exits (default 30)")
    p.add_argument("--max-connections", type=positive_int, default=1000,
                   help="open connections (and requests) before new requests get 503 "
                        "(default 1000)")
    p.add_argument("--max-header-bytes", type=bounded_int(1024, None), default=16384,
                   help="largest request line and headers (default 16384)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every program before serving (no request waits for XLA)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _host_list(text: str) -> tuple[str, ...]:
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    if not hosts:
        raise argparse.ArgumentTypeError("give at least one host name")
    return hosts


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(args) -> tuple[str, ...] | None:
    """--allowed-hosts, or None (create_app's default: loopback names without a key) on a
    loopback address, or any host elsewhere (the address was chosen to be reached)."""
    if args.allowed_hosts is not None:
        return args.allowed_hosts
    if is_loopback(args.host):
        return None
    if args.api_key is None:
        log.warning("serving on %s without --api-key: anyone who reaches it may use it",
                    args.host)
    return ("*",)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _serve(args))


def _serve(args) -> int:
    import os

    import qoq_jax

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    engine_kw = {"page_size": args.page_size, "max_queue": args.max_queue,
                 "prefix_caching": args.prefix_caching, **speculative_kwargs(args)}
    for name in ("kv_cache", "max_slots", "num_pages", "prefill_chunk", "prefill_budget",
                 "decode_steps"):
        if getattr(args, name) is not None:
            engine_kw[name] = getattr(args, name)
    if args.kv_memory_gb is not None:
        if not args.kv_memory_gb > 0:
            raise ValueError(f"--kv-memory-gb must be > 0, got {args.kv_memory_gb}")
        engine_kw["kv_memory"] = int(args.kv_memory_gb * 2**30)
    quantize = None
    if args.quantize:
        from qoq_jax.quant.config import QuantConfig

        quantize = QuantConfig(method=args.quantize, weight_format=args.weight_format,
                               calib_samples=16, calib_seq_len=512)
    init_parallel(args)
    llm = qoq_jax.load(args.model, dtype=args.dtype, quantize=quantize, gemm_backend=args.gemm,
                       tensor_parallel=args.tensor_parallel, **engine_kw)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model))
                                      if args.model else "SmolLM2-135M-Instruct")
    if args.warmup:
        t0 = time.perf_counter()
        n = llm.engine.warmup()
        log.info("compiled %d programs in %.1f s", n, time.perf_counter() - t0)
    from qoq_jax.server.transport import DrainingServer, Timeouts, uvicorn_config

    timeouts = Timeouts(header=args.header_timeout, keep_alive=args.keep_alive_timeout,
                        body=args.body_timeout, drain=args.drain_timeout)
    app = create_app(llm, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, body_timeout=timeouts.body,
                     max_tokens_default=args.max_tokens_default,
                     allow_special_tokens=args.allow_special_tokens,
                     allowed_hosts=allowed_hosts(args), docs=args.docs)
    config = uvicorn_config(app, host=args.host, port=args.port, timeouts=timeouts,
                            max_header_bytes=args.max_header_bytes,
                            max_connections=args.max_connections, log_level=args.log_level)
    server = DrainingServer(config, app.state.server, drain_timeout=timeouts.drain)
    log.info("serving %s (%s, %s KV cache, %d slots, %d pages of %d tokens) on http://%s:%s",
             name, llm.source, llm.engine.kv_cache, llm.engine.max_slots, llm.engine.num_pages,
             llm.engine.page_size, args.host, args.port)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
