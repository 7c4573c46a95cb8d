"""How a message body is shown: text escaped (by the template), JSON pretty-printed, binary as
its size and a hex preview. Nothing here marks anything safe; templates autoescape all of it."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

HEX_PREVIEW_BYTES = 256
TEXT_PREVIEW_CHARS = 100_000
TEXTUAL = ("text/", "application/json", "application/xml", "application/javascript")


@dataclass
class RenderedBody:
    kind: str  # "text", "json" or "binary"
    text: str  # what to show (escaped by the template)
    size: int  # bytes
    truncated: bool = False


def render_body(body: str, content_type: str) -> RenderedBody:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype and not ctype.startswith(TEXTUAL) and not ctype.endswith(("+json", "+xml")):
        raw = _base64(body)
        if raw is not None:  # binary travels as base64 with its content_type (docs/API.md)
            return RenderedBody("binary", hex_preview(raw), len(raw), len(raw) > HEX_PREVIEW_BYTES)
    size = len(body.encode("utf-8", "surrogatepass"))
    pretty = _pretty_json(body) if ctype in ("", "application/json") or ctype.endswith("+json") else None
    if pretty is not None:
        return RenderedBody("json", pretty[:TEXT_PREVIEW_CHARS], size, len(pretty) > TEXT_PREVIEW_CHARS)
    return RenderedBody("text", body[:TEXT_PREVIEW_CHARS], size, len(body) > TEXT_PREVIEW_CHARS)


def _base64(body: str) -> bytes | None:
    try:
        return base64.b64decode(body.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _pretty_json(body: str) -> str | None:
    stripped = body.strip()
    if not stripped or stripped[0] not in "[{":
        return None  # a bare word or number is shown as text
    try:
        return json.dumps(json.loads(stripped), indent=2, ensure_ascii=False, sort_keys=False)
    except ValueError:
        return None


def hex_preview(raw: bytes) -> str:
    """Classic hex dump lines: offset, 16 bytes in hex, and their printable ASCII."""
    lines = []
    for offset in range(0, min(len(raw), HEX_PREVIEW_BYTES), 16):
        chunk = raw[offset : offset + 16]
        ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {chunk.hex(' '):<47}  {ascii_}")
    return "\n".join(lines)


def preview(body: str, content_type: str, limit: int = 80) -> str:
    """One line for the browse list."""
    rendered = render_body(body, content_type)
    if rendered.kind == "binary":
        return f"(binary, {rendered.size} bytes)"
    flat = " ".join(body.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
