"""Real text for evaluation and calibration: plain text files or JSON collections of documents.

The defaults come from packages fetched at set-up (qoq_jax.assets): English Wikipedia lead
summaries and the novel "Botchan". Evaluation reads the Wikipedia summaries from the start, in
file order; calibration draws from the second half of the articles only, so the two never share
text (see docs/ACCURACY.md).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_documents(path: str | Path) -> list[str]:
    """A .json file of documents (a list of strings, or of / a mapping to objects with an
    "extract" or "text" field) or any other file as one plain-text document."""
    path = Path(path)
    text = read_text_file(path)
    if path.suffix.lower() != ".json":
        return [text]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, (dict, list)):
        raise ValueError(f"{path}: a JSON file of documents must hold a list or an object, "
                         f"not a {type(data).__name__}")
    items = list(data.values()) if isinstance(data, dict) else data
    docs = []
    for item in items:
        if isinstance(item, str):
            docs.append(item)
        elif isinstance(item, dict) and isinstance(item.get("extract", item.get("text")), str):
            docs.append(item.get("extract", item.get("text")))
        else:
            raise ValueError(f"{path}: documents must be strings or objects with an 'extract' "
                             f"or 'text' field, found {type(item).__name__}")
    return [d for d in docs if d.strip()]


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file; a binary file (not UTF-8, or with NUL bytes) is refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no text file {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file: it is not UTF-8 (byte {e.start} is "
                         f"{data[e.start]:#04x})") from None
    if "\x00" in text:
        raise ValueError(f"{path} is not a text file: it contains NUL bytes")
    # universal newlines, as text-mode reading gives: Botchan (Project Gutenberg) has CRLF line
    # ends, and the perplexities of docs/ACCURACY.md are measured on LF text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def calibration_split(docs: list[str]) -> list[str]:
    """The documents calibration may read: the second half of a multi-document collection,
    disjoint from the windows perplexity reads from the start. A single document (a novel) is
    cut in half the same way, by characters."""
    if len(docs) == 1:
        text = docs[0]
        return [text[len(text) // 2:]]
    return docs[len(docs) // 2:]


def tokenize_joined(tokenizer, docs: list[str], min_tokens: int | None = None) -> list[int]:
    """Token ids of the documents joined by blank lines, no BOS (the reference protocol).

    With min_tokens, only a prefix of the documents that yields comfortably more than that many
    tokens is tokenized (the ids of the joined prefix equal the full text's up to the cut)."""
    if min_tokens is None:
        return list(tokenizer.encode("\n\n".join(docs), add_special_tokens=False))
    take = 64
    while True:
        ids = tokenizer.encode("\n\n".join(docs[:take]), add_special_tokens=False)
        if len(ids) >= min_tokens + 256 or take >= len(docs):
            return list(ids)
        take *= 2
