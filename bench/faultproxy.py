"""A fault-injecting HTTP proxy for tests: put it between a client and an S3 endpoint
(moto_server from bench.servers) and make chosen requests fail the way object stores fail.

    from bench.faultproxy import Rule, fault_proxy

    rules = [Rule("slow_down", method="PUT", path=r"\\.tar$", count=2),   # the first 2 shard PUTs
             Rule("close_before", path=r"manifest\\.json", count=1)]       # drop 1 manifest request
    with fault_proxy(s3_endpoint, rules) as proxy:
        ... point the client at proxy.url (e.g. AWS_ENDPOINT_URL=proxy.url) ...
        assert proxy.injected["slow_down"] == 2

Every request is forwarded unchanged (Host header included, so signatures stay valid) unless
the first rule that matches it fires. A rule matches on `method` (None: any) and `path` (a
regex searched in the request target, query string included); it lets `skip` matching requests
through, then fires on the next `count` (None: on every one from then on, a permanent fault),
each with `probability` drawn from the proxy's seeded generator. With the default probability
1.0 nothing is random: "fail the first N PUTs of shards" is `Rule(fault, "PUT", r"\\.tar$", count=N)`.

Faults (`FAULTS`):
    internal_error       500 InternalError (S3 XML error body); the request is not forwarded
    service_unavailable  503 ServiceUnavailable
    slow_down            503 SlowDown, S3's throttling answer
    access_denied        403 AccessDenied, a permanent error
    close_before         the connection is closed before the request is forwarded (the request
                         body is left unread: a connection dropped mid-request)
    close_after          the request is forwarded and applied upstream, then the connection is
                         closed without an answer (the client cannot tell the write happened)
    truncate             forwarded; the answer's headers and half of its body are sent, then the
                         connection is closed (a connection dropped mid-response)
    stall                half of the request body is read, then the request is held, never
                         forwarded, until `release()` or the proxy stops: a write in flight,
                         for killing the client at that moment

Counters: `requests` (requests seen), `injected` (a Counter by fault), `sent` (answer body
bytes by method) and `log` (one `(method, path, fault or None)` per request, in arrival order) on the proxy, `seen` (matching
requests) and `fired` (faults injected) on each rule; `wait_for(fault, n)` blocks until n such
faults fired. `set_rules(rules)` replaces the rules at any time (new Rule objects count afresh).
Only for tests and benchmarks: it listens on 127.0.0.1 and buffers whole bodies in memory.
"""
from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERRORS = {  # fault -> (HTTP status, S3 error code, message)
    "internal_error": (500, "InternalError", "We encountered an internal error. Please try again."),
    "service_unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slow_down": (503, "SlowDown", "Please reduce your request rate."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
}
FAULTS = (*_ERRORS, "close_before", "close_after", "truncate", "stall")
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Rule:
    fault: str
    method: str | None = None          # e.g. "PUT"; None matches every method
    path: str = ""                     # regex searched in the request target ("/bucket/key?query")
    count: int | None = 1              # how many matching requests fail; None: all of them
    skip: int = 0                      # matching requests let through before the first fault
    probability: float = 1.0           # chance that a matching request (past `skip`) fails
    seen: int = field(default=0, init=False)    # matching requests so far
    fired: int = field(default=0, init=False)   # faults injected so far

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault {self.fault!r} unknown; choose one of {', '.join(FAULTS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must be in 0..1")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and bool(self._pattern.search(target))

    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count


class FaultProxy(ThreadingHTTPServer):
    """The proxy server; use `fault_proxy()` to run it for the length of a `with` block."""

    daemon_threads = True

    def __init__(self, upstream: str, rules: Iterable[Rule] = (), seed: int = 0, timeout: float = 60.0):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream {upstream!r} must be an http://host:port URL")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.upstream_timeout = timeout
        self.requests = 0
        self.injected: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []
        self._rules = list(rules)
        self._random = random.Random(seed)
        self._changed = threading.Condition()
        self._released = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def set_rules(self, rules: Iterable[Rule]) -> None:
        with self._changed:
            self._rules = list(rules)

    def release(self) -> None:
        """Let every held (`stall`) request end: its connection is closed, nothing forwarded."""
        self._released.set()

    def wait_for(self, fault: str, count: int = 1, timeout: float = 60.0) -> None:
        """Block until `count` faults of this kind were injected; TimeoutError if they were not."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.injected[fault] >= count, timeout):
                raise TimeoutError(f"{self.injected[fault]} of {count} {fault} faults injected in {timeout} s")

    def choose(self, method: str, target: str) -> str | None:
        """Count the request and pick the fault to inject, if any (the first matching rule decides)."""
        with self._changed:
            self.requests += 1
            fault = None
            for rule in self._rules:
                if rule.exhausted() or not rule.matches(method, target):
                    continue
                rule.seen += 1
                if rule.seen > rule.skip and self._random.random() < rule.probability:
                    rule.fired += 1
                    fault = rule.fault
                    self.injected[fault] += 1
                break
            self.log.append((method, target, fault))
            self._changed.notify_all()
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as S3 clients use it
    server: FaultProxy

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: tests read the proxy's counters instead

    def _serve(self) -> None:
        fault = self.server.choose(self.command, self.path)
        if fault == "close_before":
            return self._close()
        if fault == "stall":
            self._read_body(half=True)
            self.server._released.wait()
            return self._close()
        body = self._read_body()
        if fault in _ERRORS:
            return self._send_error(*_ERRORS[fault])
        status, reason, headers, payload = self._forward(body)
        if fault == "close_after":
            return self._close()
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if fault == "truncate":
            payload = payload[:len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)
        with self.server._changed:
            self.server.sent[self.command] += len(payload)
        if fault == "truncate":
            self._close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def _read_body(self, half: bool = False) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return b"" if half else self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length // 2 if half else length)

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length", "expect"}}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(*self.server.upstream, timeout=self.server.upstream_timeout)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        # A HEAD answer keeps the object's length with no body; everything else sends what was read.
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
        return response.status, response.reason, [*kept, ("Content-Length", length)], payload

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{self.path}</Resource><RequestId>faultproxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _close(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fault_proxy(upstream: str, rules: Iterable[Rule] = (), seed: int = 0) -> Iterator[FaultProxy]:
    """Run a FaultProxy on 127.0.0.1 (a free port) in front of `upstream` for a `with` block."""
    proxy = FaultProxy(upstream, rules, seed)
    thread = threading.Thread(target=proxy.serve_forever, name="faultproxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.release()
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)
