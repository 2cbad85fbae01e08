"""Large JSON request bodies parsed in a helper process, so they never hold the server's GIL.

``json.loads`` of a body holds the interpreter lock for as long as it runs, even in a worker
thread: 10-40 ms for 10 MB on a 2-core machine, 35-90 ms for 30 MB, and several times that
when other processes compete for the cores. Meanwhile the event loop answers nothing, not
even ``/health``. Bodies over :data:`OFF_PROCESS_BYTES` are therefore parsed by
:func:`parse_and_check` in one helper process (started on the first such body). The helper
also refuses any string longer than a request field may hold (a prompt that would fill the
context window at :data:`~heteroserve.core.runtime.admission.CHARS_PER_TOKEN_BOUND` characters
a token, or a grammar text at its limit, whichever is longer): such a body comes back as one
short error and its megabytes never reach the server process. A valid body comes back
pickled; unpickling costs about a fifth of parsing it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

logger = logging.getLogger(__name__)

#: bodies over this many bytes are parsed in the helper process (below it, in a thread)
OFF_PROCESS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class LongString:
    """The first string of a body longer than allowed: where (``messages[0].content``) and
    how many characters it has."""

    path: str
    chars: int


@dataclass(frozen=True)
class ParseFailure:
    """A body that is not JSON (``pos``: the offset of the error, or -1 when the failure is
    not a syntax error, e.g. nesting too deep)."""

    message: str
    pos: int


def first_long_string(value: Any, max_chars: int) -> LongString | None:
    """The first string (depth first, keys included) in ``value`` longer than ``max_chars``,
    or None. Iterative, so any nesting that ``json.loads`` accepted is walked."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if len(item) > max_chars:
                return LongString(path or "body", len(item))
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if len(key) > max_chars:
                    return LongString(f"{path}.<key>" if path else "<key>", len(key))
                stack.append((f"{path}.{key}" if path else key, child))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def parse_and_check(body: bytes, max_chars: int) -> Any:
    """In the helper: the parsed body, or a :class:`LongString` / :class:`ParseFailure`
    (returned, not raised: an exception would carry the whole document back)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return ParseFailure(exc.msg, exc.pos)
    except (ValueError, RecursionError) as exc:  # not UTF-8, nested too deep
        return ParseFailure(str(exc)[:200], -1)
    return first_long_string(value, max_chars) or value


class FieldTooLong(HTTPException):
    """A 400 naming the field (``param``): FastAPI passes HTTP exceptions raised while it
    reads a body through unchanged, and the server's handler renders ``param``."""

    def __init__(self, long: LongString, max_chars: int, context_len: int) -> None:
        super().__init__(400, f"{long.path} has {long.chars} characters, more than can fit the "
                              f"context window of {context_len} tokens (at most {max_chars} "
                              "characters a field)")
        self.param = long.path


class BodyParser:
    """Parses large bodies in one helper process (see the module docstring).

    ``max_chars``: the longest string a request field may hold; ``context_len``: the model's
    context window in tokens, for the error message. :meth:`parse` raises
    :class:`FieldTooLong` for a longer string, ``json.JSONDecodeError`` for bad JSON (which
    FastAPI turns into its 400) and ``ValueError`` for a body that cannot be decoded. If the
    helper dies, that body is parsed in a thread and a new helper starts with the next one.
    """

    def __init__(self, max_chars: int, context_len: int) -> None:
        self.max_chars, self.context_len = max_chars, context_len
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: a fresh interpreter that imports this module, not a fork of the server
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _submit(self, body: bytes) -> concurrent.futures.Future:
        return self._executor().submit(parse_and_check, body, self.max_chars)

    async def parse(self, body: bytes) -> Any:
        """The JSON value of ``body`` (see the class docstring for the errors)."""
        try:
            # submitted from a thread: the first body starts the helper (fork + exec)
            result = await asyncio.wrap_future(await asyncio.to_thread(self._submit, body))
        except BrokenProcessPool:
            logger.warning("the JSON helper process died; parsing this body in a thread")
            with self._lock:
                self._pool = None
            return await asyncio.to_thread(json.loads, body)
        if isinstance(result, LongString):
            raise FieldTooLong(result, self.max_chars, self.context_len)
        if isinstance(result, ParseFailure):
            if result.pos >= 0:
                raise json.JSONDecodeError(result.message, "", result.pos)
            raise ValueError(result.message)
        return result

    def close(self) -> None:
        """Stop the helper (if it was started); pending parses are cancelled."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
