"""Whether an agent shares the policy's tokenizer: a digest of each vocabulary, compared."""

from __future__ import annotations

import hashlib
from typing import Any

_FINGERPRINTS: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of ``tokenizer``'s vocabulary (every token and its id)."""
    cached = _FINGERPRINTS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    fingerprint = digest.hexdigest()
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, fingerprint)
    return fingerprint


def tokenizers_match(a: Any, b: Any) -> bool:
    """Whether two tokenizers map the same tokens to the same ids (names are not compared)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
