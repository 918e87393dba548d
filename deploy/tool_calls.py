"""Tool calls out of a chat choice's text: the Llama 3 JSON layout, {"name": ..., "parameters":
{...}} (Meta's own answers add "type": "function" first; "arguments" is read like "parameters"),
after an optional <|python_tag|>, several calls separated by ";" (vLLM's llama3_json reading).

ToolCallParser takes the text in any pieces (a stream's deltas, or the whole text at once) and
gives the same content and calls however it is cut, so a streamed answer's chunks add up to the
whole answer. Text that does not open with a call is content, streamed as it comes; a call is
given once its JSON object closes; text after the calls that is not another call is content.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 opens a tool call with it (written out when special tokens are)
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI's function.arguments carries it


@dataclass
class Parsed:
    """What a piece of text gave: content to send, and calls completed."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser:
    """One choice's text, fed in order, as content and tool calls. `names`: the request's
    functions (an object naming another is content); `parallel`: more than one call."""

    def __init__(self, names: frozenset[str], parallel: bool) -> None:
        self._names = names
        self._parallel = parallel
        self._mode = "start"  # start | call | between (after a call) | content
        self._text = ""  # held back: what may still turn out to be a call
        self._skip = 0  # chars of _text before the call's "{" (spaces, the python tag, separators)
        self._scan = _Scan()
        self.calls = 0  # calls given so far

    def feed(self, text: str) -> Parsed:
        self._text += text
        return self._advance(final=False)

    def finish(self) -> Parsed:
        """The end of the text: whatever is held back and is no whole call is content."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> Parsed:
        out = Parsed()
        while self._text:
            if self._mode == "content":
                out.content += self._text
                self._text = ""
            elif self._mode in ("start", "between"):
                rest = self._text.lstrip(_SPACE + (";" if self._mode == "between" else ""))
                if self._mode == "start" and rest.startswith(PYTHON_TAG):
                    rest = rest[len(PYTHON_TAG):].lstrip(_SPACE)
                if not final and (not rest or (self._mode == "start" and PYTHON_TAG.startswith(rest))):
                    break  # not yet known whether a call comes
                if rest.startswith("{") and (self._parallel or not self.calls):
                    self._mode, self._skip, self._scan = "call", len(self._text) - len(rest), _Scan()
                else:  # text: all of it from the start; after calls, without the separators
                    self._text = rest if self._mode == "between" else self._text
                    self._mode = "content"
            else:  # "call": a JSON object opened at _text[_skip]
                end = self._scan.end_of_object(self._text, self._skip)
                if end is None and not final:
                    break
                call = _call(self._text[self._skip:end], self._names) if end is not None else None
                if call is None:
                    self._mode = "content"  # not a call: it and all after it are text
                    continue
                out.calls.append(call)
                self.calls += 1
                self._text, self._mode = self._text[end:], "between"
        return out


class _Scan:
    """Finds where a JSON object closes, reading each char once however the text arrives."""

    def __init__(self) -> None:
        self.i = 0  # next char to read, from the object's "{"
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end_of_object(self, text: str, start: int) -> int | None:
        """The index in `text` just past the object that opens at text[start], or None if it
        has not closed yet."""
        while start + self.i < len(text):
            c = text[start + self.i]
            self.i += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return start + self.i
        return None


def _call(text: str, names: frozenset[str]) -> ParsedCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    if obj.get("type", "function") != "function":
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))
