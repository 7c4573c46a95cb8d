"""STOMP frames written by hand (with the `websockets` library): errors, versions, subprotocols."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.ws.conftest import WAIT

pytestmark = pytest.mark.django_db(transaction=True)


def frame(command: str, body: str = "", **headers: str) -> str:
    lines = [command, *(f"{k.replace('_', '-')}:{v}" for k, v in headers.items())]
    return "\n".join(lines) + "\n\n" + body + "\x00"


def recv(ws: ClientConnection) -> str:
    data = ws.recv(timeout=WAIT)
    text = data.decode() if isinstance(data, bytes) else data
    return text if text.strip() else recv(ws)  # skip heart-beats


@contextlib.contextmanager
def open_stomp(server: Any, token: str, version: str = "1.2", **options: Any) -> Iterator[ClientConnection]:
    with connect(f"{server.ws}/ws/stomp/", **options) as ws:
        ws.send(frame("CONNECT", accept_version=version, host="pegasus", login="alice", passcode=token))
        assert recv(ws).startswith("CONNECTED\n")
        yield ws


def expect_error_and_close(ws: ClientConnection, code: int = 4400) -> str:
    reply = recv(ws)
    assert reply.startswith("ERROR\n")
    with pytest.raises(ConnectionClosed):
        recv(ws)
    assert ws.close_code == code
    return reply


@pytest.mark.parametrize(
    "bad",
    ["HELLO\n\n\x00", "SEND\ndestination\n\nx\x00", "SEND\ndestination:/queue/a\nk:\\t\n\n\x00",
     "SEND\ncontent-length:1\n\nxyz\x00", "SUBSCRIBE\nid:1\ndestination:/queue/a\nack:sometimes\n\n\x00",
     "COMMIT\ntransaction:never-begun\n\n\x00", "CONNECT\naccept-version:1.2\n\n\x00"],
)  # fmt: skip
def test_malformed_or_out_of_order_frame_gets_error_and_close(server: Any, admin_token: str, bad: str) -> None:
    with open_stomp(server, admin_token) as ws:
        ws.send(bad)
        expect_error_and_close(ws)


def test_frame_before_connect_is_an_error(server: Any, admin_token: str) -> None:
    with connect(f"{server.ws}/ws/stomp/?token={admin_token}") as ws:
        ws.send(frame("SEND", "x", destination="/queue/a"))
        assert "not connected" in expect_error_and_close(ws)


def test_frame_too_large_gets_error_and_close(server: Any, admin_token: str) -> None:
    with open_stomp(server, admin_token, max_size=None) as ws:
        ws.send(frame("SEND", "x" * (2 * 1024 * 1024), destination="/queue/a"))
        assert "frame too large" in expect_error_and_close(ws, 4413)


def test_missing_credentials_are_refused(server: Any) -> None:
    with connect(f"{server.ws}/ws/stomp/") as ws:
        ws.send(frame("CONNECT", accept_version="1.2", login="alice", passcode="wrong"))
        assert "not_authenticated" in expect_error_and_close(ws)


@pytest.mark.parametrize(("offered", "version"), [("v10.stomp", "1.0"), ("v11.stomp", "1.1"), ("v12.stomp", "1.2")])
def test_subprotocols_and_versions(
    server: Any, admin_token: str, queue_factory: Any, offered: str, version: str
) -> None:
    queue_factory("versions")
    with open_stomp(server, admin_token, version, subprotocols=[Subprotocol(offered)]) as ws:
        assert ws.subprotocol == offered
        ws.send(frame("SUBSCRIBE", id="s", destination="/queue/versions", ack="client"))
        ws.send(frame("SEND", "hi", destination="/queue/versions"))
        message = recv(ws)
        headers = dict(line.split(":", 1) for line in message.split("\n\n")[0].split("\n")[1:])
        assert message.startswith("MESSAGE\n") and headers["subscription"] == "s"
        ack = {"id": headers["ack"]} if version == "1.2" else {"message_id": headers["message-id"]}
        ws.send(frame("ACK", subscription="s", receipt="r", **ack))
        assert recv(ws).startswith("RECEIPT\nreceipt-id:r")


def test_server_heart_beats(server: Any, admin_token: str) -> None:
    with connect(f"{server.ws}/ws/stomp/") as ws:
        ws.send(frame("CONNECT", accept_version="1.2", login="alice", passcode=admin_token, heart_beat="0,500"))
        assert "heart-beat:" in recv(ws)
        assert ws.recv(timeout=WAIT) == "\n"  # within the server's interval


def test_an_error_on_one_connection_leaves_the_others_alone(server: Any, admin_token: str, queue_factory: Any) -> None:
    queue_factory("calm")
    with open_stomp(server, admin_token) as good, open_stomp(server, admin_token) as bad:
        good.send(frame("SUBSCRIBE", id="s", destination="/queue/calm", ack="client-individual"))
        bad.send("GARBAGE\n\n\x00")
        expect_error_and_close(bad)
        good.send(frame("SEND", "still here", destination="/queue/calm"))
        assert recv(good).endswith("still here\x00")


def test_receipts_keep_the_order_of_the_sends_whatever_their_persistence(
    server: Any, admin_token: str, queue_factory: Any
) -> None:
    """On PostgreSQL a non-durable SEND may be confirmed before an earlier durable one is
    committed (messaging/write_behind.py); its RECEIPT still waits for the earlier one's."""
    queue_factory("mixed")
    with open_stomp(server, admin_token) as ws:
        ws.send(frame("SEND", "warm", destination="/queue/mixed", persistent="false", receipt="w"))
        assert recv(ws).startswith("RECEIPT\nreceipt-id:w\n")  # non-durable SENDs may now be confirmed early
        for i in range(20):
            persistent = "true" if i % 2 == 0 else "false"
            ws.send(frame("SEND", f"m{i}", destination="/queue/mixed", persistent=persistent, receipt=f"r{i}"))
        receipts = [recv(ws).split("\n")[1] for _ in range(20)]
    assert receipts == [f"receipt-id:r{i}" for i in range(20)]
