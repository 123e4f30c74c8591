"""uvicorn's HTTP/1.1 protocol (h11), answering what it cannot parse in the API's JSON, and
closing connections whose request line and headers do not arrive in time.

A request h11 refuses (an invalid or doubled ``Content-Length``, a malformed request line or
header) never reaches the application: uvicorn answers it itself, in plain text. This
subclass sends the ``{"code", "detail"}`` body every other error has. It is passed to
uvicorn as its ``http`` protocol class, the setting uvicorn offers for this.

uvicorn waits for a request's headers for as long as the client keeps the connection open:
a client that connects and sends nothing, or a header a byte at a time, holds a file
descriptor for ever, and enough of them stop the server from accepting anyone. The headers
of each request must arrive within ``header_timeout_s`` of its first byte (of the connection,
for the first request), or the client gets a 408 and the connection is closed. The body's
pace is the request guard's (``service.guard``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MALFORMED = {
    "code": "malformed_request",
    "detail": "the request could not be parsed as HTTP/1.1 (e.g. an invalid Content-Length, "
    "a malformed request line or header)",
}
OPEN_FILES_CAP = 65_536


class JsonErrorH11Protocol(H11Protocol):
    header_timeout_s = 20.0
    _header_timer: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        self._send_json_and_close(400, b"Bad Request", MALFORMED)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # headers complete (or the connection is over)
        else:  # a request's first bytes, its headers not complete yet
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        detail = f"the request line and headers did not arrive within {self.header_timeout_s:g} s"
        log.info("closing a connection from %s: %s", self.client, detail)
        self._send_json_and_close(408, b"Request Timeout",
                                  {"code": "request_timeout", "detail": detail})  # fmt: skip

    def _send_json_and_close(self, status: int, reason: bytes, payload: dict[str, str]) -> None:
        # Raw bytes, not h11 events: h11 refuses a response before a request has been parsed,
        # and the connection is closed right after anyway.
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} ".encode()
            + reason
            + b"\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        )
        self.transport.write(head + body)
        self.transport.close()


def timed_protocol(header_timeout_s: float) -> type[JsonErrorH11Protocol]:
    """The protocol class for uvicorn, with this header deadline."""
    return type("TimedJsonErrorH11Protocol", (JsonErrorH11Protocol,),
                {"header_timeout_s": float(header_timeout_s)})  # fmt: skip


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (at most 65,536): each
    connection is a file descriptor, and the usual soft limit of 1,024 is a few hundred
    clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("open files limit stays at %d (%s)", soft, exc)
