"""A local BM25 search over a corpus the user provides: the ``search`` tool of ARPO's protocol.

:class:`SearchIndex` ranks passages with BM25 (the ``bm25s`` library: lower-cased word
tokens, English stop words removed, Lucene's BM25 variant). The corpus is a list of
strings or a JSONL file with one ``{"id": ..., "text": ...}`` object per line; the
project ships a tiny one for tests and examples (:func:`packaged_corpus`)::

    index = SearchIndex.from_jsonl(packaged_corpus("tiny"))
    index.search("how many legs does a spider have", k=1)[0].text
    index.reply_text("spider legs")  # numbered passages, as the policy reads them
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bm25s

# bm25s sets its own logger to DEBUG, which would reach any handler the application sets up.
logging.getLogger("bm25s").setLevel(logging.WARNING)

#: The reply to a query that shares no word with any passage.
NO_MATCH = "No passage matches the query."
#: Shown where a reply was cut to its character cap.
CUT_MARK = " [...]"


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: its corpus id, its text and its BM25 score."""

    id: str
    text: str
    score: float


class SearchIndex:
    """A BM25 index over passages; :meth:`search` ranks them for a query.

    ``passages``: the corpus texts; ``ids``: one id each (default: their positions).
    ``k``: passages a reply holds by default; ``max_chars``: the cap of a reply's text.
    """

    def __init__(
        self,
        passages: Sequence[str],
        ids: Sequence[str] | None = None,
        *,
        k: int = 3,
        max_chars: int = 2000,
    ) -> None:
        if isinstance(passages, str):
            raise TypeError("passages must be a sequence of strings, not one string")
        if not passages:
            raise ValueError("the search corpus has no passages")
        if ids is not None and len(ids) != len(passages):
            raise ValueError(f"got {len(ids)} ids for {len(passages)} passages")
        for i, text in enumerate(passages):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"passage {i} is {text!r}; expected non-empty text")
        if k < 1 or max_chars < 1:
            raise ValueError(f"k={k} and max_chars={max_chars} must both be at least 1")
        self.passages = list(passages)
        self.ids = (
            [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(passages))]
        )
        self.k, self.max_chars = k, max_chars
        tokens = _tokenize(self.passages)
        if not any(tokens):
            raise ValueError("the search corpus has no searchable words (only stop words?)")
        self._vocabulary = {token for doc in tokens for token in doc}
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokens, show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], **kwargs: int) -> SearchIndex:
        """The index of a JSONL corpus: one ``{"id": ..., "text": ...}`` object per line.

        Blank lines are skipped; ``id`` (a string or an integer) defaults to the row's
        position. A missing file, an empty corpus or a malformed row (named by its line)
        raises with what was expected.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"search corpus {path} does not exist; expected a JSONL file with one "
                '{"id": ..., "text": ...} object per line'
            )
        texts: list[str] = []
        ids: list[str] = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                passage_id, text = _parse_row(line, f"{path}:{number}")
                ids.append(str(len(texts)) if passage_id is None else passage_id)
                texts.append(text)
        if not texts:
            raise ValueError(f"search corpus {path} has no passages")
        return cls(texts, ids, **kwargs)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int | None = None) -> list[Passage]:
        """The ``k`` best passages for ``query``, best first; those sharing no word with it are left out."""
        k = self.k if k is None else k
        if k < 1:
            raise ValueError(f"k={k}; expected at least 1")
        [words] = _tokenize([query])
        # Words the corpus never uses score nothing; an empty query matches nothing.
        words = [w for w in words if w in self._vocabulary]
        if not words:
            return []
        found, scores = self._bm25.retrieve(
            [words], k=min(k, len(self.passages)), show_progress=False
        )
        return [
            Passage(id=self.ids[int(i)], text=self.passages[int(i)], score=float(s))
            for i, s in zip(found[0], scores[0], strict=True)
            if s > 0
        ]

    def reply_text(self, query: str, k: int | None = None) -> str:
        """The search result as the policy reads it: numbered passages, cut at ``max_chars``."""
        found = self.search(query, k)
        if not found:
            return NO_MATCH
        text = "\n".join(f"[{n}] {p.text.strip()}" for n, p in enumerate(found, start=1))
        if len(text) > self.max_chars:
            text = text[: max(0, self.max_chars - len(CUT_MARK))] + CUT_MARK
        return text


def packaged_corpus(name: str) -> Path:
    """The path of a corpus shipped with the project (``configs/corpora/NAME.jsonl``)."""
    root = importlib.resources.files("configs") / "corpora"
    path = Path(str(root / f"{name}.jsonl"))
    if not path.is_file():
        shipped = sorted(p.name.removesuffix(".jsonl") for p in Path(str(root)).glob("*.jsonl"))
        raise FileNotFoundError(
            f"no packaged corpus {name!r}; expected one of {', '.join(shipped) or '(none)'}"
        )
    return path


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stop words, as strings."""
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def _parse_row(line: str, where: str) -> tuple[str | None, str]:
    """``(id, text)`` of one JSONL row; ``where`` (``path:line``) names it in errors."""
    expected = 'expected a JSON object {"id": ..., "text": "..."}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg}); {expected}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: got a {type(row).__name__}; {expected}")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' is {text!r:.60}; {expected} with non-empty text")
    passage_id = row.get("id")
    if passage_id is not None and (
        isinstance(passage_id, bool) or not isinstance(passage_id, str | int)
    ):
        raise ValueError(f"{where}: 'id' is {passage_id!r:.60}; expected a string or an integer")
    return (None if passage_id is None else str(passage_id)), text
