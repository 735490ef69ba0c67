"""``EngineRunner`` on its own: outputs equal ``Engine.generate``, engine errors reach the caller
(a full queue is tested through the server, in ``test_queue_full``),
a failing step fails the requests in flight and the thread goes on, cancelling frees pages, and
``stop`` ends everything cleanly."""

from __future__ import annotations

import asyncio

import pytest

from jaxkv.engine import RequestError, SamplingParams
from jaxkv.serve.async_engine import (
    EngineRunner,
    EngineStepError,
    RequestAborted,
    RunnerStoppedError,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def engine(kit):
    engine = kit.engine()
    engine.warmup()
    return engine


@pytest.fixture
def runner(engine):
    runner = EngineRunner(engine)
    runner.start()
    yield runner
    runner.stop()
    assert not runner.running


async def _collect(runner, prompt, sampling=GREEDY, request_id="r", **kwargs):
    stream = await runner.submit(prompt, sampling, request_id=request_id, **kwargs)
    return [output async for output in stream]


def test_outputs_equal_engine_generate(kit, runner):
    prompts = ["Hello there", [5, 6, 7], [{"role": "user", "content": "hi"}]]
    reference = kit.engine()
    expected = [reference.generate([p], GREEDY)[0].outputs[0].text for p in prompts]

    async def main():
        runs = [_collect(runner, p, request_id=f"r{i}") for i, p in enumerate(prompts)]
        return await asyncio.gather(*runs)

    for outputs, text in zip(asyncio.run(main()), expected, strict=True):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert "".join(o.outputs[0].new_text for o in outputs) == text
        assert outputs[-1].outputs[0].text == text


def test_engine_errors_reach_the_caller(runner):
    async def main():
        with pytest.raises(RequestError, match="empty"):
            await runner.submit("", GREEDY, request_id="empty")
        with pytest.raises(RequestError, match="vocabulary"):
            await runner.submit([10**9], GREEDY, request_id="huge-id")
        with pytest.raises(RequestError, match="already in use"):
            stream = await runner.submit("x", GREEDY, request_id="twice")
            await runner.submit("x", GREEDY, request_id="twice")
        async for _ in stream:
            pass

    asyncio.run(main())


def test_fit_max_tokens_fills_the_context(runner):
    async def main():
        ceiling = SamplingParams(max_tokens=10_000, ignore_eos=True)
        stream = await runner.submit([1, 2, 3], ceiling, request_id="fit", fit_max_tokens=True)
        stream.cancel()  # accepted: max_tokens was lowered to the context left
        with pytest.raises(RequestError, match="max_model_len"):
            await runner.submit([1, 2, 3], ceiling, request_id="unfit")

    asyncio.run(main())


def test_a_failing_step_fails_the_requests_in_flight_and_serving_goes_on(runner, engine):
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = flaky_step
    try:

        async def main():
            with pytest.raises(EngineStepError, match="injected failure"):
                await _collect(runner, "Hello", SamplingParams(max_tokens=20), request_id="a")
            return await _collect(runner, "Hello", request_id="b")

        outputs = asyncio.run(main())
    finally:
        del engine.step
    assert outputs[-1].finished
    assert runner.stats().num_pages_used == 0


def test_cancel_aborts_and_frees_pages(runner):
    async def main():
        sampling = SamplingParams(max_tokens=400, ignore_eos=True)
        stream = await runner.submit("a long one", sampling, request_id="c")
        first = await stream.__anext__()
        assert not first.finished
        stream.cancel()
        with pytest.raises(RequestAborted):
            await stream.__anext__()
        assert stream.done
        runner.abort("c")  # idempotent
        runner.abort("never-added")
        for _ in range(200):
            if runner.stats().num_pages_used == 0 and runner.stats().num_running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_stop_fails_streams_and_refuses_new_requests(engine):
    runner = EngineRunner(engine)
    runner.start()
    runner.start()  # idempotent

    async def main():
        sampling = SamplingParams(max_tokens=400, ignore_eos=True)
        stream = await runner.submit("x", sampling, request_id="s")
        await stream.__anext__()
        await asyncio.to_thread(runner.stop)
        with pytest.raises(RunnerStoppedError):
            async for _ in stream:
                pass
        with pytest.raises(RunnerStoppedError):
            await runner.submit("x", sampling, request_id="t")

    asyncio.run(main())
    assert not runner.running
    assert engine.stats().num_pages_used == 0 and not engine.has_unfinished()
    runner.stop()  # idempotent
    with pytest.raises(RunnerStoppedError):
        runner.start()


def test_runner_needs_an_engine():
    with pytest.raises(TypeError, match="Engine"):
        EngineRunner("not an engine")
