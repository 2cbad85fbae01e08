"""Compile grammars off the scheduler loop, with a cache and a time limit.

The frontend compiles (so an invalid grammar is a 400 before the request runs) in a worker
thread, serialises the compiled grammar, and ships the JSON to the engine process, where
:mod:`heteroserve.core.grammar.matcher` rebuilds it in well under a millisecond.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import OrderedDict
from typing import Any

from heteroserve.core.grammar.spec import GrammarError, GrammarSpec, choice_to_ebnf


def tokenizer_info(tokenizer: Any, vocab_size: int) -> Any:
    """xgrammar's view of a Hugging Face tokenizer, padded to the model's vocab size."""
    import xgrammar as xgr

    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)


class GrammarCompileService:
    """Compiles :class:`GrammarSpec` objects to serialised xgrammar grammars.

    Results are cached by spec (LRU, ``cache_size`` entries); the tokenizer is fixed per
    service. ``compile`` raises :class:`GrammarError` with xgrammar's message for an invalid
    grammar, and when compilation exceeds ``timeout`` seconds (the worker thread is left to
    finish in the background; its result still enters the cache).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_workers: int = 2,
                 cache_size: int = 256) -> None:
        import xgrammar as xgr

        self._info = tokenizer_info(tokenizer, vocab_size)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=max_workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, "grammar-compile")
        self._cache: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _compile_now(self, spec: GrammarSpec) -> str:
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if spec.kind == "json_schema":
                json.loads(spec.text)
                compiled = self._compiler.compile_json_schema(spec.text, any_whitespace=False)
            elif spec.kind == "json_object":
                compiled = self._compiler.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.text)
            elif spec.kind == "ebnf":
                compiled = self._compiler.compile_grammar(spec.text)
            else:
                compiled = self._compiler.compile_grammar(choice_to_ebnf(json.loads(spec.text)))
        except json.JSONDecodeError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        except GrammarError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its message
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise GrammarError(f"invalid {spec.kind}: {message}") from None
        text = compiled.serialize_json()
        with self._lock:
            self._cache[spec] = text
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return text

    def compile(self, spec: GrammarSpec, timeout: float) -> str:
        """Blocking compile with a time limit; returns the serialised grammar."""
        future = self._pool.submit(self._compile_now, spec)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise GrammarError(
                f"{spec.kind} took longer than {timeout:g}s to compile; simplify it") from None

    async def compile_async(self, spec: GrammarSpec, timeout: float) -> str:
        """Same as :meth:`compile` without blocking the event loop."""
        future = asyncio.wrap_future(self._pool.submit(self._compile_now, spec))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise GrammarError(
                f"{spec.kind} took longer than {timeout:g}s to compile; simplify it") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
