"""HTTP-level reliability of the service (issue #19): body limits enforced while streaming,
keyless writes refused before their body is read, JSON for what uvicorn's parser refuses,
a truthful ``Allow``, a damaged stored image as a server fault, the OpenAPI contract.

Requests that must stream (chunked bodies, bodies never read) are driven through the ASGI
interface directly, counting what the app pulls from ``receive``, and through a live
``snapshop serve`` on 127.0.0.1 with a raw socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import select
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fixtures import API_KEY, live_serve, small_catalog

from snapshop.errors import CatalogError, ConfigError, NotFoundError
from snapshop.service import ServiceSettings, create_app

MAX_UPLOAD = 100_000
MAX_JSON = 50_000
AUTH = {"X-API-Key": API_KEY}
CHUNK = 16 * 1024


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_catalog(tmp_path_factory.mktemp("service-http"))


@pytest.fixture(scope="module")
def settings(catalog: Path) -> ServiceSettings:
    return ServiceSettings(catalog, api_key=API_KEY, max_upload_bytes=MAX_UPLOAD,
                           max_json_bytes=MAX_JSON, max_images_per_product=2)  # fmt: skip


@pytest.fixture(scope="module")
def client(settings: ServiceSettings):
    with TestClient(create_app(settings)) as c:
        yield c


class Exchange:
    """One request through the app's ASGI interface: the body comes from ``chunks`` one
    ``receive`` at a time, and what the app pulled is counted."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(chunks)
        self._next: bytes | None = None
        self.pulled = 0
        self.receives = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    async def receive(self) -> dict:
        self.receives += 1
        chunk = self._next if self.receives > 1 else next(self.chunks, None)
        if chunk is None:
            return {"type": "http.disconnect"}
        self._next = next(self.chunks, None)
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": self._next is not None}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def json(self) -> dict:
        return json.loads(self.body)


class SlowExchange(Exchange):
    """A client that sends each of ``steps`` (seconds to wait, bytes) in turn, then nothing."""

    def __init__(self, steps: Iterable[tuple[float, bytes]]) -> None:
        super().__init__(())
        self.steps = list(steps)

    async def receive(self) -> dict:
        self.receives += 1
        if not self.steps:
            await asyncio.Event().wait()  # silent, the connection still open
        delay, chunk = self.steps.pop(0)
        await asyncio.sleep(delay)
        self.pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}


def exchange(app, method: str, path: str, headers: dict[str, str],
             chunks: Iterable[bytes] | Exchange) -> Exchange:  # fmt: skip
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
    }  # fmt: skip
    ex = chunks if isinstance(chunks, Exchange) else Exchange(chunks)
    asyncio.run(app(scope, ex.receive, ex.send))
    return ex


def endless(part_header: bytes = b"") -> Iterable[bytes]:
    """A body far larger than any limit here (64 MiB), sent CHUNK bytes at a time."""
    yield part_header
    for _ in range(64 * 1024 * 1024 // CHUNK):
        yield b"\0" * CHUNK


MULTIPART = {"content-type": "multipart/form-data; boundary=XyZ", "transfer-encoding": "chunked"}
IMAGE_PART = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
              b"Content-Type: image/jpeg\r\n\r\n\xff\xd8")  # fmt: skip


# --- body limits while streaming --------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "headers", "limit"),
    [
        ("POST", "/v1/search", MULTIPART, "search"),
        ("POST", "/v1/products", {**MULTIPART, **AUTH}, "products"),
        ("PATCH", "/v1/products/1",
         {"content-type": "application/json", "transfer-encoding": "chunked", **AUTH}, "json"),
    ],
)  # fmt: skip
def test_chunked_body_over_the_limit_stops_being_read(settings, method, path, headers, limit):
    """No Content-Length: the guard counts what the app reads and refuses at limit + 1."""
    app = create_app(settings)
    ex = exchange(app, method, path, headers, endless(IMAGE_PART))
    allowed = {
        "search": settings.max_search_request_bytes,
        "products": settings.max_request_bytes,
        "json": settings.max_json_bytes,
    }[limit]
    assert ex.status == 413, ex.body
    assert ex.json()["code"] == "payload_too_large" and str(allowed) in ex.json()["detail"]
    assert ex.headers["content-type"] == "application/json"
    assert ex.headers["connection"] == "close"  # the server drops the rest, unread
    assert allowed < ex.pulled <= allowed + CHUNK + len(IMAGE_PART)


def test_chunked_body_under_the_limit_is_served(settings, catalog):
    app = create_app(settings)
    data = (catalog.parent / "source").rglob("*.jpg").__next__().read_bytes()
    body = IMAGE_PART[:-2] + data + b"\r\n--XyZ--\r\n"
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    ex = exchange(app, "POST", "/v1/search", MULTIPART, chunks)
    assert ex.status == 200, ex.body
    assert ex.json()["image_results"]


def test_content_length_is_judged_before_reading(settings):
    app = create_app(settings)
    for length, status in (("abc", 400), ("\u00b2", 400), ("-5", 400),
                           (str(settings.max_search_request_bytes + 1), 413)):  # fmt: skip
        ex = exchange(app, "POST", "/v1/search", {"content-length": length,
                      "content-type": "multipart/form-data; boundary=XyZ"}, endless())  # fmt: skip
        assert ex.status == status and ex.receives == 0, (length, ex.body)
        assert ex.json()["detail"]


# --- slow bodies --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [("POST", "/v1/search", MULTIPART), ("POST", "/v1/products", {**MULTIPART, **AUTH})],
)
def test_a_body_that_stalls_is_a_408_and_the_connection_is_dropped(settings, method, path,
                                                                   headers):  # fmt: skip
    app = create_app(dataclasses.replace(settings, body_idle_timeout_s=0.3))
    started = time.monotonic()
    ex = exchange(app, method, path, headers, SlowExchange([(0, IMAGE_PART)]))
    assert ex.status == 408, ex.body
    assert ex.json()["code"] == "request_timeout" and "0.3 s" in ex.json()["detail"]
    assert ex.headers["connection"] == "close"
    assert time.monotonic() - started < 10


def test_a_body_that_trickles_past_its_deadline_is_a_408(settings):
    """Each piece comes well within the idle timeout; the whole body takes too long."""
    app = create_app(dataclasses.replace(settings, body_idle_timeout_s=0.5, body_timeout_s=0.6))
    steps = [(0, IMAGE_PART)] + [(0.05, b"\0" * 10)] * 1000
    ex = exchange(app, "POST", "/v1/search", MULTIPART, SlowExchange(steps))
    assert ex.status == 408, ex.body
    assert "longer than 0.6 s" in ex.json()["detail"]
    assert ex.pulled < len(IMAGE_PART) + 10 * 60  # stopped reading at the deadline


def test_timeouts_must_be_positive_seconds(catalog):
    for bad in (0, -1, float("nan"), 1e9):
        with pytest.raises(ConfigError, match="body_timeout_s"):
            ServiceSettings(catalog, body_timeout_s=bad)


# --- keyless writes never read their body -----------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/products"), ("PATCH", "/v1/products/1"), ("DELETE", "/v1/products/1")],
)
def test_keyless_writes_are_refused_before_their_body_is_read(settings, catalog, method, path):
    app = create_app(settings)
    readonly = create_app(ServiceSettings(catalog))
    for target, headers, status, code in [
        (app, {}, 401, "unauthorized"),
        (app, {"X-API-Key": ""}, 401, "unauthorized"),
        (app, {"X-API-Key": API_KEY + "x"}, 403, "forbidden"),
        (readonly, AUTH, 403, "writes_disabled"),
    ]:
        ex = exchange(target, method, path, {**MULTIPART, **headers}, endless(IMAGE_PART))
        assert (ex.status, ex.json()["code"]) == (status, code), (method, headers, ex.body)
        assert ex.receives == 0 and ex.pulled == 0
        assert ex.headers["connection"] == "close"
    assert app.state.snapshop.catalog.store.counts()["products"] == 4  # nothing written


def test_reads_and_unknown_methods_are_not_taken_for_writes(client):
    """The guard asks the routes: only a route that depends on the key needs one."""
    assert client.get("/v1/products/1").status_code == 200
    assert client.put("/v1/products", content=b"{}").status_code == 405  # not a 401
    assert client.post("/v1/products/1", content=b"{}").status_code == 405


# --- Allow lists every method of the resource -------------------------------------------------
def test_405_allow_lists_every_method_of_the_path(client):
    for method, path, allow in [
        ("PUT", "/v1/products", "GET, POST"),
        ("OPTIONS", "/v1/products", "GET, POST"),
        ("PUT", "/v1/products/1", "DELETE, GET, PATCH"),
        ("POST", "/v1/products/1", "DELETE, GET, PATCH"),
        ("GET", "/v1/search", "POST"),
        ("DELETE", "/v1/images/1", "GET"),
    ]:
        r = client.request(method, path, headers=AUTH)
        assert r.status_code == 405, (method, path, r.text)
        assert r.headers["allow"] == allow, (method, path)
        assert r.json()["code"] == "method_not_allowed"


# --- a damaged stored image is the server's fault ---------------------------------------------
def test_corrupt_stored_image_is_a_500_logged_once(catalog, tmp_path, caplog):
    copy = tmp_path / "catalog"
    shutil.copytree(catalog, copy)
    with TestClient(create_app(ServiceSettings(copy))) as c:
        image = c.get("/v1/products", params={"limit": 1}).json()["items"][0]["images"][0]
        store = c.app.state.snapshop.catalog.store
        blob = copy / store.get_image(image["id"]).blob
        blob.write_bytes(blob.read_bytes()[:40] + b"\0garbage" * 50)  # damaged on disk
        caplog.set_level(logging.ERROR, logger="snapshop.service.errors")
        for size in (64, 512, 64):  # sizes never rendered: each decodes the blob
            r = c.get(f"/v1/images/{image['id']}/thumb", params={"size": size})
            assert r.status_code == 500, r.text
            assert r.json()["code"] == "stored_image_corrupt"
            assert str(copy) not in r.json()["detail"]  # server paths stay on the server
        logged = [rec for rec in caplog.records if "damaged catalog file" in rec.getMessage()]
        assert len(logged) == 1 and str(blob.name) in logged[0].getMessage()
        assert c.get("/v1/images/999999/thumb").status_code == 404  # absent is still a 404


# --- typed errors, not messages, decide the status --------------------------------------------
def test_not_found_is_a_type_not_a_message(settings):
    app = create_app(settings)

    def absent() -> None:
        raise NotFoundError("the thing is gone")

    def refused() -> None:
        raise CatalogError("no space left in the catalog")  # starts with "no ", not a 404

    app.add_api_route("/test/absent", absent)
    app.add_api_route("/test/refused", refused)
    with TestClient(app) as c:
        assert c.get("/test/absent").status_code == 404
        assert c.get("/test/refused").status_code == 400
        with pytest.raises(NotFoundError):
            app.state.snapshop.catalog.store.get_product(10**6)
    assert issubclass(NotFoundError, CatalogError)  # callers catching CatalogError still do


def test_the_service_opens_its_searcher_through_the_api(catalog):
    """One way to open a searcher: the service's thread setting reaches the embedder."""
    app = create_app(ServiceSettings(catalog, embed_threads=1, detector="none"))
    searcher = app.state.snapshop.searcher
    assert searcher.detector is None
    options = searcher.embedder.session.get_session_options()
    assert options.intra_op_num_threads == 1
    searcher.catalog.close()


# --- the OpenAPI document tells the truth -----------------------------------------------------
EXPECTED_ERRORS = {
    ("post", "/v1/search"): {400, 413, 415, 422, 429},
    ("post", "/v1/search/crop"): {400, 413, 415, 422, 429},
    ("get", "/v1/products"): {400, 413, 422},
    ("post", "/v1/products"): {400, 401, 403, 413, 415, 422},
    ("get", "/v1/products/{product_id}"): {404, 422},
    ("patch", "/v1/products/{product_id}"): {400, 401, 403, 404, 422},
    ("delete", "/v1/products/{product_id}"): {401, 403, 404, 422},
    ("get", "/v1/images/{image_id}"): {404, 422},
    ("get", "/v1/images/{image_id}/thumb"): {404, 422, 500},
    ("get", "/v1/stats"): {400, 413},
    ("get", "/healthz"): {400, 413},
}


def test_openapi_declares_errors_and_limits(client, settings):
    schema = client.get("/openapi.json").json()
    for (method, path), statuses in EXPECTED_ERRORS.items():
        responses = schema["paths"][path][method]["responses"]
        declared = {int(s) for s in responses if s[0] in "45"}
        assert statuses <= declared, (method, path, declared)
        for status in declared:
            body = responses[str(status)]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    assert set(schema["components"]["schemas"]["ErrorBody"]["required"]) == {"code", "detail"}
    search = schema["paths"]["/v1/search"]["post"]
    assert str(settings.max_search_request_bytes) in search["description"]
    form = schema["components"]["schemas"][
        search["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    ]
    image = form["properties"]["image"]["description"]
    assert str(MAX_UPLOAD) in image and str(settings.max_pixels) in image
    assert form["properties"]["k"]["maximum"] == settings.max_k
    assert form["properties"]["position"]["enum"] == ["upper", "lower"]
    for name, field in form["properties"].items():  # a form field cannot be a JSON null
        assert "null" not in json.dumps(field), name
    add = schema["paths"]["/v1/products"]["post"]
    assert str(settings.max_request_bytes) in add["description"]
    assert add["security"] == [{"APIKeyHeader": []}]
    patch = schema["paths"]["/v1/products/{product_id}"]["patch"]
    assert patch["requestBody"]["content"]["application/json"]["schema"]["minProperties"] == 1
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


# --- a live `snapshop serve` on 127.0.0.1 -----------------------------------------------------
@pytest.fixture(scope="module")
def live(catalog: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("live") / "serve.log"
    with live_serve(catalog, log, "--max-upload-mb", "0.1", "--client-timeout", "2") as url:
        yield int(url.rsplit(":", 1)[1])


def raw_exchange(port: int, head: bytes, body_chunks: Iterable[bytes] = ()) -> tuple[bytes, int]:
    """Send ``head``, then ``body_chunks`` until the server answers or stops reading; returns
    (the response, body bytes sent before that)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        sent = 0
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or the close) is waiting
            try:
                sock.sendall(chunk)
            except OSError:  # reset or broken pipe: the server closed the connection
                break
            sent += len(chunk)
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except OSError:  # a reset after the answer, or no answer in time
                break
            if not part:
                break
            data += part
        return data, sent


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_live_invalid_content_length_is_json(live):
    for length in (b"abc", b"-1", b"1, 2"):
        data, _ = raw_exchange(live, b"POST /v1/search HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: " + length + b"\r\n\r\n")  # fmt: skip
        status, headers, body = split_response(data)
        assert status == 400, data
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["code"] == "malformed_request"


def chunked(size: int) -> bytes:
    return f"{size:x}\r\n".encode() + b"\0" * size + b"\r\n"


def test_live_chunked_upload_over_the_limit_is_refused_early(live):
    limit = int(0.1 * 1024 * 1024) + 1024 * 1024  # --max-upload-mb 0.1, plus the form's room
    head = (b"POST /v1/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")  # fmt: skip
    body = [f"{len(IMAGE_PART):x}\r\n".encode() + IMAGE_PART + b"\r\n"]
    body += [chunked(CHUNK)] * (20 * limit // CHUNK)
    data, sent = raw_exchange(live, head, body)
    status, headers, payload = split_response(data)
    assert status == 413 and json.loads(payload)["code"] == "payload_too_large", data[:300]
    assert headers["connection"] == "close"
    assert sent < 10 * limit  # answered long before the client had sent it all


def test_live_keyless_write_is_refused_before_its_body(live):
    """The client sends the headers of a 1 MB upload and no body at all: the answer comes
    anyway, so the server never waited for (or read) the body."""
    head = (b"POST /v1/products HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")  # fmt: skip
    data, _ = raw_exchange(live, head)
    status, headers, payload = split_response(data)
    assert status == 401 and json.loads(payload)["code"] == "unauthorized", data[:300]
    assert headers["connection"] == "close"
    data, _ = raw_exchange(live, head.replace(b"1000000", b"200000000"))
    assert split_response(data)[0] == 413  # over the limit: refused by its length alone


def test_live_client_that_sends_nothing_gets_a_408(live):
    started = time.monotonic()
    data, _ = raw_exchange(live, b"")
    status, headers, body = split_response(data)
    assert status == 408 and json.loads(body)["code"] == "request_timeout", data
    assert headers["connection"] == "close"
    assert 1.5 < time.monotonic() - started < 15


def test_live_headers_a_byte_at_a_time_get_a_408(live):
    """Slowloris: every byte comes in time, the headers as a whole do not."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", live), timeout=20) as sock:
        for byte in head:
            if select.select([sock], [], [], 0.1)[0]:
                break  # answered
            sock.sendall(bytes([byte]))
        data = sock.recv(65536)
    assert split_response(data)[0] == 408, data
    assert time.monotonic() - started < 15


def test_live_stalled_body_gets_a_408_and_the_server_still_serves(live):
    head = (b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n")  # fmt: skip
    data, _ = raw_exchange(live, head + IMAGE_PART)
    status, headers, body = split_response(data)
    assert status == 408 and headers["connection"] == "close", data[:300]
    data, _ = raw_exchange(live, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert split_response(data)[0] == 200


# --- multipart bodies cut off or doubled ---------------------------------------------------------
@pytest.mark.parametrize("cut", ["no closing boundary", "mid image", "mid part headers"])
def test_a_multipart_body_cut_off_is_a_400_saying_so(settings, catalog, cut):
    data = (catalog.parent / "source").rglob("*.jpg").__next__().read_bytes()
    whole = IMAGE_PART[:-2] + data + b"\r\n--XyZ--\r\n"
    body = {
        "no closing boundary": IMAGE_PART[:-2] + data + b"\r\n",
        "mid image": whole[: len(IMAGE_PART) + len(data) // 2],
        "mid part headers": IMAGE_PART[:30],
    }[cut]
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    ex = exchange(create_app(settings), "POST", "/v1/search", MULTIPART, chunks)
    assert ex.status == 400, ex.body
    assert "closing boundary" in ex.json()["detail"]
    complete = [whole[i : i + 1000] for i in range(0, len(whole), 1000)]
    assert exchange(create_app(settings), "POST", "/v1/search", MULTIPART, complete).status == 200


def test_two_image_parts_are_refused_not_one_dropped(client, catalog):
    data = (catalog.parent / "source").rglob("*.jpg").__next__().read_bytes()
    files = [("image", ("a.jpg", data, "image/jpeg")), ("image", ("b.jpg", data, "image/jpeg"))]
    r = client.post("/v1/search", files=files)
    assert r.status_code == 400 and "one image part" in r.json()["detail"]
    assert client.post("/v1/search", files=files[:1]).status_code == 200
