"""Generation on top of the caches: sampling, batched generation, chat sessions."""

from jaxkv.engine.generate import (
    ChatSession,
    Generation,
    GenerationResult,
    Model,
    generate,
)
from jaxkv.engine.sampling import SamplingParams, sample

__all__ = [
    "ChatSession",
    "Generation",
    "GenerationResult",
    "Model",
    "SamplingParams",
    "generate",
    "sample",
]
