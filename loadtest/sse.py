"""Server-sent events, decoded incrementally from the bytes of an HTTP body (the WHATWG event-stream rules).

Bytes arrive cut anywhere (inside a line, inside a UTF-8 character, between the CR and LF of a line end);
``SSEDecoder.feed`` returns the events completed so far. Lines end with LF, CRLF or CR; a blank line ends an
event; ``data`` lines of one event are joined with LF; lines starting with ``:`` are comments; one space after
the field's colon is dropped; an event with no data is not dispatched.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._skip_lf = False  # the last chunk ended in CR: a leading LF of the next one ends nothing

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._text.decode(chunk)
        if self._skip_lf and text:
            text = text.removeprefix("\n")
            self._skip_lf = False
        self._buffer += text
        events = []
        while True:
            cut = min((i for i in (self._buffer.find("\r"), self._buffer.find("\n")) if i >= 0), default=-1)
            if cut < 0:
                break
            line = self._buffer[:cut]
            end = cut + 1
            if self._buffer[cut] == "\r":
                if cut + 1 < len(self._buffer):
                    end += self._buffer[cut + 1] == "\n"
                else:
                    self._skip_lf = True  # CR at the end of what we have: the LF may come next
            self._buffer = self._buffer[end:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent("\n".join(self._data), self._event or "message", self._id)
        self._data, self._event = [], ""
        return event
