"""Queue limits, a dying scheduler process and start-up failures."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from heteroserve import Engine
from heteroserve.core.runtime.errors import EngineDeadError, QueueFullError
from heteroserve.core.runtime.io_struct import GenerateRequest

LONG = {"temperature": 0.0, "max_new_tokens": 1500, "ignore_eos": True}


def test_queue_limit_then_watchdog_fails_pending_requests(tiny_model: Path,
                                                          engine_kwargs: dict) -> None:
    engine = Engine(str(tiny_model), **{**engine_kwargs, "max_running_requests": 1,
                                        "max_queued_requests": 1})
    client = engine.client
    pid = client._procs[0].pid

    async def main() -> list[BaseException]:
        running = client.generate(GenerateRequest(text="one", sampling_params=LONG, stream=True))
        await running.__anext__()  # running: it produced a token
        queued = client.generate(GenerateRequest(text="two", sampling_params=LONG, stream=True))
        queued_first = asyncio.ensure_future(queued.__anext__())
        await asyncio.sleep(0.2)  # sent, waiting behind the running one
        assert not queued_first.done()
        with pytest.raises(QueueFullError, match="max-queued-requests"):
            client.generate(GenerateRequest(text="three", sampling_params=LONG))
        os.kill(pid, signal.SIGKILL)
        errors: list[BaseException] = []

        async def drain(it, first=None) -> None:
            try:
                if first is not None:
                    await first
                async for _ in it:
                    pass
            except BaseException as exc:  # noqa: BLE001 - collected for the assertions
                errors.append(exc)

        await asyncio.wait_for(asyncio.gather(drain(running), drain(queued, queued_first)), 20)
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
    assert multiprocessing.active_children() == []


def test_startup_failure_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(RuntimeError, match="engine start-up failed") as info:
        Engine(str(tiny_model), platform="no-such-platform")
    assert "\n" not in str(info.value)
    assert multiprocessing.active_children() == []
