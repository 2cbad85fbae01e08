"""Admission: turn a :class:`GenerateRequest` into a validated :class:`PreparedRequest`,
off the event loop.

Everything a request can get wrong is checked here, once, and raised as a
:class:`RequestError` (one line; ``param`` names the field): sampling parameters
(:meth:`SamplingParams.validate`), the prompt (text that is not valid Unicode, a prompt that
cannot fit the context window, token ids outside the vocabulary), logprob options, ``n``, and
output constraints (compiled in the grammar pool, which has its own limits). Chat templating
and tokenization run in a small thread pool, after a length check that needs no tokenizer, so
a huge prompt never stalls the caller's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from heteroserve.core.config import ServerArgs
from heteroserve.core.grammar.compile_pool import GrammarBusyError, GrammarCompilePool
from heteroserve.core.grammar.spec import KINDS, GrammarError, spec_from_sampling_params
from heteroserve.core.model_runner.pooling import EmbedSpec
from heteroserve.core.runtime.errors import QueueFullError, RequestError, one_line
from heteroserve.core.runtime.io_struct import GenerateRequest, ReadyInfo
from heteroserve.core.runtime.request_state import RequestOptions
from heteroserve.core.scheduler.sampling_params import SamplingParams, SamplingParamsError
from heteroserve.core.tokenizer import Tokenizer, TokenizerError

MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_RID_CHARS = 256
#: no tokenizer packs more characters than this into one token on average, so a prompt
#: longer than ``context * CHARS_PER_TOKEN_BOUND`` characters cannot fit and is refused
#: before it is tokenized
CHARS_PER_TOKEN_BOUND = 64
#: the most token ids one detokenize call decodes
MAX_DETOKENIZE_IDS = 1 << 20
#: keyword arguments the chat template call owns; a request may not set them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "add_generation_prompt", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "continue_final_message", "chat_template", "tokenizer_kwargs"})


@dataclass
class PreparedRequest:
    """A validated request: prompt ids, validated ``SamplingParams`` (grammar attached), the
    number of choices, what the frontend does with the tokens, and the scheduler's logprob
    options (``logprob_start_len`` >= 0 only when prompt logprobs were asked for).
    ``embed``: set for an embedding request (then ``max_new_tokens`` is 0 and ``n`` 1)."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    n: int
    options: RequestOptions
    logprob_start_len: int
    health_check: bool = False
    embed: EmbedSpec | None = None


def check_text(text: str, what: str) -> None:
    """Raise :class:`RequestError` when ``text`` is not valid Unicode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{what} is not valid Unicode: a lone surrogate at character "
                           f"{exc.start}", param=what) from None


def _sampling_params(req: GenerateRequest, vocab_size: int) -> tuple[SamplingParams, int]:
    """The request's validated :class:`SamplingParams` and ``n``."""
    params, n = req.sampling_params, req.n
    try:
        if isinstance(params, dict):
            params = dict(params)
            n = params.pop("n", 1)
            params = SamplingParams.from_dict(params)
        if not isinstance(params, SamplingParams):
            raise RequestError("sampling_params must be a dict", param="sampling_params")
        params.validate(vocab_size)
    except SamplingParamsError as exc:
        raise RequestError(f"invalid sampling params: {exc}", param=exc.param) from None
    except TypeError as exc:
        raise RequestError(f"invalid sampling params: {one_line(exc)}",
                           param="sampling_params") from None
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise RequestError(f"n must be an integer in [1, {MAX_N}], got {n!r}", param="n")
    return params, n


class Admission:
    """Validates and tokenizes requests for one engine (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, info: ReadyInfo, server_args: ServerArgs,
                 tokenizer_path: str, workers: int = 2) -> None:
        self.tokenizer, self.info, self.args = tokenizer, info, server_args
        self.vocab_size = max(tokenizer.vocab_size, info.vocab_size)
        self.max_prompt_chars = info.max_context_len * CHARS_PER_TOKEN_BOUND
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "heteroserve-tokenize")
        from heteroserve.core.grammar.compile_pool import CompileLimits

        prestart = not server_args.lazy_grammar_workers
        self.grammars = GrammarCompilePool(tokenizer_path, info.vocab_size, CompileLimits(
            timeout=server_args.grammar_compile_timeout,
            max_spec_bytes=server_args.grammar_max_bytes,
            cache_bytes=server_args.grammar_cache_bytes),
            trust_remote_code=server_args.trust_remote_code,
            prestart=prestart)
        if prestart:
            self.grammars.start()  # the first structured-output request does not wait seconds

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- prompts -------------------------------------------------------------------------------
    def _check_prompt_chars(self, text: str, what: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"the {what} has {len(text)} characters, more than can fit the "
                               f"context window of {self.info.max_context_len} tokens",
                               param=what)
        check_text(text, what)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:  # the tokenizer refused this text
            raise RequestError(f"cannot tokenize the prompt: {one_line(exc)}",
                               param="prompt") from None

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (in the pool). Raises :class:`RequestError`."""
        self._check_prompt_chars(text, "prompt")
        return await self._run(self._encode, text, add_special_tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        bad = next((i for i in ids if not 0 <= i < self.tokenizer.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary "
                               f"[0, {self.tokenizer.vocab_size})", param="tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    async def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (in the pool; at most :data:`MAX_DETOKENIZE_IDS`). Raises
        :class:`RequestError` for too many ids or one outside the vocabulary."""
        if len(ids) > MAX_DETOKENIZE_IDS:
            raise RequestError(f"{len(ids)} token ids; at most {MAX_DETOKENIZE_IDS} may be "
                               "decoded at once", param="tokens")
        return await self._run(self._decode, list(ids), skip_special_tokens)

    def _render(self, messages: list[dict[str, Any]], kwargs: dict[str, Any],
                add_special_tokens: bool) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, **kwargs)
        except TokenizerError as exc:
            raise RequestError(str(exc), param="messages") from None
        self._check_prompt_chars(text, "messages")
        return self._encode(text, add_special_tokens=add_special_tokens)

    async def render_chat(self, messages: list[dict[str, Any]],
                          template_kwargs: dict[str, Any] | None = None,
                          tools: Sequence[dict[str, Any]] | None = None,
                          add_generation_prompt: bool = True,
                          continue_final_message: bool = False,
                          add_special_tokens: bool = False) -> list[int]:
        """Render ``messages`` with the chat template and tokenize the result (in the pool).
        ``template_kwargs`` (``chat_template_kwargs``) reach the template; names the call
        owns are refused. ``add_generation_prompt``: end with the assistant header (the
        default); ``continue_final_message`` (vLLM's): leave the final message, an assistant
        one, open for the model to continue (needs ``add_generation_prompt`` false);
        ``add_special_tokens``: tokenize the rendered text with the tokenizer's special tokens
        too (the template usually writes them). Raises :class:`RequestError`."""
        kwargs = dict(template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {reserved[0]!r}",
                               param="chat_template_kwargs")
        kwargs["add_generation_prompt"] = add_generation_prompt
        if continue_final_message:
            if add_generation_prompt:
                raise RequestError("continue_final_message needs add_generation_prompt: false",
                                   param="continue_final_message")
            last = messages[-1] if messages else {}
            if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
                raise RequestError("continue_final_message needs a final assistant message "
                                   "with text content", param="continue_final_message")
            kwargs["continue_final_message"] = True
        total = 0
        for i, message in enumerate(messages):
            content = message.get("content")
            if isinstance(content, str):
                total += len(content)
                check_text(content, f"messages.{i}.content")
        if total > self.max_prompt_chars:
            raise RequestError(f"the messages have {total} characters, more than can fit the "
                               f"context window of {self.info.max_context_len} tokens",
                               param="messages")
        if tools:
            kwargs["tools"] = list(tools)
        return await self._run(self._render, messages, kwargs, add_special_tokens)

    # -- requests ------------------------------------------------------------------------------
    async def prepare(self, req: GenerateRequest) -> PreparedRequest:
        """Validate and tokenize ``req``; compile its output constraint. Raises
        :class:`RequestError`, or :class:`QueueFullError` when the grammar pool is busy."""
        if req.embed is not None:
            return await self._prepare_embedding(req)
        sp, n = _sampling_params(req, self.vocab_size)
        top_n = req.top_logprobs_num
        if isinstance(top_n, bool) or not isinstance(top_n, int) or \
                not 0 <= top_n <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], "
                               f"got {top_n!r}", param="top_logprobs_num")
        rid = self._rid(req)
        for stop in sp.stop_strings:
            check_text(stop, "stop")
        ids = self._truncate(await self._prompt_ids(req), req.truncate_prompt_tokens, sp)
        self._check_lengths(ids, sp)
        start = self._logprob_start(req, len(ids))
        await self._attach_grammar(sp)
        options = RequestOptions(
            stop=sp.stop_strings, min_new_tokens=sp.min_new_tokens,
            skip_special_tokens=sp.skip_special_tokens,
            no_stop_trim=sp.no_stop_trim, stream=bool(req.stream),
            stream_interval=max(1, self.args.stream_interval),
            return_logprob=bool(req.return_logprob) or top_n > 0, top_logprobs_num=top_n,
            prompt_logprobs=start >= 0)
        return PreparedRequest(rid, ids, sp, n, options, start, req.health_check)

    async def _prepare_embedding(self, req: GenerateRequest) -> PreparedRequest:
        """An embedding request: one prefill-only choice whose prompt may fill the whole
        context window (it generates nothing)."""
        if not isinstance(req.embed, EmbedSpec):
            raise RequestError("embed must be an EmbedSpec", param="embed")
        if req.n != 1 or req.stream or req.return_logprob or req.top_logprobs_num \
                or req.logprob_start_len != -1:
            raise RequestError("an embedding request has one choice, no streaming and no "
                               "logprobs", param="n")
        rid = self._rid(req)
        ids = await self._prompt_ids(req)
        limit = min(self.info.max_context_len, self.info.max_total_tokens)
        if len(ids) > limit:
            raise RequestError(f"the input has {len(ids)} tokens, more than the model's "
                               f"maximum of {limit}; shorten it", param="input")
        return PreparedRequest(rid, ids, SamplingParams(max_new_tokens=0), 1,
                               RequestOptions(stop=[]), -1, req.health_check, embed=req.embed)

    @staticmethod
    def _rid(req: GenerateRequest) -> str:
        rid = req.rid if req.rid is not None else uuid.uuid4().hex
        if not isinstance(rid, str) or not rid or len(rid) > MAX_RID_CHARS:
            raise RequestError(f"rid must be a non-empty string of at most {MAX_RID_CHARS} "
                               "characters", param="rid")
        return rid

    async def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if (req.text is None) == (req.input_ids is None):
            raise RequestError("give exactly one of text or input_ids", param="text")
        if req.text is not None:
            if not isinstance(req.text, str):
                raise RequestError("text must be a string", param="text")
            ids = await self.tokenize(req.text, req.add_special_tokens)
        else:
            raw = req.input_ids
            if not isinstance(raw, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in raw):
                raise RequestError("input_ids must be a list of integers", param="input_ids")
            ids = list(raw)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise RequestError(f"input_ids contains token id {bad} outside the vocabulary "
                                   f"[0, {self.vocab_size})", param="input_ids")
        if not ids:
            raise RequestError("the prompt is empty", param="prompt")
        return ids

    def _truncate(self, ids: list[int], keep: int | None, sp: SamplingParams) -> list[int]:
        """The last ``keep`` prompt tokens (-1: as many as fit the context window with
        ``max_new_tokens``); ``ids`` for None. Raises :class:`RequestError` for another
        value below 1."""
        if keep is None:
            return ids
        if isinstance(keep, bool) or not isinstance(keep, int) or (keep < 1 and keep != -1):
            raise RequestError(f"truncate_prompt_tokens must be -1 or a positive integer, got "
                               f"{keep!r}", param="truncate_prompt_tokens")
        if keep == -1:
            keep = max(1, self.info.max_context_len - sp.max_new_tokens)
        return ids[-keep:]

    def _check_lengths(self, ids: list[int], sp: SamplingParams) -> None:
        context = self.info.max_context_len
        if len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context window is "
                               f"{context}; shorten it", param="prompt")
        if len(ids) + sp.max_new_tokens > context:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_new_tokens "
                               f"({sp.max_new_tokens}) exceeds the context window of "
                               f"{context} tokens", param="max_new_tokens")
        if len(ids) + sp.max_new_tokens > self.info.max_total_tokens:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_new_tokens "
                               f"({sp.max_new_tokens}) needs more KV slots than the pool holds "
                               f"({self.info.max_total_tokens}); shorten it",
                               param="max_new_tokens")

    @staticmethod
    def _logprob_start(req: GenerateRequest, prompt_len: int) -> int:
        start = req.logprob_start_len
        if isinstance(start, bool) or not isinstance(start, int) or start < -1:
            raise RequestError("logprob_start_len must be an integer >= -1",
                               param="logprob_start_len")
        if start >= prompt_len:
            raise RequestError(f"logprob_start_len ({start}) must be less than the prompt "
                               f"length ({prompt_len})", param="logprob_start_len")
        return start if req.return_logprob else -1

    async def _attach_grammar(self, sp: SamplingParams) -> None:
        try:
            spec = spec_from_sampling_params({k: getattr(sp, k) for k in KINDS})
            if spec is None:
                return
            check_text(spec.text, spec.kind)
            sp.grammar = await self.grammars.compile(spec)
            sp.grammar_json_output = spec.kind in ("json_schema", "json_object")
        except GrammarBusyError as exc:
            raise QueueFullError(one_line(exc)) from None
        except GrammarError as exc:
            raise RequestError(one_line(exc), param=spec_param(sp)) from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.grammars.shutdown()


def spec_param(sp: SamplingParams) -> str | None:
    """The sampling parameter that states ``sp``'s output constraint."""
    return next((k for k in KINDS if getattr(sp, k) not in (None, False)), None)
