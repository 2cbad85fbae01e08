"""OpenAI request fields -> SGLang sampling parameters (the names ``EngineClient`` reads).

Only fields the client set are forwarded, so the engine's own defaults apply to the rest; the
engine validates the values again (its error is a 400 too).
"""

from __future__ import annotations

import logging
from typing import Any

from heteroserve.server.errors import bad_request
from heteroserve.server.protocol import SamplingFields
from heteroserve.server.structured import structured_output_params

logger = logging.getLogger(__name__)

# request field -> sampling-parameter name, forwarded when not None
_DIRECT = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids", "seed": "seed",
    "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim",
}


def _stop(stop: str | list[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise bad_request("stop strings must be non-empty", "stop")
    return stops or None


def sampling_params(req: SamplingFields, max_new_tokens: int | None) -> dict[str, Any]:
    """The SGLang ``sampling_params`` dict for ``req`` (``n`` included; ``max_new_tokens``
    as given, None leaves the engine's default). Raises a 400 APIError for values the engine
    cannot take in any form (empty stop strings, conflicting output constraints)."""
    if req.ignored_fields():
        logger.debug("ignoring unknown request fields: %s", ", ".join(req.ignored_fields()))
    if req.min_tokens:
        raise bad_request("min_tokens is not supported by this engine", "min_tokens")
    params: dict[str, Any] = {"n": req.n}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    for field, key in _DIRECT.items():
        value = getattr(req, field)
        if value is not None:
            params[key] = value
    if req.top_k is not None and req.top_k == 0:
        params["top_k"] = -1  # OpenAI-style 0 means "no top-k"; SGLang spells it -1
    stop = _stop(req.stop)
    if stop:
        params["stop"] = stop
    if req.logit_bias:
        params["logit_bias"] = dict(req.logit_bias)
    params.update(structured_output_params(req))
    return params
