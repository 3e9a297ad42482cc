"""The collaborative agents (verify, knowledge, reasoning), their prompts and the agent pool."""

from agents.base import DEFAULT_AGENT_NAMES, Agent, AgentReply, ConsultRequest, ConsultService
from agents.config import AgentConfig, AgentPoolConfig, tokenizers_match
from agents.leak_guard import guard_reply
from agents.llm_agent import KnowledgeAgent, LLMAgent, ReasoningAgent, VerifyAgent, render_prompt
from agents.oracle import (
    OracleKnowledgeAgent,
    OracleReasoningAgent,
    OracleVerifyAgent,
    check_oracle_agents,
    find_candidate,
)
from agents.pool import AgentPool
from agents.templates import PromptTemplate, load_template

__all__ = [
    "DEFAULT_AGENT_NAMES",
    "Agent",
    "AgentConfig",
    "AgentPool",
    "AgentPoolConfig",
    "AgentReply",
    "ConsultRequest",
    "ConsultService",
    "KnowledgeAgent",
    "LLMAgent",
    "OracleKnowledgeAgent",
    "OracleReasoningAgent",
    "OracleVerifyAgent",
    "PromptTemplate",
    "ReasoningAgent",
    "VerifyAgent",
    "check_oracle_agents",
    "find_candidate",
    "guard_reply",
    "load_template",
    "render_prompt",
    "tokenizers_match",
]
