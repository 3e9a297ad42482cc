"""The actions :meth:`ConsultEnv.astep <aipo_env.env.ConsultEnv.astep>` accepts, in one shape."""

from __future__ import annotations

from typing import Any

import numpy as np


def normalize_action(action: Any) -> tuple[list[int], list[float | None], str, int]:
    """(ids, logprobs, generation finish reason, cached tokens) from any accepted action."""
    cached = 0
    if hasattr(action, "token_ids") and hasattr(action, "logprobs"):
        ids, lps = list(action.token_ids), list(action.logprobs)
        finish, cached = (
            getattr(action, "finish_reason", "stop"),
            getattr(action, "cached_tokens", 0),
        )
    elif isinstance(action, dict):
        ids = list(action["token_ids"])
        lps = list(action.get("logprobs") or [None] * len(ids))
        finish, cached = action.get("finish_reason", "stop"), action.get("cached_tokens", 0)
    elif isinstance(action, tuple) and len(action) in (2, 3) and not np.isscalar(action[0]):
        ids, lps = (
            list(action[0]),
            list(action[1] if action[1] is not None else [None] * len(action[0])),
        )
        finish = action[2] if len(action) == 3 else "stop"
    else:  # a bare sequence of ids (gymnasium's action space): log-probs unknown
        ids = [int(i) for i in np.asarray(action).reshape(-1)]
        lps, finish = [None] * len(ids), "stop"
    if len(lps) != len(ids):
        raise ValueError(
            f"action has {len(lps)} log-probs for {len(ids)} token ids; they must align"
        )
    return (
        [int(i) for i in ids],
        [None if lp is None else float(lp) for lp in lps],
        str(finish),
        int(cached),
    )
