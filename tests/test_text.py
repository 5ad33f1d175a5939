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
