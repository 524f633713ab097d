"""A flaky S3 endpoint for the fault-injection tests: a threaded HTTP proxy on loopback in front of a
moto server that forwards requests verbatim (method, path, query, headers with the SigV4 signature,
body) and fails every ``fail_every``-th request, cycling through the transient failures S3 clients
must retry: ``503 SlowDown``, ``500 InternalError``, a connection dropped before the request reaches S3,
and one dropped after S3 carried it out (the client never sees the reply, so it sends it again).

    with MotoS3() as s3, FlakyS3Proxy(s3.endpoint, fail_every=6) as proxy:
        ... point the job at proxy.endpoint ...
        proxy.failed  # requests failed so far, by kind
        proxy.wait_idle()  # no request in flight (e.g. after killing the job, before looking at the bucket)

The failures are deterministic in number (every ``fail_every``-th request the proxy receives); which
requests they hit depends on how the job's processes interleave.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "drop", "drop_reply")

_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}

# hop-by-hop headers are the proxy's own business; everything else travels verbatim
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FlakyS3Proxy:
    def __init__(self, upstream: str, fail_every: int = 6, faults: tuple[str, ...] = FAULTS):
        if fail_every < 2:
            raise ValueError("fail_every must be >= 2 (every request failing is an outage, not a transient fault)")
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kind(s) {sorted(unknown)}; known: {FAULTS}")
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.fail_every, self.faults = fail_every, tuple(faults)
        self.requests = 0  # received
        self.failed: Counter = Counter()  # failed on purpose, by kind
        self.in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.requests % self.fail_every:
                return None
            kind = self.faults[(self.requests // self.fail_every - 1) % len(self.faults)]
            self.failed[kind] += 1
            return kind

    def _track(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no request is being handled (a forwarded one may still be landing in the bucket)."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} request(s) still in flight after {timeout} s")
            time.sleep(0.05)

    def __enter__(self) -> FlakyS3Proxy:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="flaky-s3-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FlakyS3Proxy = self.server.proxy
        proxy._track(1)
        try:
            self._proxy(proxy)
        finally:
            proxy._track(-1)

    def _proxy(self, proxy: FlakyS3Proxy) -> None:
        body = self._body()  # the whole request arrives before any fault: the client sent it all
        fault = proxy._next_fault()
        if fault == "drop":
            self.close_connection = True  # no response at all: the client sees the connection closed
            return
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            self._reply(status, [("Content-Type", "application/xml")],
                        (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                         f"</Message><Resource>{self.path}</Resource><RequestId>flaky-{proxy.requests}</RequestId>"
                         "</Error>").encode(), head=self.command == "HEAD")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body if body or "Content-Length" in headers else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
        finally:
            conn.close()
        if fault == "drop_reply":  # S3 did it, but the client sees the connection closed and retries
            self.close_connection = True
            return
        self._reply(resp.status, out, data, head=self.command == "HEAD")

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool = False) -> None:
        self.send_response_only(status)
        for k, v in headers:
            if not (k.lower() == "content-length" and not head):
                self.send_header(k, v)
        if not head:  # a HEAD response keeps the object's Content-Length and has no body
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle
