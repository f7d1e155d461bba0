"""containerd's filter syntax, as sent in ListSnapshotsRequest.filters.

A filter string is comma-separated selectors, all of which must match (AND); separate strings are ORed.
A selector is ``fieldpath [op value]``: fields are ``[-_A-Za-z0-9]+`` or double-quoted and joined by ``.``;
operators are ``==``, ``!=`` and ``~=`` (regular-expression search); without an operator the selector
tests that the field is present. Values are quoted (``"…"``, ``/…/`` or ``|…|`` with Go escapes) or
a run of characters other than whitespace and commas. Snapshot fields: ``name``, ``parent``, ``kind``
(``active``, ``view``, ``committed``) and ``labels.<key>``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import NoReturn

from snapshotter.errors import InvalidArgument
from snapshotter.store import Kind, Snapshot

_QUOTES = '"/|'
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_NUMERIC_ESCAPES = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
_DIGITS = {8: set("01234567"), 16: set("0123456789abcdefABCDEF")}
_FIELD = re.compile(r"[-_A-Za-z0-9]+")
_VALUE = re.compile(r"[^\s,]+")
_OPERATOR = re.compile(r"==|!=|~=")

Match = Callable[[Snapshot], bool]


@dataclasses.dataclass(frozen=True)
class Selector:
    """One ``fieldpath op value`` test; ``operator`` is empty for a presence test."""

    fieldpath: tuple[str, ...]
    operator: str
    value: str

    def matches(self, snapshot: Snapshot) -> bool:
        """Whether *snapshot* satisfies this selector (an absent field compares as "" for ``!=``)."""
        found = snapshot_field(snapshot, self.fieldpath)
        if self.operator == "":
            return found is not None
        if self.operator == "!=":
            return (found or "") != self.value
        if found is None:
            return False
        if self.operator == "==":
            return found == self.value
        return re.search(self.value, found) is not None


def snapshot_field(snapshot: Snapshot, fieldpath: Sequence[str]) -> str | None:
    """The value a filter sees at *fieldpath*, or None when the field is absent."""
    head, rest = fieldpath[0], fieldpath[1:]
    if head == "labels":
        return snapshot.labels.get(".".join(rest)) if rest else None
    if rest:
        return None
    return {"name": snapshot.key, "parent": snapshot.parent, "kind": _KIND_NAMES[snapshot.kind]}.get(head)


_KIND_NAMES = {Kind.VIEW: "view", Kind.ACTIVE: "active", Kind.COMMITTED: "committed"}


def compile_filters(filters: Sequence[str]) -> Match:
    """A predicate true for snapshots matching any of *filters* (all snapshots when there are none)."""
    alternatives = [parse(text) for text in filters]
    if not alternatives:
        return lambda _snapshot: True
    return lambda snapshot: any(all(s.matches(snapshot) for s in selectors) for selectors in alternatives)


def parse(text: str) -> list[Selector]:
    """The selectors of one filter string (none for the empty string); InvalidArgument when malformed."""
    parser = _Parser(text)
    if parser.at_end():
        return []
    selectors = [parser.selector()]
    while parser.take(","):
        selectors.append(parser.selector())
    if not parser.at_end():
        parser.fail("expected ',' or end of filter")
    return selectors


class _Parser:
    """A cursor over one filter string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str) -> NoReturn:
        raise InvalidArgument(f"filter {self.text!r}: {message} at offset {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def take(self, literal: str) -> bool:
        self.skip_space()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def selector(self) -> Selector:
        fieldpath = [self.field()]
        while self.take("."):
            fieldpath.append(self.field())
        self.skip_space()
        operator = _OPERATOR.match(self.text, self.pos)
        if operator is None:
            return Selector(tuple(fieldpath), "", "")
        self.pos = operator.end()
        value = self.value()
        if operator.group() == "~=":
            self.check_regex(value)
        return Selector(tuple(fieldpath), operator.group(), value)

    def field(self) -> str:
        self.skip_space()
        if self.text.startswith('"', self.pos):
            return self.quoted()
        return self.token(_FIELD, "expected a field name or a quoted field")

    def value(self) -> str:
        self.skip_space()
        if self.pos < len(self.text) and self.text[self.pos] in _QUOTES:
            return self.quoted()
        return self.token(_VALUE, "expected a value")

    def token(self, pattern: re.Pattern[str], message: str) -> str:
        found = pattern.match(self.text, self.pos)
        if found is None:
            self.fail(message)
        self.pos = found.end()
        return found.group()

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            char = self.text[self.pos]
            self.pos += 1
            out.append(self.escape(quote) if char == "\\" else char)
        if self.pos >= len(self.text):
            self.fail("unterminated quoted string")
        self.pos += 1
        return "".join(out)

    def escape(self, quote: str) -> str:
        """The character of the escape sequence after a backslash (Go syntax)."""
        char = self.text[self.pos : self.pos + 1]
        if char == quote or char in _SIMPLE_ESCAPES:
            self.pos += 1
            return quote if char == quote else _SIMPLE_ESCAPES[char]
        base, width = _NUMERIC_ESCAPES.get(char, (8, 3))
        start = self.pos if base == 8 else self.pos + 1
        digits = self.text[start : start + width]
        if len(digits) != width or not set(digits) <= _DIGITS[base]:
            self.fail(f"illegal escape sequence \\{char}")
        code = int(digits, base)
        if code > 0x10FFFF:
            self.fail(f"escape sequence \\{char} out of range")
        self.pos = start + width
        return chr(code)

    def check_regex(self, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as exc:
            self.fail(f"bad regular expression {pattern!r}: {exc}")
