"""Queue limits, a dying scheduler process and start-up failures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from engine_harness import ChildWatch

from heteroserve import Engine
from heteroserve.core.runtime.errors import EngineDeadError, QueueFullError
from heteroserve.core.runtime.io_struct import GenerateRequest

LONG = {"temperature": 0.0, "max_new_tokens": 1500, "ignore_eos": True}


def test_queue_limit_then_watchdog_fails_pending_requests(tiny_model: Path,
                                                          engine_kwargs: dict) -> None:
    children = ChildWatch()
    engine = Engine(str(tiny_model), **{**engine_kwargs, "max_running_requests": 1,
                                        "max_queued_requests": 1})
    client = engine.client
    pid = client.supervisor.procs[0].pid

    async def main() -> list[BaseException]:
        running = (await client.generate(GenerateRequest(text="one", sampling_params=LONG,
                                                         stream=True))).__aiter__()
        await running.__anext__()  # running: it produced a token, so it left the queue
        queued = await client.generate(GenerateRequest(text="two", sampling_params=LONG,
                                                       stream=True))
        # max_running_requests=1: "two" cannot start before "one" ends, so it stays queued
        assert client.registry.waiting() == 1
        with pytest.raises(QueueFullError, match="max-queued-requests"):
            await client.generate(GenerateRequest(text="three", sampling_params=LONG))
        os.kill(pid, signal.SIGKILL)
        errors: list[BaseException] = []

        async def drain(it) -> None:
            try:
                async for _ in it:
                    pass
            except BaseException as exc:  # noqa: BLE001 - collected for the assertions
                errors.append(exc)

        await asyncio.wait_for(asyncio.gather(drain(running), drain(queued)), 20)
        return errors

    try:
        started = time.monotonic()
        errors = asyncio.run(main())
        assert len(errors) == 2 and all(isinstance(e, EngineDeadError) for e in errors)
        assert "died" in str(errors[0]) and time.monotonic() - started < 20
        assert not client.is_alive()
        with pytest.raises(EngineDeadError):
            engine.generate("hi")
    finally:
        engine.shutdown()
    assert children.new_live() == []


def test_startup_failure_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    children = ChildWatch()
    with pytest.raises(RuntimeError, match="engine start-up failed") as info:
        Engine(str(tiny_model), platform="no-such-platform")
    assert "\n" not in str(info.value)
    assert children.new_live() == []
