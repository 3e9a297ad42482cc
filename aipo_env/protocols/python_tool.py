"""A Python-tool protocol in the ARPO style: the policy runs code and reads its output.

The policy writes ``<python>code</python>`` and stops; the environment runs the code
(the tool service named ``python``, :class:`agents.tools.PythonRunner`) and injects
``<result>stdout</result>``. Everything else (token-exact trajectories, masks,
budgets, finish reasons, the rollout driver) is :class:`~aipo_env.env.ConsultEnv`'s::

    env = ConsultEnv(task, PythonRunner(), tokenizer, EnvConfig(protocol="python_tool"))
"""

from __future__ import annotations

from aipo_env.protocols.one_tag import OneTagToolProtocol

TOOL_NAME = "python"

INSTRUCTIONS = (
    "You may run Python code: write <python>code</python> and stop; its standard output "
    "comes back as <result>...</result>. You may run code at most {max_consults} times."
)


class PythonToolProtocol(OneTagToolProtocol):
    """``<python>`` code blocks answered by ``<result>`` blocks; the only target is ``python``."""

    name = "python_tool"
    tag = TOOL_NAME
    role = "runs Python code and returns its standard output"
    content = "code"
    default_instructions = INSTRUCTIONS
