"""Terminal rendering of trajectories: text coloured by source, masks, IS coefficients, outcome.

Each run of tokens with one source (prompt, policy, an agent, env markup) becomes a
labelled block: its token count, how many of its tokens the loss trains, and, when
the trajectory carries per-token importance-sampling coefficients (a list under
``metadata["is_weights"]`` aligned with ``token_ids``, as a trainer may record), their
mean over the block. Text is decoded only here, for people; without a tokenizer the
blocks show token counts only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aipo_env import sources
from aipo_env.trajectory import Trajectory
from policies import loading

logger = logging.getLogger(__name__)

RESET = "\x1b[0m"
BOLD = "\x1b[1m"
#: ANSI SGR colour codes per source; agents not listed take one from AGENT_PALETTE.
SOURCE_COLORS: dict[str, str] = {
    sources.PROMPT: "\x1b[90m",  # grey: the given context
    sources.POLICY: "\x1b[32m",  # green: what the policy wrote
    sources.ENV: "\x1b[33m",  # yellow: markup and error feedback
    sources.agent("verify"): "\x1b[35m",  # magenta
    sources.agent("knowledge"): "\x1b[36m",  # cyan
    sources.agent("reasoning"): "\x1b[34m",  # blue
}
AGENT_PALETTE: tuple[str, ...] = ("\x1b[95m", "\x1b[96m", "\x1b[94m", "\x1b[91m", "\x1b[93m")
#: Where a trajectory may carry per-token IS coefficients.
IS_WEIGHTS_KEY = "is_weights"


def source_color(source: str) -> str:
    """The ANSI colour of a source label (stable for agents outside the default three)."""
    if source in SOURCE_COLORS:
        return SOURCE_COLORS[source]
    # A stable choice (not hash(), which is salted per process) for custom agents.
    return AGENT_PALETTE[sum(source.encode()) % len(AGENT_PALETTE)]


def is_correct(trajectory: Trajectory) -> bool:
    """The verifier's verdict, or a positive reward when no verifier result was stored."""
    if trajectory.verifier is not None:
        return trajectory.verifier.correct
    return trajectory.reward > 0


@dataclass
class ShowFilter:
    """Which trajectories to show; every set criterion must hold."""

    reward_min: float | None = None
    reward_max: float | None = None
    tasks: Sequence[str] = ()
    finish_reasons: Sequence[str] = ()
    correct: bool | None = None
    ids: Sequence[str] = field(default_factory=tuple)

    def matches(self, t: Trajectory) -> bool:
        """Whether ``t`` passes every set criterion."""
        if self.reward_min is not None and t.reward < self.reward_min:
            return False
        if self.reward_max is not None and t.reward > self.reward_max:
            return False
        if self.tasks and t.task not in self.tasks:
            return False
        if self.finish_reasons and not any(
            # "error" selects every error:<kind>
            t.finish_reason == r or t.finish_reason.startswith(f"{r}:")
            for r in self.finish_reasons
        ):
            return False
        if self.correct is not None and is_correct(t) != self.correct:
            return False
        if self.ids and t.trajectory_id not in self.ids:
            return False
        return True


def select(
    trajectories: Iterable[Trajectory], criteria: ShowFilter, limit: int | None = None
) -> list[Trajectory]:
    """The trajectories matching ``criteria``, in file order, at most ``limit``."""
    out = []
    for t in trajectories:
        if limit is not None and len(out) >= limit:
            break
        if criteria.matches(t):
            out.append(t)
    return out


def _paint(text: str, color: str | None) -> str:
    if not color:
        return text
    # Colour each line on its own so that pagers (less -R) keep it across lines.
    return "\n".join(f"{color}{line}{RESET}" if line else line for line in text.split("\n"))


def _is_weights(t: Trajectory) -> list[float | None] | None:
    weights = t.metadata.get(IS_WEIGHTS_KEY)
    if isinstance(weights, list) and len(weights) == len(t.token_ids):
        return weights
    return None


def render_trajectory(
    t: Trajectory,
    tokenizer: Any | None = None,
    *,
    color: bool = True,
    show_prompt: bool = True,
) -> str:
    """A terminal view of one trajectory: a header, then one block per source run."""
    correct = "yes" if is_correct(t) else "no"
    head = (
        f"== {t.trajectory_id}  task={t.task} problem={t.problem_id} sample={t.sample_index} "
        f"mode={t.mode}\n   reward={t.reward:g} correct={correct} finish={t.finish_reason} "
        f"consults={t.consults} attempts={t.consult_attempts} errors={t.consult_errors} "
        f"tokens={len(t.token_ids)} (prompt {t.prompt_len})"
    )
    if t.tokenization_drift:
        head += " TOKENIZATION-DRIFT"
    if t.error:
        head += f"\n   error: {t.error}"
    parts = [f"{BOLD}{head}{RESET}" if color else head]
    weights = _is_weights(t)
    pos = 0
    for source, ids in t.segments():
        start, pos = pos, pos + len(ids)
        if source == sources.PROMPT and not show_prompt:
            parts.append(f"[{source} · {len(ids)} tok · hidden]")
            continue
        trained = sum(t.loss_mask[start:pos])
        label = f"[{source} · {len(ids)} tok · loss mask {trained}/{len(ids)}"
        if weights is not None:
            known = [w for w in weights[start:pos] if w is not None and not math.isnan(w)]
            if known:
                label += f" · IS mean {sum(known) / len(known):.3f}"
        label += "]"
        paint = source_color(source) if color else None
        parts.append(_paint(label, paint))
        if tokenizer is not None:
            parts.append(_paint(tokenizer.decode(ids, skip_special_tokens=False), paint))
    return "\n".join(parts) + "\n"


def summary_line(shown: Sequence[Trajectory], total: int) -> str:
    """Count, mean reward, accuracy and consult rate of the shown trajectories."""
    if not shown:
        return f"0 of {total} trajectories match"
    mean_reward = sum(t.reward for t in shown) / len(shown)
    accuracy = sum(is_correct(t) for t in shown) / len(shown)
    consult_rate = sum(1 for t in shown if t.consult_attempts or t.consults) / len(shown)
    return (
        f"{len(shown)} of {total} trajectories  mean reward {mean_reward:.3f}  "
        f"correct {accuracy:.3f}  consult rate {consult_rate:.3f}"
    )


def load_tokenizer(spec: str | None) -> Any | None:
    """The tokenizer named by ``spec`` ("default", a model dir or HF id), or None.

    ``None`` or ``"none"`` means no decoding. A tokenizer that cannot be loaded is
    reported and replaced by None, so the view still shows token counts.
    """
    if spec is None or spec.lower() == "none":
        return None
    try:
        return loading.load_tokenizer(spec)
    except Exception as exc:  # any loading failure degrades to counts, never aborts the view
        logger.warning("cannot load tokenizer '%s' (%s); showing token counts only", spec, exc)
        return None
