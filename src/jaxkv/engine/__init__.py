"""Generation on top of the caches: the serving engine (continuous batching over a paged or
contiguous cache), sampling, batched generation, chat sessions and perplexity."""

from jaxkv.engine.chat import ChatSession
from jaxkv.engine.engine import Engine
from jaxkv.engine.generate import PromptCacheWarning, generate
from jaxkv.engine.model import MODEL_ALIASES, Gemma3Model, HybridModel, Model
from jaxkv.engine.outputs import Generation, GenerationResult
from jaxkv.engine.perplexity import PerplexityResult, perplexity
from jaxkv.engine.prefix_store import PrefixFile
from jaxkv.engine.requests import (
    CacheConfig,
    CompletionOutput,
    EngineStats,
    QueueFullError,
    RequestError,
    RequestMetrics,
    RequestOutput,
    SchedulerConfig,
    TokenLogprob,
    UnknownRequestError,
)
from jaxkv.engine.sampling import SamplingParams, sample
from jaxkv.engine.speculative import (
    Drafter,
    DraftRequest,
    NgramDrafter,
    SpeculativeConfig,
    speculative_config,
)

__all__ = [
    "CacheConfig",
    "ChatSession",
    "CompletionOutput",
    "DraftRequest",
    "Drafter",
    "Engine",
    "EngineStats",
    "Generation",
    "GenerationResult",
    "Gemma3Model",
    "HybridModel",
    "MODEL_ALIASES",
    "Model",
    "NgramDrafter",
    "PerplexityResult",
    "PrefixFile",
    "PromptCacheWarning",
    "QueueFullError",
    "RequestError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
    "SpeculativeConfig",
    "TokenLogprob",
    "UnknownRequestError",
    "generate",
    "perplexity",
    "sample",
    "speculative_config",
]
