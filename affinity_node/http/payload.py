"""The few fields of a request body the proxy acts on, read without building the rest.

Chat bodies carry 2-200 KB of messages the proxy never looks at. msgspec checks the whole body
is one well-formed JSON object while keeping each top-level value as an undecoded slice (`Raw`);
`model` and `stream` are decoded from theirs, anything else only when asked (`get`), and the
body itself is forwarded as received.

That check is one pass over every byte, and msgspec's pass was the node's main cost per KB
beyond a bare forwarder (~0.4 us/KB). From `SIMD_FROM` bytes on, simdjson checks the body first
(SIMD, ~3x faster at 200 KB): a body it accepts as one object with no key twice is served from
its parse (top-level arrays are still read through msgspec, when asked). Anything else (not an
object, a repeated key, a number beyond 64 bits, invalid UTF-8 anywhere, a leading BOM, nesting
past 1024) goes through msgspec as before, so every refusal and every value read is the one
msgspec gives. One known difference: simdjson nests to 1024 levels, msgspec to Python's
recursion limit (~950 in a handler); a body between the two is now forwarded, and the backend
judges it, as it judges everything inside values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, overload

import msgspec
import simdjson

from affinity_node.http.errors import ApiError

MAX_MODEL_LEN = 256
SIMD_FROM = 16 * 1024
"""Bodies from this size on are checked by simdjson first; below it msgspec is as fast (a
parser's setup costs ~1 us) and a tiny request pays nothing new."""
_OBJECT_START = re.compile(rb"[ \t\n\r]*\{")

_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ANY = msgspec.json.Decoder()
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])
_OPEN_BRACKET = ord("[")
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
"""A value inside a well-formed body can still fail to decode: invalid UTF-8, deep nesting."""
_WS = rb"[ \t\n\r]*"
_NAME = rb'"((?:[^"\\]|\\.)*)"' + _WS + rb":" + _WS
_FIRST_KEY = re.compile(_WS + rb"\{" + _WS + _NAME)
_NEXT_KEY = re.compile(_WS + rb"," + _WS + _NAME)
_END = re.compile(_WS + rb"\}" + _WS + rb"\Z")
_STREAM_VALUES = {b"true": True, b"false": False, b"null": False}


def _invalid_json(message: str = "The body is not valid JSON.") -> ApiError:
    return ApiError(400, message, "invalid_request_error", None, "invalid_json")


def _decode(raw: msgspec.Raw) -> Any:
    try:
        return _ANY.decode(raw)
    except _UNREADABLE:
        return None


class LazyList(Sequence[Any]):
    """A JSON array whose elements are decoded when read (a conversation key reads the first
    few messages of hundreds); an element that cannot be decoded reads as None."""

    def __init__(self, items: list[msgspec.Raw]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [_decode(item) for item in self._items[index]]
        return _decode(self._items[index])

    def __iter__(self) -> Iterator[Any]:
        return (_decode(item) for item in self._items)


class Payload:
    """A request body: its bytes, its top-level values undecoded, `model` and `stream`."""

    __slots__ = ("_fields_", "_model_at", "_values", "body", "model", "stream")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._model_at = -2  # not looked for yet
        self._fields_: dict[str, msgspec.Raw] | None = None
        self._values = _simd_values(body) if len(body) >= SIMD_FROM else None
        """simdjson's top-level values (arrays: `_ARRAY`, read through msgspec when asked)."""
        if self._values is not None:
            self.model = _checked_model(self._values.get("model"))
            self.stream = _checked_stream(self._values.get("stream"))
            return
        fields = self._fields_ = _decode_top(body)
        if len(body) != _compact_size(fields):
            self._model_at = _check_unique_keys(body, fields)
        self.model = _model(fields.get("model"))
        self.stream = _stream(fields.get("stream"))

    def _fields(self) -> dict[str, msgspec.Raw]:
        """The top-level values as msgspec slices: decoded on first need after simdjson, where
        only a model rewrite needs them (aliases: one more pass, then as before)."""
        if self._fields_ is None:
            self._fields_ = _decode_top(self.body)
        return self._fields_

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level value, decoded now (arrays lazily, see LazyList); `default` when it is
        absent or cannot be decoded (the backend will say what is wrong with it)."""
        if self._values is not None:
            value = self._values.get(key, default)
            if value is not _ARRAY:
                return value
        raw = self._fields().get(key)
        if raw is None:
            return default
        try:
            if memoryview(raw)[0] == _OPEN_BRACKET:
                return LazyList(_ELEMENTS.decode(raw))
            return _ANY.decode(raw)
        except _UNREADABLE:
            return default

    def __contains__(self, key: str) -> bool:
        if self._values is not None:
            return key in self._values
        return key in self._fields()

    def with_model(self, model: str) -> bytes:
        """The body with another model name: the value's bytes swapped, the rest as received."""
        if model == self.model:
            return self.body
        if self._model_at == -2:
            self._model_at = _check_unique_keys(self.body, self._fields())
        start = self._model_at
        end = start + len(self._fields()["model"])
        view = memoryview(self.body)  # one copy of the body, not three (slices, then +)
        return b"".join((view[:start], json.dumps(model).encode(), view[end:]))


_PARSER = simdjson.Parser()
"""One parser for every body, its buffers kept warm: a parser per request allocates ~3x the
body (slower than msgspec at 200 KB). No proxy into its document outlives `_simd_values`."""
_ARRAY: Any = object()
"""A top-level array: read when asked, through msgspec (one element at a time)."""


def _simd_values(body: bytes) -> dict[str, Any] | None:
    """The top-level values of a body simdjson accepts as one object with no key twice, as
    msgspec would decode them (arrays left as `_ARRAY`); None when msgspec must judge the body:
    whatever simdjson refuses, a leading BOM (it would skip it), a key listed twice (keys are
    listed up to a NUL, so `"a\\u0000b"` and `"a\\u0000c"` both read `"a"`)."""
    if _OBJECT_START.match(body) is None:
        return None
    global _PARSER
    try:
        doc = _PARSER.parse(body)
    except RuntimeError as exc:  # too deep, a number past 64 bits, or the parser is held
        if not str(exc).startswith("Tried to re-use"):
            return None
        _PARSER = simdjson.Parser()  # something kept a proxy: never stay on msgspec for it
        return None
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    try:
        if not isinstance(doc, simdjson.Object):
            return None
        values = {key: _plain(doc[key]) for key in doc}
        return values if len(values) == len(doc) else None
    except KeyError:  # a key listed up to its NUL is not found under that name
        return None
    finally:
        del doc  # the parser is reusable once no proxy points into its document


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Array):
        return _ARRAY
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    return value


def _decode_top(body: bytes) -> dict[str, msgspec.Raw]:
    try:
        return _TOP.decode(body)
    except msgspec.ValidationError:
        raise ApiError(400, "The body must be a JSON object.", "invalid_request_error") from None
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: nesting deeper than the decoder's stack.
        raise _invalid_json() from None


def _compact_size(fields: dict[str, msgspec.Raw]) -> int:
    """The length of these members written without whitespace, ASCII keys: a body of exactly
    this length holds no key twice (a repeated member would add at least 5 bytes: `,"":0`), so
    the walk is skipped for compact bodies, as most SDKs send them. A key that is not ASCII or
    was escaped is longer in the body than counted here: that body is walked."""
    if not fields:
        return 2
    return 1 + sum(map(len, fields)) + sum(map(len, fields.values())) + 4 * len(fields)


def _check_unique_keys(body: bytes, fields: dict[str, msgspec.Raw]) -> int:
    """Walks the top level of a body the decoder accepted: each key must be followed by the
    value the decoder kept for it (the last one given), and there must be no more keys than
    it kept. One regex match per key. Returns where the model's value starts (-1: none)."""
    model_at = -1
    key = _FIRST_KEY.match(body)
    seen = pos = 0
    while key is not None:
        name_bytes = key.group(1)
        name = json.loads(b'"' + name_bytes + b'"') if b"\\" in name_bytes else name_bytes.decode()
        pos = key.end()
        raw = fields.get(name)
        seen += 1
        if raw is None or seen > len(fields) or not body.startswith(raw, pos):
            raise _invalid_json("A JSON object in the body repeats a key.")
        if name == "model":
            model_at = pos
        pos += len(raw)
        key = _NEXT_KEY.match(body, pos)
    # No next key: the object must end here. (A number given earlier can start with the
    # digits of the last one: `{"a": 12, "a": 1}` stops inside the 12.)
    if seen and _END.match(body, pos) is None:
        raise _invalid_json("A JSON object in the body repeats a key.")
    return model_at


def _model(raw: msgspec.Raw | None) -> str:
    if raw is None:
        return _checked_model(None)
    try:
        model = _ANY.decode(raw)
    except _UNREADABLE:  # the slice is well-formed, but its text is not UTF-8
        raise _invalid_json() from None
    return _checked_model(model)


def _checked_model(model: Any) -> str:
    """`model` as decoded (None: absent or null)."""
    if model is None:
        raise ApiError(
            400,
            "Missing required parameter: 'model'.",
            "invalid_request_error",
            "model",
            "missing_required_parameter",
        )
    if not isinstance(model, str) or not model:
        raise ApiError(
            400,
            "'model' must be a non-empty string.",
            "invalid_request_error",
            "model",
            "invalid_type",
        )
    if len(model) > MAX_MODEL_LEN:
        raise ApiError(
            400,
            f"'model' is longer than {MAX_MODEL_LEN} characters.",
            "invalid_request_error",
            "model",
            "invalid_value",
        )
    return model


def _stream(raw: msgspec.Raw | None) -> bool:
    if raw is None:
        return False
    value = _STREAM_VALUES.get(bytes(raw))
    if value is None:
        raise _not_boolean()
    return value


def _checked_stream(value: Any) -> bool:
    """`stream` as decoded (absent: False)."""
    if value is None:
        return False
    if type(value) is not bool:
        raise _not_boolean()
    return value


def _not_boolean() -> ApiError:
    return ApiError(
        400, "'stream' must be a boolean.", "invalid_request_error", "stream", "invalid_type"
    )
