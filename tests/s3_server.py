"""A real S3-compatible server process for integration tests (moto in server mode).

``moto_server()`` starts ``python -m moto.server`` on 127.0.0.1 and a free
port, waits until it answers, yields an :class:`S3Server` and stops the
process at exit.  Credentials are fake and only ever passed through the
environment (``S3Server.env()``), like real ones would be.

    from tests.s3_server import moto_server

    @pytest.fixture(scope="module")
    def s3():
        with moto_server() as server:
            yield server
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator

ACCESS_KEY = "mmrec-test-access-key"
SECRET_KEY = "mmrec-test-secret-0f3b9c"  # tests grep logs/reports for it
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen

    def env(self, base: dict | None = None) -> dict:
        """Environment for a process talking to this server (boto3 / DVC default chain)."""
        e = dict(os.environ if base is None else base)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            e.pop(k, None)
        e.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                  "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"})
        return e

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                     region_name=REGION).client("s3", endpoint_url=self.endpoint_url)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[S3Server]:
    port = free_port()
    # The server logs every request on stderr: a file, never an unread pipe (a full pipe buffer
    # blocks the server after a few hundred requests, e.g. a `dvc push` then a listing).
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited ({proc.returncode}): {log.read()[-4000:]!r}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {url} did not start in {timeout}s") from None
                time.sleep(0.1)
        yield S3Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
