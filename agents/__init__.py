"""The collaborative agents (verify, knowledge, reasoning), their prompts and the agent pool."""

from agents.base import DEFAULT_AGENT_NAMES, Agent, AgentReply, ConsultRequest, ConsultService

__all__ = ["DEFAULT_AGENT_NAMES", "Agent", "AgentReply", "ConsultRequest", "ConsultService"]
