"""Object-store helpers shared by the publish stage and the landing-zone ingest.

A *store* is either an S3 bucket prefix (boto3; any S3-compatible endpoint
such as MinIO or moto via ``endpoint_url``) or a local directory, behind one
small interface (:class:`S3Store`, :class:`LocalStore`).  Keys are
``/``-separated and relative to the store's prefix.

Credentials never appear here: boto3 resolves them through its default chain
(environment ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, shared config
files, instance/IRSA roles; the Airflow DAG may fill the environment from an
Airflow connection).  They are never read from params.yaml and never logged.
The endpoint URL comes from the argument, else ``MMREC_S3_ENDPOINT_URL``, else
boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Network faults: every client has bounded timeouts and botocore's ``standard``
retry mode (connection errors, resets, timeouts, throttling and 5xx are retried
with jittered exponential back-off), so a short outage is ridden out and a long
one fails the task with a clear error within a bounded time instead of hanging
(an S3 endpoint that accepts connections but never answers would otherwise
hold a task for 5 x 60 s).  Environment: ``MMREC_S3_CONNECT_TIMEOUT`` (default
10 s), ``MMREC_S3_READ_TIMEOUT`` (60 s), ``AWS_MAX_ATTEMPTS`` (5, first try
included), ``AWS_RETRY_MODE`` (``standard``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .io import atomic_path, sweep_stale_temps

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without bucket: {url!r}")
    return bucket, prefix.strip("/")


def endpoint_from_env(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("MMREC_S3_ENDPOINT_URL") or None


def _env_number(name: str, default: float, cast=float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"environment {name}={raw!r}: not a number") from None
    if value <= 0:
        raise ValueError(f"environment {name}={raw!r}: must be > 0")
    return value


def client_config():
    """botocore Config: bounded timeouts + standard retries (see the module docstring)."""
    from botocore.config import Config

    return Config(connect_timeout=_env_number("MMREC_S3_CONNECT_TIMEOUT", 10.0),
                  read_timeout=_env_number("MMREC_S3_READ_TIMEOUT", 60.0),
                  retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
                           "max_attempts": int(_env_number("AWS_MAX_ATTEMPTS", 5, int))})


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client; credentials from boto3's default chain only."""
    import boto3

    kwargs: dict[str, Any] = {"config": client_config()}
    endpoint_url = endpoint_from_env(endpoint_url)
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if region:
        kwargs["region_name"] = region
    return boto3.session.Session().client("s3", **kwargs)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStore:
    """A directory used as an object store (publishing without S3, tests)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._swept = False

    def _sweep(self) -> None:
        """Before the first write: drop temp files of writers killed earlier (see io)."""
        if not self._swept:
            self._swept = True
            if self.root.is_dir():
                sweep_stale_temps(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        rel = PurePosixPath(key)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"bad key {key!r}")
        return self.root.joinpath(*rel.parts)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_bytes(self, key: str) -> bytes | None:
        p = self._path(key)
        return p.read_bytes() if p.is_file() else None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._sweep()
        with atomic_path(self._path(key)) as tmp:
            tmp.write_bytes(data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self._sweep()
        with atomic_path(self._path(key)) as tmp:
            shutil.copyfile(path, tmp)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()
                      and not any(x.startswith(".") and ".tmp-" in x for x in p.relative_to(self.root).parts))

    def get_json(self, key: str) -> Any | None:
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class S3Store:
    """``s3://bucket/prefix`` as an object store."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, client=None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or s3_client(endpoint_url, region)

    @classmethod
    def from_url(cls, url: str, **kw) -> "S3Store":
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kw)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, key: str) -> str:
        return _join(self.prefix, key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return obj["Body"].read()

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(str(path), self.bucket, self.key(key))

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        full = self.key(prefix)
        if full and prefix.endswith("/"):
            full += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.iter_keys(prefix))

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Immediate "sub-folders" (common prefixes) under ``prefix``."""
        full = self.key(prefix)
        full = f"{full}/" if full else ""
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                out.append(cp["Prefix"][len(full):].strip("/"))
        return sorted(out)

    def download_dir(self, prefix: str, dest: str | os.PathLike) -> list[Path]:
        """Download every object under ``prefix/`` into ``dest`` (relative layout kept)."""
        dest = Path(dest)
        files = []
        base = prefix.strip("/") + "/"
        for key in self.iter_keys(base):
            rel = PurePosixPath(key[len(base):])
            if not rel.parts or ".." in rel.parts:
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self.key(key), str(target))
            files.append(target)
        return files

    def move_dir(self, src: str, dst: str) -> None:
        """Server-side copy of every object under ``src/`` to ``dst/``, then delete the originals."""
        base = src.strip("/") + "/"
        for key in list(self.iter_keys(base)):
            rel = key[len(base):]
            self.client.copy_object(Bucket=self.bucket, Key=self.key(_join(dst, rel)),
                                    CopySource={"Bucket": self.bucket, "Key": self.key(key)})
            self.client.delete_object(Bucket=self.bucket, Key=self.key(key))

    def get_json(self, key: str) -> Any | None:
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def open_store(url_or_path: str, *, endpoint_url: str | None = None, region: str | None = None):
    """``s3://bucket/prefix`` -> :class:`S3Store`; anything else -> :class:`LocalStore`."""
    if str(url_or_path).startswith("s3://"):
        return S3Store.from_url(str(url_or_path), endpoint_url=endpoint_url, region=region)
    return LocalStore(url_or_path)
