"""The notebook-level API: ``qoq_jax.load(...)`` returns an ``LLM`` that generates text.

    import qoq_jax
    llm = qoq_jax.load()                      # the embedded default model (SmolLM2-135M-Instruct)
    print(llm.generate("What is the capital of France?", chat=True)[0].text)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qoq_jax import session
from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine
from qoq_jax.sampling import SamplingParams
from qoq_jax.structured import GrammarCompiler, structured_output


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token or string), "length", "abort" or "error"
    logprobs: list[dict] | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens found in the engine's prefix cache (not computed)


class ChatTemplateError(ValueError):
    """The chat template cannot render the messages (or there is none). `reason`: what a
    client may read (the template's own message, say), or None; the message itself may name
    the model's path."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


# private-use characters around the control tokens found in the messages' strings
_MARK_START, _MARK_END = "\ue000", "\ue001"


def _control_token_re(tokenizer) -> re.Pattern | None:
    """A regex of the tokenizer's special tokens (longest first), or None if it has none."""
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values()
                       if t.special and t.content}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _mark_controls(obj, controls: re.Pattern):
    """Wrap every control token in the strings of messages (nested lists and dicts; not the
    keys) in the markers, after dropping any markers already there."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return controls.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark_controls(v, controls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_controls(v, controls) for v in obj]
    return obj


class LLM:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model, tokenizer, *, source: str = "", **engine_kwargs):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.source = source
        self.engine = Engine(model, **engine_kwargs)
        self.engine.grammar = GrammarCompiler(tokenizer, model.config.vocab_size,
                                              model.config.eos_token_ids)

    def encode(self, prompt: str, *, chat: bool = False, split_special_tokens: bool = False,
               add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt (with the tokenizer's BOS, if it adds one, unless
        add_special_tokens is False); `chat`: as the one user message of a conversation
        (encode_chat).

        split_special_tokens: encode the text of special tokens (``"<|im_start|>"``, ``"</s>"``)
        as ordinary text, so that text cannot forge control tokens. The default parses them, as
        transformers does: LLM.generate and LLM.stream use it (the caller's own text is
        trusted). The server passes True for what its clients send, unless told otherwise
        (``--allow-special-tokens``, or ``allow_special_tokens`` in a request)."""
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}],
                                    split_special_tokens=split_special_tokens)
        if split_special_tokens:
            return self._encode_as_text(prompt, add_special_tokens=add_special_tokens)
        return [int(i) for i in self.tokenizer.encode(prompt,
                                                      add_special_tokens=add_special_tokens)]

    def encode_chat(self, messages: Sequence[dict], *, split_special_tokens: bool = False,
                    tools: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a conversation in the model's chat template, ready for the reply.

        split_special_tokens: special tokens that appear in the messages' strings are encoded
        as text; only those the template writes itself are control tokens (each such string
        is wrapped in private-use markers before rendering, and the rendered text is encoded
        piece by piece). Without such text in the messages, the ids are the same either way.
        tools: OpenAI function signatures, for a template that renders them.
        ValueError (ChatTemplateError) if there is no template or it fails."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ChatTemplateError(f"the tokenizer of {self.source} has no chat template",
                                    reason="this model has no chat template")
        messages = list(messages)
        if split_special_tokens:
            controls = _control_token_re(tok)
            if controls is not None:
                messages = _mark_controls(messages, controls)
        try:
            extra = {"tools": list(tools)} if tools else {}
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           **extra)
        except Exception as e:  # noqa: BLE001 - jinja errors of a broken template
            # the template's own message (raise_exception) is the client's to read; anything
            # else stays in the detail, which names the source
            import jinja2

            reason = str(e) if isinstance(e, jinja2.TemplateError) else None
            raise ChatTemplateError(f"the chat template of {self.source} failed: "
                                    f"{type(e).__name__}: {e}", reason=reason) from None
        if not split_special_tokens or (_MARK_START not in text and _MARK_END not in text):
            return [int(i) for i in tok.encode(text, add_special_tokens=False)]
        return self._encode_marked(text)

    def _plain_text_tokenizer(self):
        """A copy of the fast tokenizer's backend that encodes special tokens as text
        (encode_special_tokens), or None for a slow tokenizer. A copy: transformers sets the
        flag on the shared backend per call, which races with other threads using it."""
        t = getattr(self, "_plain_backend", False)
        if t is False:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            t = None
            if backend is not None:
                import copy

                t = copy.deepcopy(backend)
                t.encode_special_tokens = True
            self._plain_backend = t
        return t

    def _encode_as_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        backend = self._plain_text_tokenizer()
        if backend is None:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                        split_special_tokens=True)
        else:
            ids = backend.encode(text, add_special_tokens=add_special_tokens).ids
        return [int(i) for i in ids]

    def _encode_marked(self, text: str) -> list[int]:
        """Encode a chat rendered from marked messages: the template's own text (and control
        tokens) as usual, each marked control token as text. Each piece after the first is
        encoded after a newline that is then removed, so that a SentencePiece tokenizer adds
        no prefix space inside the text; a lone marker (a template that split a marked
        string) is dropped but still separates the text on either side."""
        tok = self.tokenizer
        pattern = _control_token_re(tok)
        markers = re.compile(f"{_MARK_START}({pattern.pattern}){_MARK_END}"
                             f"|[{_MARK_START}{_MARK_END}]")
        pieces = markers.split(text)  # text, token or None, text, token or None, ...
        newline = [int(i) for i in tok.encode("\n", add_special_tokens=False)]
        ids = [int(i) for i in tok.encode(pieces[0], add_special_tokens=False)]
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            if i % 2:  # a marked control token: text
                encode = lambda s: self._encode_as_text(s, add_special_tokens=False)  # noqa: E731
            else:
                encode = lambda s: [int(t) for t in tok.encode(s, add_special_tokens=False)]  # noqa: E731
            got = encode("\n" + piece)
            ids += got[len(newline):] if got[:len(newline)] == newline else encode(piece)
        return ids

    def generate(self, prompts: str | Sequence[str], *, chat: bool = False,
                 stop: Sequence[str] = (),
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 json_schema: dict | str | None = None, regex: str | None = None,
                 choice: Sequence[str] | None = None, grammar: str | None = None,
                 **sampling) -> list[Completion]:
        """Generate for one prompt or a batch (all submitted at once, in-flight batched).

        Keyword arguments are SamplingParams fields (or give `params`, one per prompt);
        `stop` lists strings that end a completion (not included in its text). Structured
        output (at most one): `json_schema` (a dict or its JSON text), `regex`, `choice` (the
        output is one of these strings) or `grammar` (Lark or GBNF); the output then matches
        it (ConstraintError, before any work, if it cannot be compiled)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        structured = structured_output(json_schema=json_schema, regex=regex, choice=choice,
                                       grammar=grammar)
        if structured is not None:
            if params is not None:
                raise ValueError("give the constraint in params (SamplingParams.structured) "
                                 "or as a keyword, not both")
            sampling["structured"] = structured
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise ValueError("give sampling keywords or params, not both")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.encode(p, chat=chat) for p in prompts]
        for i, (p, sp) in enumerate(zip(ids, params)):
            try:
                self.engine.check_request(p, sp)
                if sp.structured is not None:  # before any work: compiled once, cached
                    self.engine.grammar.compile(sp.structured)
            except ValueError as e:
                raise type(e)(f"prompt {i}: {e}") from None
        sessions = [session.Session(self.engine, self.tokenizer, p, sp, stop)
                    for p, sp in zip(ids, params)]
        self.engine.run(lambda: all(self.engine.finished(s.request_id) for s in sessions))
        out = []
        for prompt, s in zip(prompts, sessions):
            s.close()
            out.append(Completion(prompt, s.text.text, list(s.token_ids), s.finish_reason,
                                  s.logprobs, s.error, s.cached_tokens))
        return out

    def stream(self, prompt: str, *, chat: bool = False, stop: Sequence[str] = (),
               params: SamplingParams | None = None,
               json_schema: dict | str | None = None, regex: str | None = None,
               choice: Sequence[str] | None = None, grammar: str | None = None,
               **sampling) -> Iterator[str]:
        """Generate one completion, yielding its text as it is produced (RuntimeError if the
        engine fails it). Structured output as in generate."""
        structured = structured_output(json_schema=json_schema, regex=regex, choice=choice,
                                       grammar=grammar)
        if structured is not None:
            if params is not None:
                raise ValueError("give the constraint in params or as a keyword, not both")
            sampling["structured"] = structured
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise ValueError("give sampling keywords or params, not both")
        ids = self.encode(prompt, chat=chat)
        for d in session.stream(self.engine, self.tokenizer, ids, params, stop):
            if d.text or d.finish_reason is not None:
                yield d.text

    def score(self, token_ids: Sequence[int], *, seq_len: int, **kw):
        """Log-probabilities of every next token, in windows of seq_len (qoq_jax.eval.scoring)."""
        from qoq_jax.eval.scoring import score

        n = len(token_ids) // seq_len
        windows = np.asarray(token_ids[:n * seq_len], np.int32).reshape(n, seq_len)
        return score(self.engine, windows, **kw)


def load(path: str | os.PathLike | None = None, *, dtype=None, quantize=None,
         verify_checkpoint: bool | None = None, gemm_backend: str = "auto",
         tensor_parallel: int = 1, draft_model=None, **engine_kwargs) -> LLM:
    """Load a model for generation.

    path: None (the embedded default model), a Hugging Face checkpoint directory, a .gguf file,
    or a quantized checkpoint written by convert_hf_checkpoint (then it runs W4A8 with a KV4
    cache). quantize: a QuantConfig (or "qoq" / "rtn") to quantize a float model on the fly.
    verify_checkpoint: check a quantized checkpoint's checksums (default: yes, unless
    QOQ_JAX_VERIFY_CHECKPOINTS=0). gemm_backend: the W4A8 GEMM of a quantized model ("auto":
    Mosaic GPU on Hopper, Triton on other GPUs, XLA on CPU; or "mosaic", "triton", "xla").
    tensor_parallel: split the model over this many devices (qoq_jax.sharding: Megatron-style,
    one all-reduce per attention block and per MLP); weights are read straight into their
    shards. Across hosts, call jax.distributed.initialize() first (every process runs the
    same program); the devices of all processes form the mesh.
    draft_model: with speculative="draft", the model that proposes tokens: a path as for
    `path` (a quantized checkpoint brings its KV4 cache as draft_kv_cache) or a loaded
    Transformer; it must share the target's tokenizer (ValueError otherwise).
    Engine keywords (kv_cache="16bit" | "kv4" | "kv4-minmax", page_size,
    max_slots, num_pages, kv_memory, speculative, num_speculative_tokens, ...: see
    EngineConfig) pass through.
    """
    from pallas_kernels import resolve_gemm_backend
    from qoq_jax import sharding

    resolve_gemm_backend(gemm_backend)  # a misspelled backend fails now, not after loading
    if draft_model is not None and engine_kwargs.get("speculative") != "draft":
        raise ValueError("draft_model is given but speculative is "
                         f"{engine_kwargs.get('speculative')!r}: pass speculative='draft'")
    mesh = sharding.make_mesh(tensor_parallel)  # None for 1: the single-device path
    if mesh is not None:
        engine_kwargs["mesh"] = mesh
    model, tokenizer, source, kv_cache = _load_model(
        path, dtype=dtype, quantize=quantize, verify_checkpoint=verify_checkpoint,
        gemm_backend=gemm_backend, mesh=mesh)
    if kv_cache is not None:
        engine_kwargs.setdefault("kv_cache", kv_cache)
    if isinstance(draft_model, (str, os.PathLike)):
        draft, draft_tokenizer, draft_source, draft_kv = _load_model(
            draft_model, dtype=dtype, quantize=None, verify_checkpoint=verify_checkpoint,
            gemm_backend=gemm_backend, mesh=None)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the draft model {draft_source} has another tokenizer than "
                             f"{source}: a draft must share the target's vocabulary")
        draft_model = draft
        if draft_kv is not None:
            engine_kwargs.setdefault("draft_kv_cache", draft_kv)
    if draft_model is not None:
        engine_kwargs["draft_model"] = draft_model
    return LLM(model, tokenizer, source=source, **engine_kwargs)


def _load_model(path, *, dtype, quantize, verify_checkpoint, gemm_backend, mesh):
    """(model, tokenizer, source, kv_cache): a model as load() describes, and the KV cache its
    quantization asks for (None for a float model)."""
    from qoq_jax import checkpoint
    from qoq_jax.convert import quantize as run_quantize
    from qoq_jax.hf import load_tokenizer
    from qoq_jax.loading import load_source, resolve_dtype
    from qoq_jax.quant.config import QuantConfig

    dtype = resolve_dtype(dtype)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no model at {p}")
        if not p.is_dir() and p.suffix != ".gguf":
            raise ValueError(f"{p} is neither a model directory nor a .gguf file")
        if checkpoint.is_quantized_checkpoint(p):
            if quantize is not None:
                raise ValueError(f"{p} is already quantized")
            model, qcfg = checkpoint.load_model(p, dtype, verify=verify_checkpoint,
                                                gemm_backend=gemm_backend, mesh=mesh)
            return model, load_tokenizer(p), str(p), qcfg.kv_cache
    cfg, weights, tokenizer, source = load_source(None if path is None else str(path))
    if quantize is None:
        from qoq_jax.model import from_hf_weights

        return from_hf_weights(cfg, weights, dtype, mesh=mesh), tokenizer, source, None
    qcfg = QuantConfig(method=quantize) if isinstance(quantize, str) else quantize
    # quantized on one device (offline work), then sharded by the engine
    model, _ = run_quantize(cfg, weights, tokenizer, qcfg, dtype=dtype, gemm_backend=gemm_backend)
    return model, tokenizer, f"{source} ({qcfg.method} on the fly)", qcfg.kv_cache
