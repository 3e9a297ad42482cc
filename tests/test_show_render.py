"""``aipo show``: colours by source, masks and IS, filters, summary, bad input."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aipo.commands import show as show_cli
from aipo_env.show import (
    RESET,
    SOURCE_COLORS,
    ShowFilter,
    render_trajectory,
    select,
    source_color,
    summary_line,
)
from aipo_env.trajectory import Trajectory, write_jsonl
from tasks.base import RewardResult

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _trajectory(
    tid: str,
    *,
    reward: float = 1.0,
    task: str = "math",
    finish: str = "eos",
    correct: bool | None = None,
    with_agent: bool = True,
    is_weights: bool = False,
) -> Trajectory:
    segments = [("prompt", [10, 11, 12], 0), ("policy", [20, 21], 1)]
    if with_agent:
        segments += [("env", [30], 0), ("agent:knowledge", [40, 41, 42], 0), ("env", [31], 0)]
    segments += [("policy", [22, 23], 1)]
    ids, src, mask = [], [], []
    for source, seg, m in segments:
        ids += seg
        src += [source] * len(seg)
        mask += [m] * len(seg)
    verdict = reward > 0 if correct is None else correct
    metadata = {}
    if is_weights:
        metadata["is_weights"] = (
            [None] * 3
            + [1.0, 1.0]
            + ([None, 0.5, 0.25, 0.75, None] if with_agent else [])
            + [1.0, 1.0]
        )
    return Trajectory(
        trajectory_id=tid,
        problem_id=tid.split("-")[0],
        task=task,
        group_id=tid.split("-")[0],
        token_ids=ids,
        prompt_len=3,
        source=src,
        loss_mask=mask,
        behavior_logprobs=[None] * len(ids),
        reward=reward,
        verifier=RewardResult(score=reward, correct=verdict),
        finish_reason=finish,
        consults=1 if with_agent else 0,
        consult_attempts=1 if with_agent else 0,
        metadata=metadata,
    )


class _IdTokenizer:
    """Decodes each id as 'w<id>' so the tests can find every segment's text."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids)


def test_render_colours_each_source() -> None:
    text = render_trajectory(_trajectory("p1-0"), _IdTokenizer(), color=True)
    policy, agent = SOURCE_COLORS["policy"], SOURCE_COLORS["agent:knowledge"]
    assert f"{SOURCE_COLORS['prompt']}w10 w11 w12{RESET}" in text
    assert f"{policy}w20 w21{RESET}" in text
    assert f"{SOURCE_COLORS['env']}w30{RESET}" in text
    assert f"{agent}w40 w41 w42{RESET}" in text
    assert f"{policy}w22 w23{RESET}" in text
    assert f"{agent}[agent:knowledge · 3 tok · loss mask 0/3]{RESET}" in text
    assert f"{policy}[policy · 2 tok · loss mask 2/2]{RESET}" in text
    assert "reward=1 correct=yes finish=eos" in text
    # Five distinct colours for five sources, none shared.
    assert len(set(SOURCE_COLORS.values())) == len(SOURCE_COLORS)


def test_render_without_colour_or_tokenizer() -> None:
    plain = render_trajectory(_trajectory("p1-0"), None, color=False)
    assert not ANSI.search(plain)
    assert "[prompt · 3 tok · loss mask 0/3]" in plain
    assert "w40" not in plain  # no tokenizer: counts only
    hidden = render_trajectory(_trajectory("p1-0"), _IdTokenizer(), color=False, show_prompt=False)
    assert "w10" not in hidden and "[prompt · 3 tok · hidden]" in hidden and "w20 w21" in hidden


def test_render_is_coefficients_per_segment() -> None:
    text = render_trajectory(_trajectory("p1-0", is_weights=True), None, color=False)
    assert "[agent:knowledge · 3 tok · loss mask 0/3 · IS mean 0.500]" in text
    assert "[policy · 2 tok · loss mask 2/2 · IS mean 1.000]" in text
    assert "[env · 1 tok · loss mask 0/1]" in text


#: Agents outside SOURCE_COLORS: with five palette colours, a salted hash() would move
#: at least one of them between the two hash seeds below.
CUSTOM_AGENTS = [f"agent:{name}" for name in ("critic", "planner", "judge", "coder", "tutor")]


def _colours_under_hash_seed(seed: str) -> list[str]:
    """The custom agents' colours computed by a fresh interpreter with ``PYTHONHASHSEED=seed``."""
    code = (
        "import json, sys; from aipo_env.show import source_color; "
        "print(json.dumps([source_color(s) for s in sys.argv[1:]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *CUSTOM_AGENTS],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONHASHSEED": seed},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_custom_agent_colour_is_the_same_in_every_process() -> None:
    here = [source_color(s) for s in CUSTOM_AGENTS]
    assert all(c.startswith("\x1b[") and c not in SOURCE_COLORS.values() for c in here)
    assert _colours_under_hash_seed("1") == here
    assert _colours_under_hash_seed("2") == here


def _set() -> list[Trajectory]:
    return [
        _trajectory("a-0", reward=1.0, task="math"),
        _trajectory("a-1", reward=0.0, task="math", finish="length", with_agent=False),
        _trajectory("b-0", reward=0.5, task="gsm", correct=False),
        _trajectory("b-1", reward=0.0, task="gsm", finish="error:generation", with_agent=False),
    ]


@pytest.mark.parametrize(
    ("criteria", "limit", "expected"),
    [
        (ShowFilter(), None, ["a-0", "a-1", "b-0", "b-1"]),
        (ShowFilter(reward_min=0.5), None, ["a-0", "b-0"]),
        (ShowFilter(reward_max=0.4), None, ["a-1", "b-1"]),
        (ShowFilter(tasks=("gsm",)), None, ["b-0", "b-1"]),
        (ShowFilter(finish_reasons=("length",)), None, ["a-1"]),
        (ShowFilter(finish_reasons=("error",)), None, ["b-1"]),
        (ShowFilter(correct=True), None, ["a-0"]),
        (ShowFilter(correct=False), None, ["a-1", "b-0", "b-1"]),
        (ShowFilter(ids=("b-0", "a-1")), None, ["a-1", "b-0"]),
        (ShowFilter(correct=False), 2, ["a-1", "b-0"]),
    ],
)
def test_filters_select_the_right_trajectories(criteria, limit, expected) -> None:
    assert [t.trajectory_id for t in select(_set(), criteria, limit)] == expected


def test_summary_line() -> None:
    shown = _set()[:3]
    line = summary_line(shown, 4)
    assert line.startswith("3 of 4 trajectories")
    assert "mean reward 0.500" in line and "correct 0.333" in line
    assert "consult rate 0.667" in line
    assert summary_line([], 4) == "0 of 4 trajectories match"


def _args(file, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    show_cli.add_arguments(parser)
    return parser.parse_args([str(file), "--tokenizer", "none", *extra])


def test_show_cli_filters_and_summarises(tmp_path, capsys) -> None:
    path = tmp_path / "t.jsonl"
    write_jsonl(path, _set())
    assert show_cli.run(_args(path, "--no-color", "--task", "math", "--incorrect")) == 0
    out = capsys.readouterr().out
    assert "== a-1" in out and "== a-0" not in out and "== b-" not in out
    assert not ANSI.search(out)
    assert out.strip().splitlines()[-1].startswith("1 of 4 trajectories")


def test_show_cli_bad_input(tmp_path, capsys) -> None:
    assert show_cli.run(_args(tmp_path / "missing.jsonl")) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "a trajectory"}\n{"x": 1}\n')
    assert show_cli.run(_args(bad)) == 2
    assert "not a trajectories JSONL file" in capsys.readouterr().err


def test_show_decodes_with_the_real_tokenizer(tmp_path, tokenizer, capsys) -> None:
    prompt = tokenizer.encode("What is 2+2?", add_special_tokens=False)
    policy = tokenizer.encode(" The answer is \\boxed{4}.", add_special_tokens=False)
    ids = prompt + policy
    t = Trajectory(
        trajectory_id="x-0",
        problem_id="x",
        task="math",
        group_id="x",
        token_ids=ids,
        prompt_len=len(prompt),
        source=["prompt"] * len(prompt) + ["policy"] * len(policy),
        loss_mask=[0] * len(prompt) + [1] * len(policy),
        behavior_logprobs=[None] * len(ids),
        reward=1.0,
        finish_reason="eos",
    )
    text = render_trajectory(t, tokenizer, color=False)
    assert "What is 2+2?" in text and "The answer is \\boxed{4}." in text
