"""A TCP proxy in front of a test server that fails on cue, for network-fault tests.

``FaultProxy(upstream_port)`` listens on 127.0.0.1 (its own free port) and forwards
every connection to the upstream server.  It follows the HTTP/1.1 request stream
(Content-Length and chunked bodies, keep-alive) and numbers the requests, so a test
can break the connection at an exact request:

* ``arm(n, "before")``: request ``n`` never reaches the server; the proxy goes down
  (open connections reset, new ones refused) as a crashed server would;
* ``arm(n, "after")``: request ``n`` reaches the server (which applies it) but its
  response is dropped and the proxy goes down: the client cannot know it succeeded;
* ``on_request``: a callback called with each request number before it is forwarded
  (e.g. to SIGSTOP the server there).

``up()`` listens again on the same port (a restarted server); the upstream server
keeps its state, so the retry meets the objects written before the outage.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from tests.s3_server import free_port


def _shutdown(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_INTERIM = b"HTTP/1.1 100"  # an interim response (100 Continue)


class FaultProxy:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        self.host, self.upstream_port = host, upstream_port
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.requests: list[str] = []  # request lines, in order
        self.on_request: Callable[[int], None] | None = None
        self._armed: tuple[int, str, str | None] | None = None
        self._matched = 0  # requests of the armed method so far
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.is_down = False
        self.up()

    # ------------------------------------------------------------------ control
    def arm(self, n: int | None, mode: str = "before", method: str | None = None) -> None:
        """Go down at request number ``n`` (1-based, counted from now on; with ``method``,
        the ``n``-th request of that method, e.g. the 6th PUT whatever else came between)."""
        assert mode in ("before", "after"), mode
        with self._lock:
            self.requests.clear()
            self._matched = 0
            self._armed = None if n is None else (n, mode, method)

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((self.host, self.port))
            ls.listen(64)
            self._listener, self.is_down = ls, False
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones (a crashed server)."""
        with self._lock:
            self.is_down = True
            ls, self._listener = self._listener, None
            socks, self._socks = list(self._socks), set()
        for s in ([ls] if ls is not None else []) + socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.down()

    # ------------------------------------------------------------------ plumbing
    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.upstream_port))
            except OSError:
                client.close()
                continue
            state = {"swallow": False}
            with self._lock:
                if self.is_down:
                    client.close()
                    upstream.close()
                    continue
                self._socks.update((client, upstream))
            threading.Thread(target=self._c2s, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._s2c, args=(upstream, client, state), daemon=True).start()

    def _s2c(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        carry = b""  # an interim response cut by the read boundary, held until it is whole
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if state["swallow"]:
                    # interim "100 Continue" responses pass (a server may send more than one,
                    # several may come in one read, and with a client that sent its body without
                    # waiting the final response may come in the same read); the final response
                    # of the armed request is lost with the server
                    data, passed = carry + data, 0
                    while data.startswith(_INTERIM, passed):
                        end = data.find(b"\r\n\r\n", passed)
                        if end < 0:
                            break
                        passed = end + 4
                    if passed:
                        client.sendall(data[:passed])
                    carry = data[passed:]  # empty, or an interim response not whole yet
                    if carry and not (_INTERIM.startswith(carry) or carry.startswith(_INTERIM)):
                        self.down()
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(client, upstream)

    def _begin(self, head: bytes, state: dict) -> bool:
        """A request head arrived: False if the proxy goes down before forwarding it."""
        with self._lock:
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.requests.append(line)
            n = len(self.requests)
            armed, hit = self._armed, None
            if armed is not None:
                if armed[2] is None:
                    hit = armed[1] if n == armed[0] else None
                elif line.startswith(armed[2] + " "):
                    self._matched += 1
                    hit = armed[1] if self._matched == armed[0] else None
        if self.on_request is not None:
            self.on_request(n)
        if hit == "before":
            self.down()
            return False
        # set before a byte is forwarded: the server may answer before the next line runs
        # (requests are not pipelined: the next data from upstream is this request's answer)
        state["swallow"] = hit == "after"
        return True

    def _c2s(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        buf, mode, remaining = b"", "head", 0
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while buf:
                    if mode == "head":
                        i = buf.find(b"\r\n\r\n")
                        if i < 0:
                            break
                        head, buf = buf[:i + 4], buf[i + 4:]
                        if not self._begin(head, state):
                            return
                        upstream.sendall(head)
                        headers = {}
                        for line in head.split(b"\r\n")[1:]:
                            k, _, v = line.partition(b":")
                            headers[k.strip().lower()] = v.strip().lower()
                        if b"chunked" in headers.get(b"transfer-encoding", b""):
                            mode = "size"
                        elif int(headers.get(b"content-length", b"0") or 0) > 0:
                            mode, remaining = "body", int(headers[b"content-length"])
                    elif mode in ("body", "chunk"):
                        take = min(len(buf), remaining)
                        upstream.sendall(buf[:take])
                        buf, remaining = buf[take:], remaining - take
                        if remaining == 0:
                            mode = "head" if mode == "body" else "size"
                    elif mode in ("size", "trailer"):
                        i = buf.find(b"\r\n")
                        if i < 0:
                            break
                        line, buf = buf[:i + 2], buf[i + 2:]
                        upstream.sendall(line)
                        if mode == "size":
                            size = int(line.split(b";")[0].strip() or b"0", 16)
                            mode, remaining = ("trailer", 0) if size == 0 else ("chunk", size + 2)
                        elif line == b"\r\n":
                            mode = "head"
        except OSError:
            pass
        finally:
            _shutdown(client, upstream)
