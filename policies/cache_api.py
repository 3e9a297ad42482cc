"""Which keyword a transformers forward takes its keys/values cache by, across versions.

transformers 5.24 renamed the forward's ``past_key_values`` keyword (and the output's
field) to ``cache``; the old keyword warns there and goes in 5.40. The stack this
project installs beside pins older releases (OpenRLHF 0.11.2: 5.15; vLLM's CPU build:
5.16 to 5.19), so the keyword is read from the model's own ``forward`` signature
(``deprecate_kwarg`` keeps the wrapped signature), falling back to the installed version
for a forward that takes ``**kwargs`` only.

The cache internals the embedded generator relies on (``DynamicLayer.keys``/``values``/
``is_initialized``, ``DynamicCache.layers``, ``Cache.update``) are the same from 5.15 to
5.25; ``tests/test_policies_cache_api.py`` checks them on whatever is installed.
"""

from __future__ import annotations

import functools
import inspect

import torch

#: The first transformers release whose forward takes ``cache=``.
CACHE_KEYWORD_SINCE = (5, 24)


def _installed_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.lru_cache(maxsize=64)
def _keyword_of(forward_owner: type) -> str:
    try:
        params = inspect.signature(forward_owner.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return "cache" if _installed_version() >= CACHE_KEYWORD_SINCE else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model``'s forward takes its cache by."""
    return _keyword_of(type(model))


def returned_cache(output: object) -> object:
    """The cache a forward returned, under the field name of either API."""
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)
