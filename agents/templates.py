"""Agent prompt templates: a static system part first, then a per-request part.

The static part is rendered first and never changes between requests, so all of an
agent's prompts share its token prefix (SGLang's radix cache, the embedded
generator's pinned prefix). Templates ship as YAML in ``configs/agents/`` and are
read through ``importlib.resources``; a path to a YAML file of the same shape
overrides one.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

#: The variables a per-request template may use.
TEMPLATE_VARIABLES: tuple[str, ...] = ("question", "problem", "transcript", "solution")

_PLACEHOLDER = re.compile(r"\{(" + "|".join(TEMPLATE_VARIABLES) + r")\}")
_TEMPLATE_PACKAGE = "configs.agents"


class PromptTemplate(BaseModel):
    """One agent's prompt: the static system text and the per-request user text."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The template's name (the agent it was written for).")
    system: str = Field(
        description="Static instructions: role, what to answer, reply format and length. Rendered first and never filled."
    )
    user: str = Field(
        description="The per-request message; placeholders {question}, {problem}, {transcript}, {solution}."
    )
    user_with_solution: str | None = Field(
        default=None,
        description="Replaces `user` when the agent may see the reference solution and the problem has one.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"enable_thinking": False},
        description=(
            "Extra variables of the agent tokenizer's chat template when the prompt is rendered. "
            "Default {enable_thinking: false}: a Qwen3 agent answers at once instead of opening a "
            "<think> block that max_reply_tokens would cut off (templates without the variable "
            "ignore it). Set {enable_thinking: true} in a template file to let the agent think."
        ),
    )

    def render_user(self, variables: Mapping[str, str], *, with_solution: bool = False) -> str:
        """Fill the per-request message.

        Only the known placeholders are replaced, so literal braces in a template
        (``\\boxed{}``) and in the filled values need no escaping.
        """
        text = self.user_with_solution if with_solution and self.user_with_solution else self.user
        return _PLACEHOLDER.sub(lambda m: variables.get(m.group(1), ""), text)

    def uses(self, variable: str) -> bool:
        """Whether a per-request message refers to ``{variable}``."""
        token = "{" + variable + "}"
        return token in self.user or token in (self.user_with_solution or "")


def load_template(name_or_path: str) -> PromptTemplate:
    """Load a packaged template by name (``"verify"``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"agent template file {name_or_path!r} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        resource = importlib.resources.files(_TEMPLATE_PACKAGE) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ValueError(
                f"unknown agent template {name_or_path!r}; expected one of "
                f"{', '.join(packaged_templates())} or a path to a YAML file"
            )
        text = resource.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(
            f"agent template {name_or_path!r} must be a YAML mapping with system and user; "
            f"got {type(data).__name__}"
        )
    return PromptTemplate.model_validate(data)


def packaged_templates() -> list[str]:
    """Names of the templates shipped in ``configs/agents/``."""
    root = importlib.resources.files(_TEMPLATE_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))
