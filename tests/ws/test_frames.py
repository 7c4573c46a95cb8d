"""The STOMP frame parser and renderer (no server needed)."""

from __future__ import annotations

import pytest

from messaging.stomp.frames import FrameError, FrameTooLarge, Parser, render


def parse(data: bytes, *, escapes: bool = True, limit: int = 10_000) -> list[tuple[str, dict[str, str], bytes]]:
    parser = Parser(max_frame_bytes=limit)
    parser.escapes = escapes
    return [(f.command, f.headers, f.body) for f in parser.feed(data)]


def test_parse__frames_heartbeats_and_crlf() -> None:
    data = b"\n\r\nSEND\r\ndestination:/queue/a\r\n\r\nhi\x00\nACK\nid:1\n\n\x00"
    assert parse(data) == [("SEND", {"destination": "/queue/a"}, b"hi"), ("ACK", {"id": "1"}, b"")]


def test_parse__content_length_allows_nul_in_body() -> None:
    assert parse(b"SEND\ncontent-length:3\n\na\x00b\x00") == [("SEND", {"content-length": "3"}, b"a\x00b")]


def test_parse__split_across_chunks() -> None:
    parser = Parser(max_frame_bytes=1000)
    assert parser.feed(b"SEND\ndesti") == []
    assert parser.feed(b"nation:/queue/a\n\nbo") == []
    (frame,) = parser.feed(b"dy\x00")
    assert frame.body == b"body"


def test_parse__escapes_and_first_repeated_header_wins() -> None:
    ((_, headers, _),) = parse(b"SEND\nk\\cx:a\\nb\\\\c\nk\\cx:second\n\n\x00")
    assert headers == {"k:x": "a\nb\\c"}


@pytest.mark.parametrize(
    "data",
    [b"HELLO\n\n\x00", b"SEND\nno-colon\n\n\x00", b"SEND\nk:\\t\n\n\x00", b"SEND\ncontent-length:1\n\nab\x00",
     b"SEND\ncontent-length:x\n\n\x00", b"SEND\n\xff:1\n\n\x00"],
)  # fmt: skip
def test_parse__malformed(data: bytes) -> None:
    with pytest.raises(FrameError):
        parse(data)


def test_parse__too_large_is_refused_before_it_is_complete() -> None:
    parser = Parser(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        parser.feed(b"SEND\ncontent-length:5000\n\n")
    parser = Parser(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        parser.feed(b"SEND\n\n" + b"x" * 200)
    parser = Parser(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        parser.feed(b"SEND\n\n" + b"x" * 200 + b"\x00")


def test_render__escapes_and_content_length() -> None:
    assert render("MESSAGE", {"a:b": "x\ny"}, b"hi") == b"MESSAGE\na\\cb:x\\ny\ncontent-length:2\n\nhi\x00"
    assert render("CONNECTED", {"version": "1.2"}) == b"CONNECTED\nversion:1.2\n\n\x00"
