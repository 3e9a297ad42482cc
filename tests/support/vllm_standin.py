"""A stand-in for vLLM's ``SamplingParams`` (vLLM does not install without CUDA)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class VLLMSamplingParams:
    """The fields of vllm.SamplingParams the adapter sets."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = None
    min_tokens: int = 1
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = False
    logprobs: int | None = None
    seed: int | None = None
