"""Supervised demonstrations of consulting, from the policy's own rollouts (the warm-up's data).

:func:`select_demonstrations` keeps the episodes that ended correct (rejection sampling):
an episode the env opened with a consult becomes one in which the policy wrote that
consult (:func:`demonstration` relabels the tag's tokens as trained), an episode solved
alone stays as it is, and :func:`spliced` continues a consult episode that ended wrong
with the policy's own correct solution of the same problem, or (``warmup.reference``,
for tasks with reference steps) with the reference solution written out
(:func:`reference_solution`); :func:`without_consult` takes
the consult out of a demonstration (a no-consult baseline's warm-up). :func:`fit_demonstrations`
fits them by cross-entropy on the trained tokens; :func:`consult_usage` measures what the
policy then writes. The stage that runs them is :mod:`trainers.warmup`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from aipo_env import sources
from aipo_env.trajectory import Trajectory

if TYPE_CHECKING:
    from tasks.base import SolutionStep
    from trainers.warmup_config import WarmupSection

__all__ = [
    "MALFORMED_KINDS",
    "Demonstration",
    "consult_usage",
    "demonstration",
    "fit_demonstrations",
    "reference_solution",
    "select_demonstrations",
    "spliced",
    "without_consult",
]

#: Consult errors that mean the policy's tag itself was wrong (not the agent's failure).
MALFORMED_KINDS = frozenset({"malformed", "unknown_agent", "empty_question"})


@dataclass(frozen=True)
class Demonstration:
    """One supervised example: ids and the positions the loss fits.

    ``response_start``: where the policy's own solution begins in ``token_ids`` (after
    the prompt, and after the consult and its reply when ``consulted``);
    :func:`without_consult` keeps what follows it.
    """

    trajectory_id: str
    token_ids: list[int]
    train_mask: list[int]
    consulted: bool
    problem_id: str = ""
    response_start: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(self.train_mask)


# -- select ---------------------------------------------------------------------------


def _correct(t: Trajectory) -> bool:
    if t.finish_reason.startswith("error:") or t.tokenization_drift:
        return False
    if t.verifier is not None:
        return bool(t.verifier.correct)
    return t.reward > 0


def _opening_request(t: Trajectory) -> tuple[int, int] | None:
    """The span of the env-written opening consult tag, if the episode opened with one."""
    if not t.turns or t.turns[0].generation_finish != "auto_consult":
        return None
    first = t.turns[0]
    if first.feedback_start is None or first.consult is None or first.consult.error is not None:
        return None
    start = first.policy_end
    if not all(s == sources.ENV for s in t.source[start : first.feedback_start]):
        return None
    return start, first.feedback_start


def demonstration(t: Trajectory, *, train_agent_tokens: bool = False) -> Demonstration:
    """``t`` as a supervised example: policy tokens fitted, an opening request relabelled as policy.

    Raises ValueError when ``t`` opened with a consult whose tag cannot be relabelled
    (unanswered, or not env text).
    """
    span = _opening_request(t)
    if t.turns and t.turns[0].generation_finish == "auto_consult" and span is None:
        raise ValueError(f"trajectory {t.trajectory_id}: its opening consult was not answered")
    mask = []
    for i, source in enumerate(t.source):
        if span is not None and span[0] <= i < span[1]:
            mask.append(1)  # the consult tag, now the policy's own words
        elif source == sources.POLICY:
            mask.append(1)
        elif train_agent_tokens and source.startswith(sources.AGENT_PREFIX):
            mask.append(1)
        else:
            mask.append(0)
    start = t.prompt_len if span is None else t.turns[0].feedback_end
    assert start is not None  # an answered opening request has its reply injected
    return Demonstration(
        t.trajectory_id,
        list(t.token_ids),
        mask,
        consulted=span is not None,
        problem_id=t.problem_id,
        response_start=start,
    )


def without_consult(demo: Demonstration, prompt_ids: Sequence[int]) -> Demonstration:
    """``demo`` with its consult taken out: ``prompt_ids``, then the policy's own solution.

    ``prompt_ids`` is the problem's prompt as a policy that may not consult sees it (in
    independent mode: no consult instructions). The consult tag and the agent's reply
    are dropped; the solution's tokens and which of them are fitted stay as they were.
    The warm-up of a no-consult baseline fits these (``warmup.consults: false``), so
    that it learns from the same solutions as the consulting arms.
    """
    tail = demo.token_ids[demo.response_start :]
    return Demonstration(
        demo.trajectory_id,
        list(prompt_ids) + tail,
        [0] * len(prompt_ids) + demo.train_mask[demo.response_start :],
        consulted=False,
        problem_id=demo.problem_id,
        response_start=len(prompt_ids),
    )


def _policy_text(t: Trajectory, tokenizer: Any) -> str:
    ids = [i for i, s in zip(t.token_ids, t.source, strict=True) if s == sources.POLICY]
    return tokenizer.decode(ids, skip_special_tokens=True)


def spliced(
    opened: Trajectory, solved: Trajectory, *, train_agent_tokens: bool = False
) -> Demonstration:
    """``opened``'s prompt, consult tag (relabelled) and reply, then ``solved``'s whole response.

    For a problem the policy solved alone but not after the consult: the demonstration
    consults, then writes the solution it found alone. Both episodes must share the
    prompt ids (same problem, both allowed to consult).
    """
    if opened.token_ids[: opened.prompt_len] != solved.token_ids[: solved.prompt_len]:
        raise ValueError(
            f"cannot splice {solved.trajectory_id} after {opened.trajectory_id}: their prompts differ"
        )
    return _continued(
        opened,
        f"{opened.trajectory_id}+{solved.trajectory_id}",
        solved.token_ids[solved.prompt_len :],
        [int(s == sources.POLICY) for s in solved.source[solved.prompt_len :]],
        train_agent_tokens=train_agent_tokens,
    )


def _continued(
    opened: Trajectory,
    trajectory_id: str,
    tail: Sequence[int],
    tail_mask: Sequence[int],
    *,
    train_agent_tokens: bool,
) -> Demonstration:
    """``opened``'s prompt, consult tag (relabelled) and reply, then ``tail`` fitted at ``tail_mask``."""
    head = demonstration(opened, train_agent_tokens=train_agent_tokens)
    cut = opened.turns[0].feedback_end
    assert cut is not None  # an answered opening request has its reply injected
    return Demonstration(
        trajectory_id,
        head.token_ids[:cut] + list(tail),
        head.train_mask[:cut] + list(tail_mask),
        consulted=True,
        problem_id=opened.problem_id,
        response_start=cut,
    )


def reference_solution(steps: Sequence[SolutionStep]) -> str:
    """A task's reference steps as the text of a solution: one line a step, then the boxed answer.

    ``legs of the spider kind: 2 * 8 = 16`` ... ``The answer is \\boxed{22}.``
    """
    if not steps:
        raise ValueError("a reference solution needs at least one step")
    lines = [f"{step.action} = {step.result}" for step in steps]
    return "\n".join(lines) + f"\nThe answer is \\boxed{{{steps[-1].result}}}."


def _with_reference(
    opened: Trajectory, solution_ids: Sequence[int], *, train_agent_tokens: bool = False
) -> Demonstration:
    """``opened``'s prompt, consult tag (relabelled) and reply, then ``solution_ids`` (all fitted)."""
    return _continued(
        opened,
        f"{opened.trajectory_id}+reference",
        solution_ids,
        [1] * len(solution_ids),
        train_agent_tokens=train_agent_tokens,
    )


def select_demonstrations(
    trajectories: Sequence[Trajectory],
    tokenizer: Any,
    section: WarmupSection,
    seed: int,
    reference: Callable[[str], Sequence[int]] | None = None,
) -> tuple[list[Demonstration], dict[str, int]]:
    """The correct episodes as demonstrations, mixed at ``consult_share``; and the counts.

    A consult episode is kept when it opened with an answered consult and ended
    correct; a no-consult episode when it ended correct with no consult attempt and no
    ``<consult`` text from the policy. When correct consult episodes are fewer than the
    mix asks for, ``warmup.splice`` fills in with :func:`spliced` demonstrations: a
    consult episode that ended wrong, continued with a correct solution the policy
    wrote alone for the same problem (real ones are always taken first). When still
    short and ``reference`` is given (``problem_id -> the reference solution's token
    ids``, ending with EOS), the remaining wrong consult episodes are continued with it.
    """
    with_consult: list[Trajectory] = []
    wrong_consult: list[Trajectory] = []
    alone: list[Trajectory] = []
    opened = 0
    for t in trajectories:
        if t.turns and t.turns[0].generation_finish == "auto_consult":
            opened += 1
            if _opening_request(t) is None or t.consult_attempts:
                continue
            (with_consult if _correct(t) else wrong_consult).append(t)
        elif (
            _correct(t)
            and t.consult_attempts == 0
            and "<consult" not in _policy_text(t, tokenizer).lower()
        ):
            alone.append(t)
    rng = random.Random(seed)
    agent = section.train_agent_tokens
    consult_demos = [demonstration(t, train_agent_tokens=agent) for t in with_consult]
    rng.shuffle(consult_demos)
    splices: list[Demonstration] = []
    solved: dict[str, list[Trajectory]] = {}  # problems the policy solved alone: spliced
    if section.splice:
        for t in alone:
            solved.setdefault(t.problem_id, []).append(t)
        for t in wrong_consult:
            if t.problem_id in solved:
                splices.append(
                    spliced(t, rng.choice(solved[t.problem_id]), train_agent_tokens=agent)
                )
        rng.shuffle(splices)
    referenced: list[Demonstration] = []
    if reference is not None:
        referenced = [
            _with_reference(t, reference(t.problem_id), train_agent_tokens=agent)
            for t in wrong_consult
            if t.problem_id not in solved
        ]
        rng.shuffle(referenced)
    pool = consult_demos + splices + referenced
    alone_demos = [demonstration(t) for t in alone]
    share = section.consult_share
    # As many as possible at the requested mix: the scarcer kind sets the total.
    if share <= 0:
        total = len(alone_demos)
    elif share >= 1:
        total = len(pool)
    else:
        total = min(math.floor(len(pool) / share), math.floor(len(alone_demos) / (1 - share)))
    n_consult = round(total * share)
    chosen = pool[:n_consult] + rng.sample(alone_demos, total - n_consult)
    rng.shuffle(chosen)
    counts = {
        "episodes": len(trajectories),
        "consult_episodes": opened,
        "correct_consult": len(with_consult),
        "correct_alone": len(alone),
        "spliced": min(len(splices), max(0, n_consult - len(consult_demos))),
        "referenced": max(0, n_consult - len(consult_demos) - len(splices)),
    }
    return chosen, counts


# -- fit ------------------------------------------------------------------------------


def _pad(demos: Sequence[Demonstration], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(d.token_ids) for d in demos)
    ids = torch.full((len(demos), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(demos), width), dtype=torch.long)
    mask = torch.zeros((len(demos), width), dtype=torch.float32)
    for row, d in enumerate(demos):
        n = len(d.token_ids)
        ids[row, :n] = torch.tensor(d.token_ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(d.train_mask, dtype=torch.float32)
    return ids, attention, mask


def fit_demonstrations(
    model: torch.nn.Module,
    demos: Sequence[Demonstration],
    *,
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_grad_norm: float = 1.0,
    checkpoint_layers: bool = False,
) -> list[float]:
    """Fit ``demos`` by cross-entropy on their trained tokens; the mean loss of each epoch.

    ``checkpoint_layers``: recompute each decoder layer in backward instead of keeping its
    activations (:func:`trainers.logprobs.checkpointed_layers`); the same gradient. The
    rows stay padded: they share no prompt, and one packed sequence of a whole batch of
    long rows costs more attention on a CPU than its padding (trainers/packing.py).
    """
    from trainers.logprobs import token_logprobs
    from trainers.optim import fused_adamw_supported

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    fused = fused_adamw_supported(params)  # no parameter-sized temporaries at the step
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
    rng = random.Random(seed)
    order = list(range(len(demos)))
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(epochs):
            rng.shuffle(order)
            total, tokens = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = [demos[i] for i in order[start : start + batch_size]]
                ids, attention, mask = (x.to(device) for x in _pad(batch, pad_id))
                # Only the fitted tokens' log-probs: the lm_head runs on those rows alone.
                logprobs, _ = token_logprobs(
                    model,
                    ids,
                    attention,
                    positions=mask > 0,
                    checkpoint_layers=checkpoint_layers,
                )
                n = mask.sum()
                if n == 0:
                    continue
                loss = -(logprobs * mask).sum() / n
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                total += float(loss.detach()) * int(n)
                tokens += int(n)
            losses.append(total / max(tokens, 1))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return losses


# -- check ----------------------------------------------------------------------------


def consult_usage(trajectories: Sequence[Trajectory], tokenizer: Any) -> dict[str, float]:
    """Shares of episodes allowed to consult with a well-formed / malformed consult of the policy's own.

    Well-formed: the policy wrote a tag the env parsed (an answered consult, or one
    refused only for the budget or a failing agent). Malformed: the policy wrote
    ``<consult`` and every tag was unparseable, named no known agent or asked nothing,
    or was never closed. An episode with an opening request written by the env counts
    for neither.
    """
    from trainers.summary import consult_error_kind

    allowed = [t for t in trajectories if t.allow_consult]
    good = bad = 0
    for t in allowed:
        records = [
            turn.consult
            for turn in t.turns
            if turn.consult is not None and turn.generation_finish != "auto_consult"
        ]
        kinds = [consult_error_kind(r.error) if r.error else None for r in records]
        if any(k not in MALFORMED_KINDS for k in kinds):
            good += 1
        elif kinds or "<consult" in _policy_text(t, tokenizer).lower():
            bad += 1
    n = max(len(allowed), 1)
    return {
        "episodes": float(len(allowed)),
        "consult_written_rate": good / n,
        "malformed_rate": bad / n,
        "accuracy": sum(_correct(t) for t in allowed) / n,
    }
