"""The fault proxy itself: an "after" cut loses the armed request's response, however the
server writes it."""

import socket
import threading

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


def _one_shot_server(reply: bytes, interim: bytes = b"", got: list | None = None) -> int:
    """A server that reads one request (head + 5-byte body) and writes ``reply`` at once;
    with ``interim``, writes it as soon as the head is in, before reading the body (into
    ``got``)."""
    port, ls = _listen()

    def serve():
        conn, _ = ls.accept()
        if interim:
            _recv_until(conn, b"\r\n\r\n")
            conn.sendall(interim)
        body = _recv_until(conn, b"hello")
        if got is not None:
            got.append(body)
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


def test_an_after_cut_forwards_the_body_past_two_interim_responses_in_one_read():
    """A server that answers "100 Continue" twice at once (seen from moto under load): the
    body still reaches it (it applies the request), then the final response is lost."""
    got: list[bytes] = []
    port = _one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                            interim=b"HTTP/1.1 100 Continue\r\n\r\n" * 2, got=got)
    proxy = FaultProxy(port)
    try:
        proxy.arm(1, "after")
        s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        s.sendall(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        assert _recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        try:
            rest = _recv_until(s, b"ok")
        except OSError:
            rest = b""
        s.close()
        assert got and got[0].endswith(b"hello"), "the body did not reach the server"
        assert b"200 OK" not in rest and proxy.is_down
    finally:
        proxy.close()
