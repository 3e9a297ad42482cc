"""The consult tag parser, the instructions and chat delta pieces."""

from __future__ import annotations

import pytest

from agents.base import AGENT_ROLES
from aipo_env.protocols import consult as protocol
from aipo_env.protocols.chat import chat_feedback_pieces

NAMES = ("verify", "knowledge", "reasoning")


def test_parses_last_of_repeated_consults() -> None:
    text = '<consult agent="verify">a?</consult> more <consult agent="knowledge"> b? </consult>'
    parsed = protocol.parse_last_consult(text, NAMES)
    assert parsed.ok and parsed.target == "knowledge" and parsed.content == "b?"


def test_nested_open_tags_use_the_innermost() -> None:
    text = '<consult agent="verify">outer <consult agent=reasoning>inner?</consult>'
    parsed = protocol.parse_last_consult(text, NAMES)
    assert (parsed.target, parsed.content, parsed.error) == ("reasoning", "inner?", None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("no tags at all", "no closing"),
        ("question?</consult>", "without an opening"),
        ("<consult>what?</consult>", "missing agent"),
        ('<consult agent="verfy">x</consult>', "unknown agent 'verfy'; expected one of verify"),
        ('<consult agent="verify">   </consult>', "empty question"),
    ],
)
def test_malformed_consults_give_an_error(text: str, fragment: str) -> None:
    parsed = protocol.parse_last_consult(text, NAMES)
    assert not parsed.ok
    assert fragment in parsed.error


def test_count_consults_counts_only_complete_tags() -> None:
    text = '<consult agent="a">x</consult> <consult agent="b">y</consult> <consult agent="c">z'
    assert protocol.count_consults(text) == 2


def test_instructions_name_each_agent_role_and_budget() -> None:
    text = protocol.consult_instructions(NAMES, 2)
    for name in NAMES:
        assert f"- {name}: {AGENT_ROLES[name]}" in text
    assert "at most 2 times" in text
    assert "<consult agent=" in text


def test_chat_pieces_split_template_markup_from_content(tokenizer) -> None:
    pieces = chat_feedback_pieces(tokenizer, "hello there")
    assert pieces.content == "hello there"
    assert pieces.before == "<|im_end|>\n<|im_start|>user\n"
    assert pieces.after == "<|im_end|>\n<|im_start|>assistant\n"
