"""Incremental detokenization and stop strings (host side of the server and the API)."""

from pathlib import Path

import pytest
from helpers import write_byte_tokenizer

from qoq_jax.text import IncrementalDetokenizer, StopStrings, TextRequest


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    d: Path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return PreTrainedTokenizerFast.from_pretrained(str(d))


def test_detokenizer_never_splits_a_utf8_character(tok):
    text = "naïve café — 東京 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)  # one id per byte
    assert len(ids) == len(text.encode("utf-8"))
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text
    # the 4 bytes of the emoji give '' three times, then the whole character
    start = len("naïve café — 東京 ".encode("utf-8"))
    assert pieces[start:start + 4] == ["", "", "", "🙂"]


def test_detokenizer_skips_special_tokens_and_flushes_a_dangling_byte(tok):
    d = IncrementalDetokenizer(tok)
    ids = tok.encode("ok", add_special_tokens=False) + [tok.convert_tokens_to_ids("</s>")]
    assert "".join(d.push(i) for i in ids) == "ok"
    d = IncrementalDetokenizer(tok)
    assert d.push(0xE6) == ""  # first byte of a 3-byte character, never completed
    assert d.flush() == "\ufffd"


def test_stop_strings_hold_back_partial_matches():
    s = StopStrings(["###", "END"])
    out = [s.push(t) for t in ["Hello ", "wor", "ld#", "#", " more", " E", "N", "D tail"]]
    # '#', '##' are held until they turn out not to be '###'; 'EN' until it is 'END'
    assert "".join(out) == "Hello world## more "
    assert s.stopped
    assert s.push("anything") == "" and s.flush() == ""


def test_stop_string_across_tokens_ends_the_request(tok):
    t = TextRequest(tok, [], stop=["\n\n"])
    ids = tok.encode("first line\n\nsecond", add_special_tokens=False)
    delta, used = t.feed(ids)
    assert t.stopped and delta == "first line" and t.text == "first line"
    assert used == len("first line\n\n")  # tokens after the stop are dropped
    assert t.token_ids == ids[:used]


def test_no_stop_string_keeps_everything(tok):
    t = TextRequest(tok, [], stop=["zzz"])
    ids = tok.encode("abc zz", add_special_tokens=False)
    delta, used = t.feed(ids)
    assert delta == "abc " and used == len(ids)  # 'zz' is held back: it could become 'zzz'
    assert t.finish() == "zz" and t.text == "abc zz"


# ----------------------------------------------------------------------------------------------
# qoq_jax.session: one request's events -> text deltas (shared by LLM.stream and the server)

class _Front:
    """An engine front that records what the session asks of it."""

    def __init__(self):
        self.submitted, self.cancelled, self.released = [], [], []

    def submit(self, ids, params, callback):
        self.submitted.append((list(ids), params, callback))
        return 7

    def cancel(self, rid, reason="abort"):
        self.cancelled.append((rid, reason))

    def release_when_done(self, rid):
        self.released.append(rid)


def _event(ids, finished=False, reason=None, lps=None, error=None):
    from qoq_jax.engine import TokenEvent

    return TokenEvent(7, list(ids), lps, finished=finished, finish_reason=reason, error=error)


def _params(logprobs=None):
    from qoq_jax.sampling import SamplingParams

    return SamplingParams(max_new_tokens=64, logprobs=logprobs)


def test_session_cancels_the_request_on_a_stop_string(tok):
    from qoq_jax.session import Session

    front = _Front()
    s = Session(front, tok, [1, 2], _params(logprobs=0), stop=["\n\n"])
    ids = tok.encode("first line\n\nsecond", add_special_tokens=False)
    lps = [{"token": t, "logprob": -0.5, "top": []} for t in ids]
    d = s.feed(_event(ids, lps=lps))
    n_used = len("first line\n\n")
    assert d.text == "first line" and d.finish_reason == "stop" and s.done
    assert front.cancelled == [(7, "stop")]
    assert s.token_ids == ids[:n_used] and s.logprobs == lps[:n_used] == d.logprobs
    assert s.feed(_event([], finished=True, reason="stop")) is None  # the cancel's event
    s.close()
    s.close()
    assert front.cancelled == [(7, "stop")] and front.released == [7]  # no second cancel


def test_session_closed_early_cancels_and_keeps_finish_and_error(tok):
    from qoq_jax.session import Session

    front = _Front()
    s = Session(front, tok, [], _params())
    ab = tok.encode("ab", add_special_tokens=False)
    assert s.feed(_event(ab)).text == "ab" and s.logprobs is None
    s.close()  # the consumer went away before the end
    assert front.cancelled == [(7, "abort")] and front.released == [7]

    s = Session(front, tok, [], _params())
    d = s.feed(_event(ab, finished=True, reason="length"))
    assert (d.text, d.finish_reason, s.finish_reason) == ("ab", "length", "length")
    s = Session(front, tok, [], _params())
    d = s.feed(_event([], finished=True, reason="error", error="non-finite logits"))
    assert d.finish_reason == s.finish_reason == "error" and s.error == "non-finite logits"


def test_async_session_takes_events_from_another_thread(tok):
    import asyncio
    import threading

    from qoq_jax.session import AsyncSession, GenerationError

    async def run(events):
        front = _Front()
        s = AsyncSession(front, tok, [], _params(), stop=["!"])
        callback = front.submitted[0][2]
        threading.Thread(target=lambda: [callback(ev) for ev in events]).start()
        try:
            return [d async for d in s.deltas(poll_s=0.05)], s, front
        finally:
            s.close()

    hi = tok.encode("hi! there", add_special_tokens=False)
    deltas, s, front = asyncio.run(run([_event(hi[:1]), _event(hi[1:])]))
    assert "".join(d.text for d in deltas) == "hi" and deltas[-1].finish_reason == "stop"
    assert front.cancelled == [(7, "stop")]
    with pytest.raises(GenerationError, match="boom"):
        asyncio.run(run([_event([], finished=True, reason="error", error="boom")]))
