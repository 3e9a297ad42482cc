"""A one-tag tool protocol, ``<calc>``, as a contributor adds one (the contributor test, issue 27).

The protocol is the class below; registering it is one ``PROTOCOLS`` entry and one
``TOOL_SERVICES`` entry (``tests/test_tool_protocol_recipe.py`` adds both, as a contributor
would add them to ``aipo_env/protocols/__init__.py`` and ``agents/tool_services.py``).
"""

from __future__ import annotations

import ast
import operator

from agents.base import AgentReply, ConsultRequest
from aipo_env.protocols.one_tag import OneTagToolProtocol


class CalcProtocol(OneTagToolProtocol):
    """``<calc>expression</calc>`` answered by ``<result>value</result>``."""

    name = "calc"
    tag = "calc"
    role = "evaluates an arithmetic expression"
    content = "an expression"
    default_instructions = (
        "To compute, write <calc>expression</calc> and stop; the value comes back as "
        "<result>...</result>. At most {max_consults} calculations."
    )


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


class Calculator:
    """The ``calc`` tool's service: integer ``+``, ``-`` and ``*``."""

    names = ("calc",)

    async def consult(self, request: ConsultRequest) -> AgentReply:
        """The expression's value, or an error naming what it cannot evaluate."""

        def value(node: ast.AST) -> int:
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
                return _OPS[type(node.op)](value(node.left), value(node.right))
            raise ValueError(f"cannot evaluate {ast.dump(node)[:40]}")

        try:
            return AgentReply(
                agent="calc", text=str(value(ast.parse(request.question, mode="eval").body))
            )
        except (SyntaxError, ValueError) as exc:
            return AgentReply(agent="calc", error=str(exc))
