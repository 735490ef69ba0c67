"""The OpenAI-compatible HTTP server over the engine (``jaxkv serve``).

``EngineRunner`` runs an ``Engine`` in its own thread for asyncio code; ``create_app`` builds
the FastAPI app over a runner. Both load lazily, so that ``jaxkv.serve.cli`` (imported by the
``jaxkv`` command) loads no server package (FastAPI, uvicorn, ...) until the server starts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EngineRunner", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "EngineRunner":
        from jaxkv.serve.async_engine import EngineRunner

        return EngineRunner
    if name == "create_app":
        from jaxkv.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'jaxkv.serve' has no attribute {name!r}")
