"""The fault proxy itself: an "after" cut loses the armed request's response, however the
server writes it."""

import socket
import threading

import pytest

from tests.fault_proxy import FaultProxy
from tests.s3_server import free_port


def _listen() -> tuple[int, socket.socket]:
    port = free_port()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4)
    return port, ls


def _recv_until(sock: socket.socket, suffix: bytes) -> bytes:
    """What arrives until it ends with ``suffix`` or the peer closes."""
    got = b""
    while not got.endswith(suffix):
        data = sock.recv(4096)
        if not data:
            break
        got += data
    return got


def _one_shot_server(reply: bytes) -> int:
    """A server that reads one request (head + 5-byte body) and writes ``reply`` at once."""
    port, ls = _listen()

    def serve():
        conn, _ = ls.accept()
        _recv_until(conn, b"hello")
        conn.sendall(reply)
        conn.close()
        ls.close()

    threading.Thread(target=serve, daemon=True).start()
    return port


def test_an_after_cut_loses_a_final_response_that_came_with_its_100_continue():
    # a client that sends its body without waiting: "100 Continue" and the answer in one write
    port = _one_shot_server(b"HTTP/1.1 100 Continue\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy = FaultProxy(port)
    try:
        proxy.arm(1, "after")
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        s.sendall(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
                  b"hello")
        got = b""
        while True:
            try:
                data = s.recv(4096)
            except OSError:
                break
            if not data:
                break
            got += data
        s.close()
        assert got.startswith(b"HTTP/1.1 100 Continue")
        assert b"200 OK" not in got and proxy.is_down
    finally:
        proxy.close()


def _echo_server(n_requests: int) -> int:
    """A keep-alive server that answers ``n_requests`` bodiless requests with 200 each."""
    port, ls = _listen()

    def serve():
        conn, _ = ls.accept()
        buf, answered = b"", 0
        while answered < n_requests:
            data = conn.recv(4096)
            if not data:
                break
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                answered += 1
        conn.close()
        ls.close()

    threading.Thread(target=serve, daemon=True).start()
    return port


def _exchange(s: socket.socket, line: str) -> bytes:
    s.sendall(f"{line}\r\nHost: a\r\n\r\n".encode())
    return _recv_until(s, b"ok")


@pytest.mark.parametrize("distinct, cut_path", [(True, "/c"), (False, "/b")])
def test_a_distinct_count_skips_a_retried_request_line(distinct, cut_path):
    """PUT a, PUT b, PUT b (the client's retry), PUT c, armed at the 3rd PUT: with ``distinct``
    the cut comes at c, the retry of b passing; a plain count cuts at the retry."""
    paths = ["/a", "/b", "/b", "/c"]
    cut = paths.index(cut_path, 2)
    proxy = FaultProxy(_echo_server(len(paths)))
    try:
        proxy.arm(3, "before", method="PUT", distinct=distinct)
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        for path in paths[:cut]:
            assert _exchange(s, f"PUT {path} HTTP/1.1").endswith(b"ok"), path
        assert not proxy.is_down
        try:
            got = _exchange(s, f"PUT {paths[cut]} HTTP/1.1")
        except OSError:
            got = b""
        s.close()
        assert got == b"" and proxy.is_down
        assert proxy.requests == [f"PUT {p} HTTP/1.1" for p in paths[:cut + 1]]
    finally:
        proxy.close()
