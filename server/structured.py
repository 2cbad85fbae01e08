"""Structured outputs: the one place where OpenAI's ``response_format`` and vLLM's / SGLang's
``structured_outputs`` / ``guided_*`` / ``json_schema`` / ``regex`` / ``ebnf`` request fields
become sampling parameters.

The engine reads SGLang's sampling-parameter keys (``json_schema``: a JSON string,
``regex``, ``ebnf``, plus ``choice``: a list of strings and ``json_object``: true), see
``heteroserve.core.grammar.spec.spec_from_sampling_params``. Whether a constraint is
*enforced* is the engine's business: when its sampling parameters reject a key the request
fails with a 400 that names it. To support a new request field, map it here and nowhere else.
"""

from __future__ import annotations

import json
from typing import Any

from heteroserve.server.errors import bad_request
from heteroserve.server.protocol import SamplingFields


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as exc:
            raise bad_request(f"{param} is not valid JSON: {exc}", param) from None
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    raise bad_request(f"{param} must be a JSON schema object or string", param)


def _from_response_format(req: SamplingFields) -> dict[str, Any]:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.type == "json_schema":
        spec = fmt.json_schema or {}
        schema = spec.get("schema", spec.get("schema_"))
        if schema is None:
            raise bad_request("response_format.json_schema.schema is required",
                              "response_format.json_schema.schema")
        return {"json_schema": _schema_text(schema, "response_format.json_schema.schema")}
    raise bad_request(f"response_format type {fmt.type!r} is not supported",
                      "response_format.type")


def _from_structured_outputs(req: SamplingFields) -> dict[str, tuple[str, Any]]:
    """``structured_outputs``' constraints as ``{request field: (sampling key, value)}``."""
    so = req.structured_outputs
    if so is None:
        return {}
    for name in ("disable_additional_properties", "whitespace_pattern", "structural_tag"):
        if getattr(so, name) not in (None, False):
            raise bad_request(f"structured_outputs.{name} is not supported",
                              f"structured_outputs.{name}")
    found: dict[str, tuple[str, Any]] = {}
    if so.json_ is not None:
        found["structured_outputs.json"] = (
            "json_schema", _schema_text(so.json_, "structured_outputs.json"))
    for field, key in (("regex", "regex"), ("grammar", "ebnf")):
        value = getattr(so, field)
        if value is not None:
            if not value:
                raise bad_request(f"structured_outputs.{field} must not be empty",
                                  f"structured_outputs.{field}")
            found[f"structured_outputs.{field}"] = (key, value)
    if so.choice is not None:
        if not so.choice or not all(so.choice):
            raise bad_request("structured_outputs.choice must be a non-empty list of non-empty "
                              "strings", "structured_outputs.choice")
        found["structured_outputs.choice"] = ("choice", list(so.choice))
    if so.json_object:
        found["structured_outputs.json_object"] = ("json_object", True)
    return found


def structured_output_params(req: SamplingFields,
                             tool_constraint: dict[str, str] | None = None) -> dict[str, Any]:
    """The sampling-parameter entries that constrain ``req``'s output (empty when none);
    ``tool_constraint`` is the one ``tool_choice`` imposes (see ``tool_calls.plan``).

    Raises a 400 :class:`~heteroserve.server.errors.APIError` when more than one constraint
    is given or one is malformed (a schema that is not JSON, an empty choice list).
    """
    found: dict[str, tuple[str, Any]] = {}  # request field -> (sampling key, value)
    for key, value in (tool_constraint or {}).items():
        found["tool_choice"] = (key, value)
    for field, value in _from_response_format(req).items():
        found["response_format"] = (field, value)
    if req.json_schema is not None:
        found["json_schema"] = ("json_schema", _schema_text(req.json_schema, "json_schema"))
    if req.guided_json is not None:
        found["guided_json"] = ("json_schema", _schema_text(req.guided_json, "guided_json"))
    for field, key in (("regex", "regex"), ("guided_regex", "regex"), ("ebnf", "ebnf"),
                       ("guided_grammar", "ebnf")):
        value = getattr(req, field)
        if value is not None:
            if not value:
                raise bad_request(f"{field} must not be empty", field)
            found[field] = (key, value)
    if req.guided_choice is not None:
        if not req.guided_choice or not all(req.guided_choice):
            raise bad_request("guided_choice must be a non-empty list of non-empty strings",
                              "guided_choice")
        found["guided_choice"] = ("choice", list(req.guided_choice))
    found.update(_from_structured_outputs(req))
    if len(found) > 1:
        raise bad_request(f"give at most one output constraint, got {', '.join(sorted(found))}",
                          sorted(found)[1])
    return {key: value for key, value in found.values()}
