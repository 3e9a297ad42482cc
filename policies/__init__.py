"""Generation backends for the policy and the agents: embedded transformers, SGLang, OpenRLHF.

The backends are imported lazily (``policies.TransformersGenerator`` loads torch and
transformers on first access), so ``import policies`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from policies.base import (
    ContextOverflowError,
    Generation,
    GenerationError,
    Generator,
    SamplingParams,
)

if TYPE_CHECKING:
    from policies.sglang_generator import SGLangGenerator
    from policies.transformers_generator import TransformersGenerator

__all__ = [
    "ContextOverflowError",
    "Generation",
    "GenerationError",
    "Generator",
    "SGLangGenerator",
    "SamplingParams",
    "TransformersGenerator",
    "make_generator",
    "sglang_hosts",
]

_LAZY = {
    "TransformersGenerator": "policies.transformers_generator",
    "SGLangGenerator": "policies.sglang_generator",
}

SGLANG_SCHEME = "sglang://"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policies' has no attribute {name!r}")


def sglang_hosts(spec: str) -> list[str] | None:
    """The ``host:port`` entries of an ``sglang://host:port[,host:port...]`` spec.

    None when ``spec`` is not an ``sglang://`` spec (``"default"``, a model id or path).

    Raises:
        ValueError: ``spec`` has the ``sglang://`` scheme but names no server.
    """
    if not spec.startswith(SGLANG_SCHEME):
        return None
    hosts = [h.strip() for h in spec[len(SGLANG_SCHEME) :].split(",") if h.strip()]
    if not hosts:
        raise ValueError(f"no servers in {spec!r}; expected sglang://host:port[,host:port...]")
    return hosts


def make_generator(spec: str, *, tokenizer: Any = None, **options: Any) -> Generator:
    """Build a generator from a spec string.

    ``"default"`` or a Hugging Face id/path: the embedded :class:`TransformersGenerator`
    (``options`` go to its constructor). ``"vllm:MODEL"`` (``vllm:default``, a path or
    id): an in-process vLLM engine (:class:`~policies.vllm_generator.VLLMGenerator`),
    built inside a running event loop. ``"sglang://host:port[,host:port...]"``: an
    :class:`SGLangGenerator` on those servers; ``tokenizer`` (an object, path or id,
    ``"default"`` when omitted) must match the servers' model.
    """
    if not spec:
        raise ValueError(
            "generator spec is empty; expected 'default', a model id/path or sglang://host:port"
        )
    if spec.startswith("vllm:"):  # an in-process vLLM engine on the model after the prefix
        from policies.base import GenerationError
        from policies.vllm_generator import VLLMGenerator

        try:
            return VLLMGenerator(spec[len("vllm:") :] or "default", tokenizer=tokenizer, **options)
        except GenerationError as exc:  # callers report a model that cannot load as bad input
            raise ValueError(str(exc)) from None
    hosts = sglang_hosts(spec)
    if hosts is not None:
        from policies.sglang_generator import SGLangGenerator

        urls = [h if h.startswith(("http://", "https://")) else f"http://{h}" for h in hosts]
        return SGLangGenerator(urls, tokenizer=tokenizer or "default", **options)
    from policies.transformers_generator import TransformersGenerator

    return TransformersGenerator(spec, **options)
