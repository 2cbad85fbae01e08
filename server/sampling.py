"""OpenAI request fields -> a typed :class:`SamplingParams` (SGLang's names).

Only fields the client set are passed on, so the engine's defaults apply to the rest. This
module maps names; it does not check values: :meth:`SamplingParams.validate` does, once, at
admission (its error is a 400 naming the field).
"""

from __future__ import annotations

import logging
from typing import Any

from heteroserve.core.scheduler.sampling_params import SamplingParams
from heteroserve.server.errors import bad_request
from heteroserve.server.protocol import SamplingFields
from heteroserve.server.structured import structured_output_params

logger = logging.getLogger(__name__)

# request field -> sampling-parameter name, passed on when not None
_DIRECT = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "stop": "stop",
    "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids", "seed": "seed",
    "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "no_stop_trim",
    "logit_bias": "logit_bias", "min_tokens": "min_new_tokens",
    "include_stop_str_in_output": "no_stop_trim", "allowed_token_ids": "allowed_token_ids",
}


#: vLLM request fields this server does not implement -> their do-nothing values
_UNSUPPORTED = {"use_beam_search": (None, False), "bad_words": (None, []),
                "prompt_logprobs": (None,)}


def sampling_params(req: SamplingFields, max_new_tokens: int | None,
                    tool_constraint: dict[str, str] | None = None) -> SamplingParams:
    """The :class:`SamplingParams` for ``req`` (``max_new_tokens`` as given; None leaves the
    engine's default; ``tool_constraint``: the constraint ``tool_choice`` imposes). Raises a
    400 APIError for conflicting output constraints and for a vLLM field this server does not
    implement set to anything but its default (``_UNSUPPORTED``)."""
    for field, defaults in _UNSUPPORTED.items():
        if getattr(req, field) not in defaults:
            hint = " (echo with logprobs returns the prompt's)" if field == "prompt_logprobs" \
                else ""
            raise bad_request(f"{field} is not supported by this server{hint}", field)
    if req.ignored_fields():
        logger.debug("ignoring unknown request fields: %s", ", ".join(req.ignored_fields()))
    params: dict[str, Any] = {}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    for field, key in _DIRECT.items():
        value = getattr(req, field)
        if value is not None:
            params[key] = value
    if req.top_k == 0:
        params["top_k"] = -1  # OpenAI-style 0 means "no top-k"; SGLang spells it -1
    params.update(structured_output_params(req, tool_constraint))
    return SamplingParams(**params)
