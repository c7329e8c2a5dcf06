"""The prompt tokens of a Chat Completions or Responses request, text, image and audio apart.

Pure and total: any JSON body gets an estimate; what the formulas cannot read is counted as text."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from relay.metering.audio import audio_tokens
from relay.metering.encodings import count_tokens, encoding_for
from relay.metering.images import image_tokens
from relay.metering.tools import MAX_JSON_NODES, json_text, schema_tokens, tools_tokens

# OpenAI's published formula for chat prompts (cookbook, "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Not published: a tool call's name and arguments plus this much framing. One user measured 40,
# 89 and 114 prompt tokens on gpt-3.5-turbo for 1, 2 and 3 call/result pairs; this counts 43, 70
# and 97 (the jump at the second pair is unexplained). Settlement uses the upstream's usage anyway.
TOKENS_PER_TOOL_CALL = 7

TEXT_PARTS = frozenset(("text", "input_text", "output_text", "summary_text", "reasoning_text"))
IMAGE_PARTS = frozenset(("image_url", "input_image"))
FILE_PARTS = frozenset(("file", "input_file"))


@dataclass(frozen=True)
class PromptEstimate:
    text: int
    image: int = 0
    audio: int = 0

    @property
    def total(self) -> int:
        return self.text + self.image + self.audio


class _Tally:
    __slots__ = ("model", "encoding", "text", "image", "audio")

    def __init__(self, model: str, encoding: str):
        self.model, self.encoding = model, encoding
        self.text = self.image = self.audio = 0

    def add_text(self, text: str) -> None:
        self.text += count_tokens(text, self.encoding)

    def estimate(self) -> PromptEstimate:
        return PromptEstimate(self.text, self.image, self.audio)


def count_chat_request(body: Any, model: str, encodings: Mapping[str, str] | None = None) -> PromptEstimate:
    """A /chat/completions body: messages, tools or functions, and a response_format schema."""
    tally = _Tally(model, encoding_for(model, encodings))
    tally.text += REPLY_PRIMING
    if not isinstance(body, dict):
        return tally.estimate()
    for message in _as_list(body.get("messages")):
        _message(tally, message)
    _tools(tally, body.get("tools"), body.get("functions"))
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        tally.text += schema_tokens(response_format.get("json_schema"), tally.encoding)
    return tally.estimate()


def count_responses_request(body: Any, model: str, encodings: Mapping[str, str] | None = None) -> PromptEstimate:
    """A /responses body: instructions, input (a string or items), tools and a text.format schema.

    A previous_response_id's stored conversation is not in the body and is not counted."""
    tally = _Tally(model, encoding_for(model, encodings))
    tally.text += REPLY_PRIMING
    if not isinstance(body, dict):
        return tally.estimate()
    instructions = body.get("instructions")
    if instructions:
        _message(tally, {"role": "developer", "content": instructions})
    items = body.get("input")
    if isinstance(items, list):
        for item in items:
            _item(tally, item)
    elif items is not None:  # a string: one user message
        _message(tally, {"role": "user", "content": items})
    _tools(tally, body.get("tools"), None)
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        tally.text += schema_tokens({k: v for k, v in fmt.items() if k != "type"}, tally.encoding)
    return tally.estimate()


def count_moderation_input(value: Any, model: str, encodings: Mapping[str, str] | None = None) -> PromptEstimate:
    """A /moderations ``input``: a string, strings, or text and image parts (no message framing)."""
    tally = _Tally(model, encoding_for(model, encodings))
    _content(tally, value)
    return tally.estimate()


def count_messages(messages: Iterable[Any], model: str = "", encoding: str | None = None) -> PromptEstimate:
    """Chat messages alone, with the reply's priming."""
    tally = _Tally(model, encoding or encoding_for(model))
    tally.text += REPLY_PRIMING
    if isinstance(messages, (str, dict)) or not isinstance(messages, Iterable):
        messages = _as_list(messages)
    for message in messages:
        _message(tally, message)
    return tally.estimate()


def _message(tally: _Tally, message: Any) -> None:
    tally.text += TOKENS_PER_MESSAGE
    if not isinstance(message, dict):
        _other(tally, message)
        return
    tally.text += _role_tokens(message.get("role"), tally.encoding)
    _content(tally, message.get("content"))
    name = message.get("name")
    if name:
        tally.text += TOKENS_PER_NAME + count_tokens(_str(name), tally.encoding)
    refusal = message.get("refusal")
    if refusal:
        tally.add_text(_str(refusal))
    calls = message.get("tool_calls")
    if calls:
        _tool_calls(tally, calls)
    legacy_call = message.get("function_call")
    if legacy_call:
        _tool_calls(tally, [{"function": legacy_call}])


def _role_tokens(role: Any, encoding: str) -> int:
    if isinstance(role, str) and len(role) <= 32:  # a handful of roles; a client's essay is not cached
        return _cached_tokens(role, encoding)
    return count_tokens(_str(role), encoding)


_cached_tokens = lru_cache(maxsize=64)(count_tokens)


def _content(tally: _Tally, content: Any) -> None:
    if isinstance(content, str):
        tally.add_text(content)
    elif isinstance(content, list):
        for part in content:
            _part(tally, part)
    elif content is not None:
        _other(tally, content)


def _part(tally: _Tally, part: Any) -> None:
    if isinstance(part, str):
        tally.add_text(part)
        return
    if not isinstance(part, dict):
        _other(tally, part)
        return
    kind = part.get("type")
    kind = kind if isinstance(kind, str) else None  # a list here must not reach a set lookup
    text = part.get("text")
    if kind in TEXT_PARTS or (kind is None and isinstance(text, str)):
        tally.add_text(_str(text))
    elif kind in IMAGE_PARTS:
        _image(tally, part)
    elif kind == "input_audio":
        audio = part.get("input_audio")
        if isinstance(audio, dict):
            tally.audio += audio_tokens(audio.get("data"), audio.get("format"))
    elif kind in FILE_PARTS:
        # Only the name: what a file's pages cost is not knowable without reading the file.
        file = part.get("file")
        inner = file if isinstance(file, dict) else part
        tally.add_text(_str(inner.get("filename")))
    elif kind == "refusal":
        tally.add_text(_str(part.get("refusal")))
    else:
        _other(tally, part)


def _image(tally: _Tally, part: dict[str, Any]) -> None:
    ref, detail = part.get("image_url"), part.get("detail", "auto")
    if isinstance(ref, dict):
        detail = ref.get("detail", detail)
        ref = ref.get("url")
    # A file_id or a missing URL is an image of unknown size: image_tokens counts the maximum.
    tally.image += image_tokens(tally.model, ref, detail)


def _tool_calls(tally: _Tally, calls: Any) -> None:
    for call in calls if isinstance(calls, list) else [calls]:
        inner = None
        if isinstance(call, dict):
            inner = call.get("function") if isinstance(call.get("function"), dict) else call.get("custom")
        if isinstance(inner, dict):
            _call(tally, inner.get("name"), inner.get("arguments", inner.get("input")))
        else:
            tally.text += TOKENS_PER_TOOL_CALL
            _other(tally, call)


def _call(tally: _Tally, name: Any, arguments: Any) -> None:
    tally.text += TOKENS_PER_TOOL_CALL + count_tokens(_str(name), tally.encoding)
    tally.add_text(_str(arguments))


def _item(tally: _Tally, item: Any) -> None:
    """One item of a Responses input list."""
    if not isinstance(item, dict):
        _message(tally, item)
        return
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        _message(tally, item)
    elif kind in ("function_call", "custom_tool_call"):
        tally.text += TOKENS_PER_MESSAGE
        _call(tally, item.get("name"), item.get("arguments", item.get("input")))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        _message(tally, {"role": "tool", "content": item.get("output")})
    elif kind == "reasoning":
        # The summary is readable; encrypted_content is not and is not counted.
        tally.text += TOKENS_PER_MESSAGE
        _content(tally, item.get("summary"))
    elif kind != "item_reference":  # a reference's item is stored upstream, out of sight
        tally.text += TOKENS_PER_MESSAGE
        _other(tally, item)


def _other(tally: _Tally, value: Any) -> None:
    """A shape no formula covers: its keys and strings as text, except embedded images."""
    words: list[str] = []
    stack, visited = [value], 0
    while stack and visited < MAX_JSON_NODES:  # iterative: absurd nesting costs a loop, not the stack
        item = stack.pop()
        visited += 1
        if isinstance(item, dict):
            words.extend(k if isinstance(k, str) else str(k) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item.startswith("data:image/"):
            tally.image += image_tokens(tally.model, item, "auto")
        elif item is not None:
            words.append(item if isinstance(item, str) else json_text(item))
    tally.add_text(" ".join(words))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [] if value is None else [value]


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else json_text(value)


def _tools(tally: _Tally, tools: Any, functions: Any) -> None:
    if tools is not None or functions is not None:
        tally.text += tools_tokens(tools, tally.encoding) + tools_tokens(functions, tally.encoding)
