"""Agents' prompts turn a Qwen3-style template's thinking off unless their template asks for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from agents import ConsultRequest, VerifyAgent, load_template
from policies.base import Generation, Generator, SamplingParams

#: The generation-prompt part of Qwen3's chat template, verbatim in logic.
QWEN3_LIKE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
EMPTY_THINK = "<think>\n\n</think>\n\n"


class PromptOnly(Generator):
    """A generator whose tokenizer is all these tests need (they only render prompts)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_context(self) -> int:
        return 4096

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        raise AssertionError("not called")


@pytest.fixture
def qwen3_style(default_model_dir: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)  # a copy: the template is changed
    tok.chat_template = QWEN3_LIKE
    return tok


def _prompt(agent: VerifyAgent) -> str:
    static, ids = agent.render(ConsultRequest(agent="verify", question="Is 2+2=4?"))
    assert ids[: len(static)] == static  # the shared prefix is kept
    return agent.generator.tokenizer.decode(ids)


def test_a_packaged_agent_prompt_ends_with_an_empty_think_block(qwen3_style) -> None:
    assert load_template("verify").chat_template_kwargs == {"enable_thinking": False}
    prompt = _prompt(VerifyAgent(PromptOnly(qwen3_style)))
    assert prompt.endswith("<|im_start|>assistant\n" + EMPTY_THINK)


def test_a_template_that_asks_for_thinking_gets_it(qwen3_style) -> None:
    thinking = load_template("verify").model_copy(
        update={"chat_template_kwargs": {"enable_thinking": True}}
    )
    prompt = _prompt(VerifyAgent(PromptOnly(qwen3_style), template=thinking))
    assert prompt.endswith("<|im_start|>assistant\n") and EMPTY_THINK not in prompt


def test_a_template_without_the_variable_is_unchanged(tokenizer) -> None:
    from agents import render_prompt

    plain = render_prompt(tokenizer, "RULES", "question")
    assert render_prompt(tokenizer, "RULES", "question", {"enable_thinking": False}) == plain
