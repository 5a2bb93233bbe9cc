"""Rendezvous attempts: Horovod's Gloo rendezvous store, served by pod 0's launcher for one attempt only.

Horovod's ranks find each other through an HTTP key-value store (horovod.runner.http.http_server): each
rank PUTs its Gloo address under /<scope>/<rank> (scopes "global", "local_<host>", "cross_<local rank>")
and polls GET for the others'; once connected, each DELETEs its key and the scope is cleared. The store
lives in pod 0's launcher, and Kubernetes replaces a lost pod while the others still run: pod 0's
store can outlive the attempt it serves by minutes (until its ranks' stall watchdog fires). A
replacement that registered there would wait for peers that are gone, fail, and cost a retry.

So a store serves exactly one attempt, named by a random id:

- Pod i > 0's launcher joins the attempt (GET /join/<pod>/<launcher id>) before it starts any rank. A
  second launcher joining for the same pod means that pod was replaced: the attempt can never complete.
  The server ends it (from then on it refuses everything with 410), pod 0's launcher stops its ranks
  and exits EXIT_ATTEMPT_ENDED, and the Job replaces pod 0 too. A refused launcher retries until a new
  pod 0 serves a new attempt (within --rendezvous-timeout).
- Every rank reaches the store through its own launcher's relay on 127.0.0.1, which puts the attempt id
  in front of each key (/<attempt>/<scope>/<key>): a rank of an ended attempt never reads or writes the
  keys of the next one, even once pod 0's DNS name points at a new server.
"""
from __future__ import annotations

import http.client
import logging
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

log = logging.getLogger("trainer.launch")

OK = 200
CONFLICT = 409      # this pod joined the attempt before, from another launcher: it was replaced
GONE = 410          # the attempt has ended, or the request is for another attempt
UNREACHABLE = 503   # (the relay's answer) pod 0's store could not be reached
RETRY_SECONDS = 1
REQUEST_SECONDS = 10   # for one request to pod 0's store: it answers at once when it is up


class RendezvousError(Exception):
    """No attempt admitted this pod within --rendezvous-timeout."""


class AttemptServer(RendezvousHTTPServer):
    """Horovod's rendezvous store for one attempt of the job whose slots are `plan`."""

    def __init__(self, address: tuple[str, int], plan: list):
        super().__init__(address, AttemptHandler, 0)
        self.init(plan)
        self.attempt = secrets.token_hex(4)
        self.ended = threading.Event()
        self._joined: dict[int, str] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def join(self, pod: int, launcher: str) -> tuple[int, str]:
        """Admit pod `pod`'s launcher: (200, the attempt id), or a refusal and why. The same launcher asking
        again is admitted again (its answer may have been lost)."""
        with self._lock:
            if self.ended.is_set():
                return GONE, f"rendezvous attempt {self.attempt} has ended"
            if self._joined.setdefault(pod, launcher) == launcher:
                return OK, self.attempt
            self.ended.set()
        log.warning("pod %d joined rendezvous attempt %s again (a replacement): ending the attempt, which cannot "
                    "complete without the pod it replaces; the Job replaces this pod and all rendezvous again",
                    pod, self.attempt)
        return CONFLICT, (f"rendezvous attempt {self.attempt} had pod {pod} already: this pod replaces it, so the "
                          f"attempt has ended")


class AttemptHandler(RendezvousHandler):
    """Horovod's store behind /<attempt>/, and /join/<pod>/<launcher id>."""

    def do_GET(self):
        parts = self.path.split("/")
        if len(parts) == 4 and parts[1] == "join" and parts[2].isdigit():
            self._answer(*self.server.join(int(parts[2]), parts[3]))
        elif self._in_attempt():
            super().do_GET()

    def do_PUT(self):
        if self._in_attempt():
            super().do_PUT()

    def do_DELETE(self):
        if self._in_attempt():
            super().do_DELETE()

    def _in_attempt(self) -> bool:
        """Strip this attempt's id from the path; anything else, or anything once it has ended, is gone."""
        attempt, _, rest = self.path[1:].partition("/")
        if attempt != self.server.attempt or self.server.ended.is_set():
            self._answer(GONE, f"not an attempt in progress here: {attempt}")
            return False
        self.path = "/" + rest
        return True

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def join_attempt(addr: str, port: int, pod: int, timeout: float) -> str:
    """Pod `pod` (> 0): the id of the attempt pod 0's server admits it to. Pods start in any order and pod
    0's name resolves only once it runs; a server whose attempt has ended refuses: wait for the next one."""
    launcher = secrets.token_hex(4)
    deadline = time.monotonic() + timeout
    log.info("waiting for the rendezvous server at %s:%d", addr, port)
    refused = ""
    while True:
        status, body = _request(addr, port, "GET", f"/join/{pod}/{launcher}")
        text = body.decode(errors="replace")
        if status == OK:
            log.info("pod %d joined rendezvous attempt %s", pod, text)
            return text
        if status in (CONFLICT, GONE) and text != refused:
            log.warning("%s; waiting for pod 0's next attempt", text)
            refused = text
        if time.monotonic() > deadline:
            raise RendezvousError(f"no rendezvous attempt at {addr}:{port} admitted pod {pod} within {timeout:.0f} s "
                                  f"(--rendezvous-timeout): {text}")
        time.sleep(RETRY_SECONDS)


def _request(addr: str, port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request to pod 0's store: its status and body, or UNREACHABLE and why."""
    connection = http.client.HTTPConnection(addr, port, timeout=REQUEST_SECONDS)
    try:
        connection.request(method, path, body=body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    except (OSError, http.client.HTTPException) as exc:
        return UNREACHABLE, f"not reachable: {exc}".encode()
    finally:
        connection.close()


class Relay(ThreadingHTTPServer):
    """A pod's ranks' way to pod 0's store, on 127.0.0.1: each request passed on under the attempt's id.
    Horovod's C++ client retries a refusal a few times, then the rank fails."""

    daemon_threads = True

    def __init__(self, addr: str, port: int, attempt: str):
        super().__init__(("127.0.0.1", 0), RelayHandler)
        self.upstream = (addr, port)
        self.attempt = attempt
        threading.Thread(target=self.serve_forever, daemon=True).start()


class RelayHandler(BaseHTTPRequestHandler):
    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, answer = _request(*self.server.upstream, self.command, f"/{self.server.attempt}{self.path}", body)
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_PUT = do_DELETE = relay

    def log_message(self, format, *args):   # not a line per request: a rank polls every 10 ms while it waits
        pass
