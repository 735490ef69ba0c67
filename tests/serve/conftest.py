"""Fixtures of the server tests: ``kit``, the tiny random-weight model (loaded once) with helpers
to build small engines, run a real uvicorn server on a free loopback port in a background
thread, read Prometheus series and poll for a condition. (Helpers come as a fixture: under
``--import-mode=importlib`` test modules cannot import a shared module.)"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from jaxkv.engine import CacheConfig, Engine, Model, SchedulerConfig

SMALL_SCHEDULER = {
    "max_num_seqs": 4,
    "max_num_batched_tokens": 64,
    "max_model_len": 512,
}


class ServerKit:
    """Helpers of the server tests, around one ``model``."""

    def __init__(self, model: Model):
        self.model = model
        self.tokenizer = model.tokenizer

    def engine(self, **scheduler: int) -> Engine:
        """A paged engine with 16-token pages and the small scheduler (``scheduler``
        overrides)."""
        return Engine(
            self.model,
            CacheConfig(kind="paged", page_size=16),
            SchedulerConfig(**{**SMALL_SCHEDULER, **scheduler}),
        )

    @staticmethod
    @contextlib.contextmanager
    def serve(app, timeout: float = 30.0) -> Iterator[str]:
        """Serve ``app`` on 127.0.0.1 and a free port in a thread; yields the base URL. The
        listening socket is bound before the thread starts, so no other process can take the
        port in between."""
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout)
            listener.close()

    @staticmethod
    def metric(text: str, name: str, labels: str = "") -> float | None:
        """The value of one series in a Prometheus text exposition (None if absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series == wanted:
                return float(value)
        return None

    @staticmethod
    def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)


@pytest.fixture(scope="session")
def kit() -> ServerKit:
    return ServerKit(Model.tiny())
