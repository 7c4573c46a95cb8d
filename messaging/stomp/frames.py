"""STOMP 1.0/1.1/1.2 frames: an incremental parser with a size limit, and a renderer.

Frames arrive over WebSocket messages, but STOMP does not promise one frame per message (stompjs
may split a large frame, and heart-beats are bare end-of-lines), so the parser is a byte stream
parser. It keeps at most `max_frame_bytes` of an unfinished frame: a frame that would be larger
is refused as soon as that is known, never buffered whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLIENT_COMMANDS = frozenset(
    {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT", "DISCONNECT"}
)
MAX_HEADERS = 100
MAX_HEADER_LINE_BYTES = 16 * 1024

_UNESCAPE = {"\\\\": "\\", "\\n": "\n", "\\c": ":", "\\r": "\r"}
_ESCAPE = {"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"}


class FrameError(Exception):
    """A malformed frame: the connection gets an ERROR frame and is closed."""


class FrameTooLarge(FrameError):
    """A frame over the size limit."""


@dataclass
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)


def _unescape(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        pair = value[i : i + 2]
        if pair not in _UNESCAPE:
            raise FrameError(f"Undefined escape sequence {pair!r} in a header.")
        out.append(_UNESCAPE[pair])
        i += 2
    return "".join(out)


def escape(value: str) -> str:
    return "".join(_ESCAPE.get(ch, ch) for ch in value)


class Parser:
    """Feed it bytes, get whole frames. `escapes` turns on 1.1/1.2 header escaping (set once
    the version is negotiated; CONNECT itself is never escaped)."""

    def __init__(self, *, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.escapes = False
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            self._skip_heartbeats()
            frame = self._take_frame()
            if frame is None:
                break
            frames.append(frame)
        if len(self._buffer) > self.max_frame_bytes:
            raise FrameTooLarge(f"Frame larger than {self.max_frame_bytes} bytes.")
        return frames

    def _skip_heartbeats(self) -> None:
        i = 0
        while i < len(self._buffer) and self._buffer[i] in (0x0A, 0x0D):
            i += 1
        if i:
            del self._buffer[:i]

    def _take_frame(self) -> Frame | None:
        end_of_headers = self._buffer.find(b"\n\n")
        crlf = self._buffer.find(b"\r\n\r\n")
        if crlf != -1 and (end_of_headers == -1 or crlf < end_of_headers):
            head, body_start = bytes(self._buffer[:crlf]), crlf + 4
        elif end_of_headers != -1:
            head, body_start = bytes(self._buffer[:end_of_headers]), end_of_headers + 2
        else:
            if len(self._buffer) > MAX_HEADERS * MAX_HEADER_LINE_BYTES:
                raise FrameTooLarge("Frame headers too large.")
            return None
        command, headers = self._parse_head(head)
        body_end = self._body_end(headers, body_start)
        if body_end is None:
            if "content-length" in headers and body_start + int(headers["content-length"]) > self.max_frame_bytes:
                raise FrameTooLarge(f"Frame larger than {self.max_frame_bytes} bytes.")
            return None
        if body_end + 1 > self.max_frame_bytes:
            raise FrameTooLarge(f"Frame larger than {self.max_frame_bytes} bytes.")
        body = bytes(self._buffer[body_start:body_end])
        del self._buffer[: body_end + 1]
        return Frame(command, headers, body)

    def _body_end(self, headers: dict[str, str], body_start: int) -> int | None:
        """Index of the NUL that ends the body, or None while it has not arrived."""
        length = headers.get("content-length")
        if length is None:
            nul = self._buffer.find(b"\x00", body_start)
            return None if nul == -1 else nul
        if not length.isdigit() or len(length) > 12:
            raise FrameError("content-length must be a non-negative integer.")
        end = body_start + int(length)
        if len(self._buffer) <= end:
            return None
        if self._buffer[end] != 0:
            raise FrameError("Frame body is longer than its content-length (no NUL after it).")
        return end

    def _parse_head(self, head: bytes) -> tuple[str, dict[str, str]]:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("Frame command and headers must be UTF-8.") from None
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        command = lines[0]
        if command not in CLIENT_COMMANDS:
            raise FrameError(f"Unknown command {command[:40]!r}.")
        if len(lines) - 1 > MAX_HEADERS:
            raise FrameError(f"At most {MAX_HEADERS} headers per frame.")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name:
                raise FrameError(f"Malformed header line {line[:40]!r}.")
            if self.escapes and command not in ("CONNECT", "STOMP"):
                name, value = _unescape(name), _unescape(value)
            headers.setdefault(name, value)  # a repeated header: the first one counts
        return command, headers


def render(command: str, headers: dict[str, str], body: bytes = b"", *, escapes: bool = True) -> bytes:
    """One frame, with content-length whenever there is a body."""
    lines = [command]
    esc = escapes and command != "CONNECTED"
    for name, value in headers.items():
        lines.append(f"{escape(name)}:{escape(value)}" if esc else f"{name}:{value}")
    if body:
        lines.append(f"content-length:{len(body)}")
    return ("\n".join(lines) + "\n\n").encode("utf-8") + body + b"\x00"
