"""Generation on top of the caches: sampling, batched generation, chat sessions."""

from jaxkv.engine.generate import ChatSession, generate
from jaxkv.engine.model import Model
from jaxkv.engine.outputs import Generation, GenerationResult
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
