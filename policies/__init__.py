"""Generation backends for the policy and the agents: embedded transformers, SGLang, OpenRLHF."""

from policies.base import (
    ContextOverflowError,
    Generation,
    GenerationError,
    Generator,
    SamplingParams,
)

__all__ = ["ContextOverflowError", "Generation", "GenerationError", "Generator", "SamplingParams"]
