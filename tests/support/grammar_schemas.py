"""JSON schemas exercising every feature structured outputs must handle."""

from __future__ import annotations

from typing import Any

_STR = {"type": "string", "maxLength": 8}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {"type": "object", "properties": {"name": _STR, "age": {"type": "integer"}},
                    "required": ["name", "age"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"a": {"type": "integer"}, "b": _STR},
                        "required": ["a"], "additionalProperties": False},
    "nested_object": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "name": _STR},
                 "required": ["id", "name"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_min_max": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"k": _STR}, "required": ["k"],
        "additionalProperties": False}},
    "string_enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                    "required": ["color"], "additionalProperties": False},
    "integer_enum": {"enum": [1, 2, 3, 42]},
    "const_value": {"type": "object", "properties": {"v": {"const": "fixed"}}, "required": ["v"],
                    "additionalProperties": False},
    "string_pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"], "additionalProperties": False},
    "string_format_date": {"type": "object", "properties": {
        "when": {"type": "string", "format": "date"}}, "required": ["when"],
        "additionalProperties": False},
    "string_format_uuid": {"type": "object", "properties": {
        "id": {"type": "string", "format": "uuid"}}, "required": ["id"],
        "additionalProperties": False},
    "string_length": {"type": "string", "minLength": 2, "maxLength": 5},
    "integer_bounds": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 17}}, "required": ["n"],
        "additionalProperties": False},
    "number_bounds": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"],
        "additionalProperties": False},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "boolean_and_null": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "none": {"type": "null"}}, "required": ["ok", "none"],
        "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]}},
        "required": ["value"], "additionalProperties": False},
    "ref_defs": {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"],
        "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/point"},
                                         "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"], "additionalProperties": False},
    "nullable_type_list": {"type": "object", "properties": {"v": {"type": ["integer", "null"]}},
                           "required": ["v"], "additionalProperties": False},
    "one_of_objects": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "n": {"type": "integer"}},
         "required": ["kind", "n"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "b"}, "s": _STR},
         "required": ["kind", "s"], "additionalProperties": False}]},
    "array_tuple_prefix": {"type": "array", "prefixItems": [{"type": "integer"}, _STR],
                           "items": False, "minItems": 2},
    "deep_nesting": {"type": "object", "properties": {"l1": {"type": "object", "properties": {
        "l2": {"type": "object", "properties": {"l3": {"type": "array", "maxItems": 2,
                                                       "items": {"type": "boolean"}}},
               "required": ["l3"], "additionalProperties": False}},
        "required": ["l2"], "additionalProperties": False}},
        "required": ["l1"], "additionalProperties": False},
}
