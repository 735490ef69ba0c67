"""A full queue answers 429: an engine with one sequence slot and room for one waiting request,
made deterministic by holding the slot with a long stream and the queue with a second one."""

from __future__ import annotations

import contextlib

import httpx
import openai
import pytest

from jaxkv.serve import EngineRunner, create_app

MODEL = "tiny-random"


@pytest.fixture(scope="module")
def server(kit):
    engine = kit.engine(max_num_seqs=1, max_waiting=1, max_model_len=2048)
    engine.warmup()
    runner = EngineRunner(engine)
    with kit.serve(create_app(runner, model_name=MODEL)) as url:
        yield url


def _long_stream(http: httpx.Client, prompt: str):
    body = {"prompt": prompt, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    return http.stream("POST", "/v1/completions", json=body)


def _gauge(kit, http, name) -> float | None:
    return kit.metric(http.get("/metrics").text, name)


def test_full_queue_answers_429_and_recovers(kit, server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with httpx.Client(base_url=server, timeout=30) as http, contextlib.ExitStack() as streams:
        running = streams.enter_context(_long_stream(http, "The first request"))
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(lines).startswith("data: ")  # it holds the only sequence slot now
        waiting = streams.enter_context(_long_stream(http, "The second request"))
        assert waiting.status_code == 200  # accepted, and queued behind the first
        assert kit.wait_until(lambda: _gauge(kit, http, "jaxkv_num_requests_waiting") == 1)

        response = http.post("/v1/completions", json={"prompt": "third", "max_tokens": 2})
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert "max_waiting=1" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="fourth", max_tokens=2)
        streams.close()  # both clients leave: their requests are aborted

        def idle() -> bool:
            return _gauge(kit, http, "jaxkv_num_requests_running") == 0 and (
                _gauge(kit, http, "jaxkv_kv_pages_used") == 0
            )

        assert kit.wait_until(idle)
        result = client.completions.create(model=MODEL, prompt="now", max_tokens=2)
        assert result.choices[0].finish_reason in ("stop", "length")
