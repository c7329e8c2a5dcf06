"""Prompt tokens of tool definitions (OpenAI cookbook's formula) and of JSON schemas.

Whatever the shape of the input, these return a count: what the formula cannot read is counted
as its compact JSON text, which costs more tokens than OpenAI's own rendering of it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relay.metering.encodings import O200K, count_tokens


@dataclass(frozen=True)
class ToolFormula:
    """"How to count tokens with tiktoken", num_tokens_for_tools(), as measured against the API."""
    func_init: int      # per function
    prop_init: int = 3  # once, before a function's properties
    prop_key: int = 3   # per property
    enum_init: int = -3  # per property with an enum
    enum_item: int = 3  # per enum item, besides its tokens
    func_end: int = 12  # once, after the list


# 7 for gpt-4o / gpt-4o-mini, 10 for gpt-3.5-turbo / gpt-4: keyed by their encodings, so later
# o200k models take the gpt-4o constants.
FORMULAS = {O200K: ToolFormula(func_init=7)}
DEFAULT_FORMULA = ToolFormula(func_init=10)

_PROPERTY_KEYS = frozenset(("type", "description", "enum"))  # what the formula's line covers
_NESTED_SCHEMA_KEYS = ("$defs", "definitions")
MAX_JSON_NODES = 100_000


def tools_tokens(tools: Any, encoding: str) -> int:
    """Tokens of a request's `tools` (Chat or Responses shape) or legacy `functions`."""
    if tools is None or tools == []:
        return 0
    formula = FORMULAS.get(encoding, DEFAULT_FORMULA)
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        return count_tokens(json_text(tools), encoding)
    return sum(_tool_tokens(tool, formula, encoding) for tool in tools) + formula.func_end


def _tool_tokens(tool: Any, formula: ToolFormula, encoding: str) -> int:
    function = _function_of(tool)
    if function is None:  # built-in tools (web_search, file_search...) and shapes we do not know
        return formula.func_init + count_tokens(json_text(tool), encoding)
    name, description = _text(function.get("name")), _text(function.get("description"))
    total = formula.func_init + count_tokens(f"{name}:{description.removesuffix('.')}", encoding)
    return total + _parameters_tokens(function.get("parameters"), formula, encoding)


def _function_of(tool: Any) -> dict[str, Any] | None:
    """The {name, description, parameters} of a Chat tool, a Responses tool or a legacy function."""
    if not isinstance(tool, dict):
        return None
    inner = tool.get("function")
    if isinstance(inner, dict):
        return inner
    if tool.get("type", "function") == "function" and "name" in tool:
        return tool
    return None


def _parameters_tokens(parameters: Any, formula: ToolFormula, encoding: str) -> int:
    if parameters is None:
        return 0
    if not isinstance(parameters, dict):
        return count_tokens(json_text(parameters), encoding)
    nested = {key: parameters[key] for key in _NESTED_SCHEMA_KEYS if key in parameters}
    total = count_tokens(json_text(nested), encoding) if nested else 0
    properties = parameters.get("properties")
    if isinstance(properties, dict):
        if properties:
            total += formula.prop_init + sum(_property_tokens(key, value, formula, encoding)
                                             for key, value in properties.items())
    elif properties is not None:
        total += count_tokens(json_text(properties), encoding)
    return total


def _property_tokens(key: Any, prop: Any, formula: ToolFormula, encoding: str) -> int:
    total = formula.prop_key
    if not isinstance(prop, dict):
        return total + count_tokens(f"{_text(key)}::{json_text(prop)}", encoding)
    enum = prop.get("enum")
    if isinstance(enum, list):
        total += formula.enum_init + sum(formula.enum_item + count_tokens(_text(item), encoding)
                                         for item in enum)
    elif enum is not None:
        total += count_tokens(json_text(enum), encoding)
    description = _text(prop.get("description")).removesuffix(".")
    total += count_tokens(f"{_text(key)}:{_text(prop.get('type'))}:{description}", encoding)
    # Nested objects, arrays and unions are beyond the published formula: their JSON text.
    rest = {k: v for k, v in prop.items() if k not in _PROPERTY_KEYS}
    return total + (count_tokens(json_text(rest), encoding) if rest else 0)


def schema_tokens(schema: Any, encoding: str) -> int:
    """A response format's JSON schema, counted as its compact JSON text (an upper-ish bound)."""
    return count_tokens(json_text(schema), encoding) if schema else 0


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else json_text(value)


def json_text(value: Any) -> str:
    """Compact JSON of anything; past json's recursion limit, its keys and scalars joined."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (RecursionError, ValueError, TypeError):
        return " ".join(_scalars(value))


def _scalars(value: Any) -> list[str]:
    # Iterative, so that absurd nesting costs a loop, not the stack; capped in nodes visited.
    out: list[str] = []
    stack, visited = [value], 0
    while stack and visited < MAX_JSON_NODES:
        item = stack.pop()
        visited += 1
        if isinstance(item, dict):
            out.extend(str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None:
            out.append(str(item))
    return out
