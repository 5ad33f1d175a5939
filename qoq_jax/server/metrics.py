"""The server's Prometheus metrics (own registry): requests by route and status (counted by the
Guard for every answer, errors included; the route is one of completions, chat, models, health,
metrics, docs, other), tokens, time to first token and per output token, HTTP requests in
flight, and gauges read from the engine's public counters (queue, slots, KV pages, the prefix
cache's hit rate and pages, structured output's compilations and masks, speculative decoding's proposed and
accepted tokens and acceptance rate by position)."""

from __future__ import annotations

import prometheus_client as prom


class Metrics:
    def __init__(self, engine):
        r = self.registry = prom.CollectorRegistry()
        self._requests = prom.Counter("qoq_requests", "HTTP requests by route and status",
                                      ["route", "status"], registry=r)
        self._prompt = prom.Counter("qoq_prompt_tokens", "prompt tokens of finished requests",
                                    registry=r)
        self._cached = prom.Counter("qoq_prompt_tokens_cached",
                                    "prompt tokens of finished requests served from the prefix "
                                    "cache (not computed again)", registry=r)
        self._gen = prom.Counter("qoq_generation_tokens", "generated tokens", registry=r)
        self._ttft = prom.Histogram("qoq_time_to_first_token_seconds", "time to first token",
                                    buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                    registry=r)
        self._tpot = prom.Histogram("qoq_time_per_output_token_seconds",
                                    "time per output token after the first",
                                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                             2.5), registry=r)
        for name, doc, read in (
                ("qoq_queue_depth", "requests waiting for a slot", lambda: engine.num_waiting),
                ("qoq_running_requests", "requests in a decode slot", lambda: engine.num_running),
                ("qoq_kv_pages_in_use", "KV-cache pages in use",
                 lambda: engine.allocator.num_used),
                ("qoq_kv_pages_total", "KV-cache pages (the scratch page excluded)",
                 lambda: engine.num_pages - 1),
                ("qoq_prefix_cache_hit_rate", "prompt tokens served from the prefix cache / "
                 "all prompt tokens, since the start",
                 lambda: engine.prefix_cache_stats["hit_rate"]),
                ("qoq_prefix_cache_pages", "KV pages held by the prefix cache (shared by "
                 "running requests or kept for later ones)",
                 lambda: engine.prefix_cache_stats["cached_pages"]),
                ("qoq_structured_constraints_compiled", "distinct structured-output "
                 "constraints compiled (each once: later requests hit the cache)",
                 lambda: engine.grammar.stats.compiled if engine.grammar else 0),
                ("qoq_structured_compile_seconds", "time spent compiling structured-output "
                 "constraints, since the start",
                 lambda: engine.grammar.stats.seconds if engine.grammar else 0.0),
                ("qoq_structured_masks", "token masks computed for constrained rows",
                 lambda: engine.stats["masks"]),
                ("qoq_structured_mask_seconds", "host time computing token masks",
                 lambda: engine.stats["mask_seconds"])):
            prom.Gauge(name, doc, registry=r).set_function(read)
        # speculative decoding: totals, and the acceptance rate by position (set at each scrape)
        spec = lambda key: lambda: engine.speculative_stats[key]  # noqa: E731
        for name, doc, key in (
                ("qoq_spec_proposed_tokens", "tokens proposed by speculative decoding",
                 "proposed"),
                ("qoq_spec_accepted_tokens", "proposed tokens the target model accepted",
                 "accepted"),
                ("qoq_spec_acceptance_rate", "accepted / proposed tokens, since the start",
                 "acceptance_rate")):
            prom.Gauge(name, doc, registry=r).set_function(spec(key))
        self._engine = engine
        self._spec_position = prom.Gauge(
            "qoq_spec_acceptance_rate_by_position", "accepted / proposed tokens at each "
            "proposal position (0: the first proposed token)", ["position"], registry=r)

    def track_in_flight(self, read) -> None:
        prom.Gauge("qoq_requests_in_flight", "HTTP requests being answered",
                   registry=self.registry).set_function(read)

    def request(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def generation_done(self, session) -> None:
        """Token counts and time per output token of a closed qoq_jax.session.Session."""
        n_out = len(session.token_ids)
        self._prompt.inc(session.num_prompt_tokens)
        self._cached.inc(session.cached_tokens)
        self._gen.inc(n_out)
        if session.first_token_at is not None and n_out > 1:
            self._tpot.observe((session.last_token_at - session.first_token_at) / (n_out - 1))

    def render(self) -> tuple[str, str]:
        """(text, content type) for /metrics."""
        if self._engine.speculative:
            rates = self._engine.speculative_stats["acceptance_rate_per_position"]
            for i, rate in enumerate(rates):
                self._spec_position.labels(str(i)).set(rate)
        return prom.generate_latest(self.registry).decode(), prom.CONTENT_TYPE_LATEST
