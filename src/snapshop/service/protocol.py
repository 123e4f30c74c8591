"""uvicorn's HTTP/1.1 protocol (h11), answering what it cannot parse in the API's JSON.

A request h11 refuses (an invalid or doubled ``Content-Length``, a malformed request line or
header) never reaches the application: uvicorn answers it itself, in plain text. This
subclass sends the ``{"code", "detail"}`` body every other error has. It is passed to
uvicorn as its ``http`` protocol class, the setting uvicorn offers for this.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MALFORMED = {
    "code": "malformed_request",
    "detail": "the request could not be parsed as HTTP/1.1 (e.g. an invalid Content-Length, "
    "a malformed request line or header)",
}


class JsonErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(MALFORMED).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
