"""Structured output: constraints on what a request may generate, compiled by llguidance.

A request's constraint is a ``StructuredOutput`` (a JSON schema, any JSON object, a regular
expression, a choice among strings, or a Lark / GBNF grammar) carried in its SamplingParams.
``GrammarCompiler`` (one per tokenizer, so one per LLM) turns it into an llguidance grammar
once and caches it; every request gets its own ``Constraint``, a matcher copied from the
cached one. The engine asks each constrained row's Constraint for the bitmask of the tokens it
allows before the row samples (``fill``), applies it on the device after the other logit
processing, and feeds the sampled tokens back (``advance``); the request ends ("stop") when the
constraint is complete (``finished``: only the end-of-sequence token could follow).

Why llguidance: a Rust library with no Python dependencies (xgrammar and outlines pull in
torch), JSON schema, regex, Lark and GBNF in one, and about 20 us per mask for the default
model's 49k-token vocabulary on this CPU. See docs/ARCHITECTURE.md for how the engine
schedules constrained rows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import threading
import time
from collections.abc import Sequence

import numpy as np

from qoq_jax.errors import PromptError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class ConstraintError(PromptError):
    """A constraint that cannot be compiled (an invalid or unsupported schema, regex or
    grammar): the message names the problem (HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. ``spec``: the canonical text of the constraint (a
    JSON schema or a choice list as compact JSON with sorted keys, the regex, the grammar)."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConstraintError(f"structured output: unknown kind {self.kind!r} (one of "
                                  f"{', '.join(KINDS)})")
        if not isinstance(self.spec, str):
            raise ConstraintError(f"structured output: {self.kind} must be given as text")

    @classmethod
    def json_schema(cls, schema: dict | str | bool) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"json_schema must be a JSON object, got "
                                  f"{type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "StructuredOutput":
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "StructuredOutput":
        if isinstance(options, str) or not options or not all(
                isinstance(o, str) and o for o in options):
            raise ConstraintError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options), separators=(",", ":")))

    @classmethod
    def grammar(cls, text: str) -> "StructuredOutput":
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("grammar must be a non-empty string (Lark or GBNF)")
        return cls("grammar", text)

    def describe(self) -> str:
        short = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"{self.kind}({short})" if self.spec else self.kind


def structured_output(*, json_schema: dict | str | bool | None = None,
                      json_object: bool = False, regex: str | None = None,
                      choice: Sequence[str] | None = None,
                      grammar: str | None = None) -> StructuredOutput | None:
    """The StructuredOutput of keyword arguments (LLM.generate, the server), None if none is
    given; ConstraintError if several are."""
    given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex),
                                ("choice", choice), ("grammar", grammar)) if v is not None}
    if json_object:
        given["json_object"] = True
    if len(given) > 1:
        raise ConstraintError(f"give at most one structured-output constraint, got "
                              f"{', '.join(sorted(given))}")
    if not given:
        return None
    (kind, value), = given.items()
    if kind == "json_object":
        return StructuredOutput.json_object()
    return getattr(StructuredOutput, kind)(value)


def _grammar_text(so: StructuredOutput) -> str:
    """The llguidance grammar of a constraint (validity is checked by the caller)."""
    from llguidance import LLMatcher, grammar_from

    if so.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(json.loads(so.spec))
    if so.kind == "json_object":  # any JSON object, as OpenAI's json_object mode
        return LLMatcher.grammar_from_json_schema({"type": "object"})
    if so.kind == "regex":
        return LLMatcher.grammar_from_regex(so.spec)
    if so.kind == "choice":
        return grammar_from("choice", so.spec)
    try:  # "grammar": Lark, or GBNF (llama.cpp's), which llguidance converts to Lark
        return grammar_from("grammar", so.spec)
    except ValueError as e:
        raise ConstraintError(f"grammar: {e}") from None


@dataclasses.dataclass
class CompileStats:
    compiled: int = 0  # distinct constraints compiled
    hits: int = 0  # compilations saved by the cache
    seconds: float = 0.0  # spent compiling (validation and the first matcher)
    last_seconds: float = 0.0


class Constraint:
    """One request's matcher: which tokens may come next, fed the tokens that came."""

    def __init__(self, matcher, description: str):
        self._m = matcher
        self.description = description

    def fill(self, row: np.ndarray) -> None:
        """Write the bitmask of the allowed next tokens (bit t % 32 of word t // 32) into
        `row`, a C-contiguous int32 array of ceil(vocab / 32) words."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def advance(self, tokens: Sequence[int]) -> bool:
        """Consume sampled tokens; False if the constraint rejects one (it then stays in an
        error state: the engine ends the request)."""
        return bool(self._m.consume_tokens([int(t) for t in tokens]))

    @property
    def finished(self) -> bool:
        """Nothing but the end-of-sequence token can follow: the output is complete."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer and model vocabulary, with an LRU cache
    (thread-safe: the server compiles in its tokenizer threads, the engine's thread asks for
    matchers)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int], *,
                 cache_size: int = 256):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = [int(t) for t in stop_ids]
        self.mask_words = -(-vocab_size // 32)
        self._tokenizer = None
        self._cache: collections.OrderedDict[StructuredOutput, object] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.stats = CompileStats()

    def _lltokenizer(self):
        if self._tokenizer is None:  # ~0.3 s for a 49k vocabulary: built once, on first use
            try:
                import llguidance.hf
            except ImportError as e:  # pragma: no cover - a dependency of the package
                raise ConstraintError(f"structured output needs llguidance ({e})") from None
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size,
                    eos_token=self.stop_ids or None)
            except ValueError as e:
                raise ConstraintError(f"structured output: this model's tokenizer is not "
                                      f"supported ({e})") from None
        return self._tokenizer

    def compile(self, so: StructuredOutput):
        """The checked matcher of a constraint, from the cache or compiled now
        (ConstraintError naming the problem if it cannot be)."""
        from llguidance import LLMatcher

        with self._lock:
            hit = self._cache.get(so)
            if hit is not None:
                self._cache.move_to_end(so)
                self.stats.hits += 1
                return hit
            tokenizer = self._lltokenizer()
        start = time.perf_counter()
        try:
            grammar = _grammar_text(so)
        except ValueError as e:  # not valid JSON, a GBNF that does not convert
            raise ConstraintError(f"{so.kind}: {e}") from None
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"{so.kind}: {_first_line(matcher.get_error())}")
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.compiled += 1
            self.stats.seconds += elapsed
            self.stats.last_seconds = elapsed
            self._cache[so] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def constraint(self, so: StructuredOutput) -> Constraint:
        """A fresh matcher for one request (a copy of the compiled one)."""
        return Constraint(self.compile(so).deep_copy(), so.describe())


def _first_line(message: str, limit: int = 300) -> str:
    """llguidance's errors carry a multi-line excerpt of the grammar: keep the gist."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    text = "; ".join(lines[:3]) if lines else "invalid constraint"
    return text[:limit]
