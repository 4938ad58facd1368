"""A fault-injecting HTTP/1.1 reverse proxy for tests: 127.0.0.1:<free port> in front of a real S3 server.

    rules = [Rule("slowdown", every=4), Rule("reset", every=7, method="PUT")]
    with FaultProxy(s3.endpoint, rules) as proxy:
        env = {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}
        ...
        assert proxy.injected["slowdown"] > 0

Transparent for SigV4: clients sign the Host header they send (the proxy's host:port), so requests are
forwarded byte for byte, Host unchanged; SeaweedFS checks the signature against the Host it receives.

Actions (each rule counts the requests it matches and fires on every `every`-th of them):
- "slowdown": answer 503 with S3's <Code>SlowDown</Code> XML; the server never sees the request.
- "reset": close the connection with a TCP RST (SO_LINGER 0) before forwarding anything.
- "reset_mid": forward the request (the server acts on it: a PUT is stored), then send half of the
  response and reset: the client cannot know whether its request took effect.
- "stall": wait `stall_s` seconds (or until stop()) before forwarding: a server that accepted the
  connection and does not answer.
- "stall_mid": forward, send half of the response, then wait `stall_s`: a stall inside a body.

Only the standard library: one thread per client connection, whole messages read into memory (test
objects are small).
"""

from __future__ import annotations

import collections
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlparse

ACTIONS = ("slowdown", "reset", "reset_mid", "stall", "stall_mid")

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><Resource>{path}</Resource>"
                 b"<RequestId>fault-proxy</RequestId></Error>")


@dataclass
class Rule:
    """Inject `action` into every `every`-th request whose method and path (with query) match.

    `method`: exact HTTP method or None for all; `path`: regex searched in the request target;
    `times`: stop after this many injections (None: never stop)."""

    action: str
    every: int = 1
    method: str | None = None
    path: str | None = None
    times: int | None = None
    stall_s: float = 3600.0
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {ACTIONS}")

    def match(self, method: str, target: str) -> bool:
        """Count a request and say whether to inject into it (called under the proxy's lock)."""
        if self.method and method != self.method:
            return False
        if self.path and not re.search(self.path, target):
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.fired += 1
        return True


class _Closed(Exception):
    """The peer closed the connection between requests: the normal end of a keep-alive connection."""


class _Reader:
    """Buffered reads of HTTP/1.1 framing from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed()
        self.buf += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        """Everything until the peer closes (a response framed by closing the connection)."""
        try:
            while True:
                self._fill()
        except _Closed:
            out, self.buf = self.buf, b""
            return out

    def head(self) -> tuple[bytes, str, dict[str, str]]:
        """(raw head, start line, lower-cased headers)."""
        raw = self.until(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return raw, lines[0], headers

    def body(self, headers: dict[str, str]) -> bytes:
        """The raw (still framed) body of a message with these headers: chunked or Content-Length."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = b""
            while True:
                size_line = self.until(b"\r\n")
                out += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:  # trailers, then an empty line
                    while True:
                        line = self.until(b"\r\n")
                        out += line
                        if line == b"\r\n":
                            return out
                out += self.exactly(size + 2)
        return self.exactly(int(headers.get("content-length", "0")))


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: what a crashed server or a dropping load balancer looks like."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """See the module docstring. Attributes: `endpoint` ("http://127.0.0.1:PORT"), `injected`
    (action -> count), `requests` (requests seen), `rules` (may be replaced between requests)."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rules = list(rules or [])
        self.injected: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str]] = []  # (method, target, action or "") per request
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        if self._listener is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def set_rules(self, rules: list[Rule]) -> None:
        with self._lock:
            self.rules = list(rules)

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "FaultProxy":
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # so the accept loop sees stop()
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self._spawn(self._serve, client)

    # ------------------------------------------------------------------------------------ forwarding
    def _decide(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.requests += 1
            rule = next((r for r in self.rules if r.match(method, target)), None)
            if rule is not None:
                self.injected[rule.action] += 1
            self.log.append((method, target, rule.action if rule else ""))
            return rule

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        with self._lock:
            self._conns.add(client)
        try:
            reader, up_reader = _Reader(client), None
            while not self._stopping.is_set():
                raw, start, headers = reader.head()
                method, target = start.split(" ")[:2]
                rule = self._decide(method, target)
                action = rule.action if rule else None
                if action == "reset":
                    _reset(client)
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    # The client waits for this before sending its body; upstream's own 100 is skipped below.
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = reader.body(headers)
                if action == "slowdown":
                    xml = SLOWDOWN_BODY.replace(b"{path}", target.split("?")[0].encode())
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\n\r\n" % len(xml) + (b"" if method == "HEAD" else xml))
                    continue
                if action == "stall" and self._stopping.wait(rule.stall_s):
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=120)
                    with self._lock:
                        self._conns.add(upstream)
                    up_reader = _Reader(upstream)
                upstream.sendall(raw + body)
                response, close = self._response(up_reader, method)
                if action in ("reset_mid", "stall_mid"):
                    client.sendall(response[:len(response) // 2])
                    if action == "stall_mid" and self._stopping.wait(rule.stall_s):
                        return
                    _reset(client)
                    return
                client.sendall(response)
                if close or headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError):
            pass  # the client (or upstream) went away: nothing to answer
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    s.close()

    @staticmethod
    def _response(up: _Reader, method: str) -> tuple[bytes, bool]:
        """One whole response from upstream (1xx interim responses dropped) and whether it closes."""
        while True:
            raw, start, headers = up.head()
            status = int(start.split(" ")[1])
            if status >= 200:
                break
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower():
            body = up.body(headers)
        else:
            return raw + up.rest(), True
        return raw + body, headers.get("connection", "").lower() == "close"
