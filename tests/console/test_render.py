"""console/render.py: how bodies are shown."""

from __future__ import annotations

import base64

from console.render import hex_preview, preview, render_body


def test_text_is_left_for_the_template_to_escape():
    body = render_body("<b>hi</b>", "text/plain")
    assert (body.kind, body.text, body.size) == ("text", "<b>hi</b>", 9)


def test_json_is_pretty_printed_with_or_without_content_type():
    assert render_body('{"a":[1,2]}', "").text == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert render_body('{"a":1}', "application/vnd.x+json").kind == "json"
    assert render_body("42", "").kind == "text"  # a bare number stays text
    assert render_body("{not json", "application/json").kind == "text"


def test_binary_is_size_and_hex():
    raw = bytes(range(256)) + bytes(44)
    body = render_body(base64.b64encode(raw).decode(), "application/octet-stream")
    assert (body.kind, body.size, body.truncated) == ("binary", 300, True)
    assert body.text.splitlines()[1].startswith("00000010  10 11 12")
    assert len(body.text.splitlines()) == 16  # 256 bytes shown
    assert render_body("not base64!", "application/octet-stream").kind == "text"


def test_hex_preview_shows_printable_ascii():
    assert hex_preview(b"AB\x00") == "00000000  41 42 00" + " " * 39 + "  AB."


def test_preview_is_one_short_line():
    assert preview("a\n  b", "") == "a b"
    assert len(preview("x" * 500, "")) == 80
    assert preview(base64.b64encode(b"\x00\x01").decode(), "image/png") == "(binary, 2 bytes)"
