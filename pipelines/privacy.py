"""Pseudonymisation of user ids in published artifacts (keyed hash, secret from the environment).

With ``publish.pseudonymize: true`` the publish stage replaces every user id in
what it uploads (profiles, recommendations, metrics, samples) by

    ``u_`` + the first 32 hex digits of HMAC-SHA256(key, user id as UTF-8 text)

where the key is the value of the environment variable named by
``publish.pseudonym_key_env`` (default ``MMREC_PSEUDONYM_KEY``).  The same key
maps the same user to the same pseudonym in every file and every run, so the
published tables still join; without the key the mapping cannot be inverted or
recomputed (unlike a plain hash, which anyone can rebuild from a list of
candidate ids).  The key is never written anywhere and never appears in a
message: errors name the variable, not its value.

What is rewritten: columns named ``user_id`` in parquet / CSV files, and values
under ``user_id`` keys (a string or number) or ``user_ids`` keys (a list) in
JSON files, at any depth.  Any other file type is refused (it could hold ids
the code cannot see), so a new artifact kind cannot leak ids silently.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PREFIX = "u_"
HEX_DIGITS = 32  # 128 bits: collisions are negligible for any user base
MIN_KEY_BYTES = 16
ID_FIELDS = ("user_id",)  # scalar id columns / JSON keys
ID_LIST_FIELDS = ("user_ids",)  # JSON keys holding lists of ids
SUPPORTED = (".parquet", ".json", ".csv")


class PseudonymizationError(ValueError):
    """Pseudonymisation is on but cannot be done (no key, unsupported file, ...)."""


def pseudonym_key(env_name: str) -> bytes:
    """The secret key from the environment; a clear error (naming the variable only) if unusable."""
    if not isinstance(env_name, str) or not env_name.strip():
        raise PseudonymizationError("publish.pseudonym_key_env must name an environment variable")
    value = os.environ.get(env_name, "")
    if not value:
        raise PseudonymizationError(
            f"publish.pseudonymize is on but the environment variable {env_name} is not set (or "
            f"empty): set it to a secret of at least {MIN_KEY_BYTES} bytes, e.g. from a secrets "
            "manager or an Airflow connection; it is never written to params.yaml or any artifact")
    key = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymizationError(f"the secret in {env_name} is too short ({len(key)} bytes; at "
                                    f"least {MIN_KEY_BYTES} are required)")
    return key


class Pseudonymizer:
    """Maps raw user ids to pseudonyms with one key (memoised: ids repeat across rows)."""

    def __init__(self, key: bytes):
        if len(key) < MIN_KEY_BYTES:
            raise PseudonymizationError(f"pseudonym key too short ({len(key)} bytes)")
        self._key = key
        self._memo: dict[str, str] = {}

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(<key hidden>)"

    def __call__(self, raw: Any) -> Any:
        if raw is None or (isinstance(raw, float) and raw != raw):
            return raw
        text = str(raw)
        out = self._memo.get(text)
        if out is None:
            digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()
            out = self._memo[text] = PREFIX + digest[:HEX_DIGITS]
        return out

    def many(self, values: Iterable[Any]) -> list[Any]:
        return [self(v) for v in values]

    # ---- files ----------------------------------------------------------
    def file(self, src: Path, dst: Path) -> None:
        """Write ``src`` with every user id pseudonymised to ``dst`` (see module docstring)."""
        src, dst = Path(src), Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file(src, dst)
        except PseudonymizationError:
            raise
        except (OSError, ValueError) as exc:  # unreadable input: pyarrow / json / csv errors
            raise PseudonymizationError(f"{src}: cannot be pseudonymised ({type(exc).__name__}: "
                                        f"{exc})") from exc

    def _file(self, src: Path, dst: Path) -> None:
        suffix = src.suffix.lower()
        if suffix == ".parquet":
            self._parquet(src, dst)
        elif suffix == ".json":
            obj = json.loads(src.read_text(encoding="utf-8"))
            dst.write_text(json.dumps(self._json(obj), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        elif suffix == ".csv":
            import pandas as pd

            df = pd.read_csv(src, dtype=str, keep_default_na=False, na_values=[""])
            for col in ID_FIELDS:
                if col in df.columns:
                    df[col] = self.many(df[col].tolist())
            df.to_csv(dst, index=False)
        else:
            raise PseudonymizationError(
                f"{src}: cannot pseudonymise '{suffix or src.name}' files (only "
                f"{', '.join(SUPPORTED)}); remove it from the published artifacts or turn "
                "publish.pseudonymize off")

    def _parquet(self, src: Path, dst: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(src)
        nested = [f.name for f in table.schema if _nested_id_field(f.type)]
        if nested:
            raise PseudonymizationError(f"{src}: column(s) {nested} hold nested user_id fields, "
                                        "which cannot be pseudonymised")
        for i, name in enumerate(table.column_names):
            if name in ID_FIELDS:
                values = self.many(table.column(i).to_pylist())
                table = table.set_column(i, pa.field(name, pa.string()), pa.array(values, pa.string()))
        pq.write_table(table, dst)

    def _json(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                if k in ID_FIELDS and isinstance(v, (str, int, float)) and not isinstance(v, bool):
                    out[k] = self(v)
                elif k in ID_LIST_FIELDS and isinstance(v, list):
                    out[k] = [self(x) if isinstance(x, (str, int)) else self._json(x) for x in v]
                else:
                    out[k] = self._json(v)
            return out
        if isinstance(obj, list):
            return [self._json(v) for v in obj]
        return obj


def _nested_id_field(t) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return any(t.field(i).name in ID_FIELDS or _nested_id_field(t.field(i).type)
                   for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _nested_id_field(t.value_type)
    return False


def pseudonymize_files(files: dict[str, Path], key: bytes, out_dir: Path) -> dict[str, Path]:
    """Store key -> pseudonymised copy under ``out_dir/<store key>`` (same keys)."""
    p = Pseudonymizer(key)
    out = {}
    for store_key, src in sorted(files.items()):
        dst = Path(out_dir) / store_key
        p.file(Path(src), dst)
        out[store_key] = dst
    return out


__all__ = ["Pseudonymizer", "PseudonymizationError", "pseudonym_key", "pseudonymize_files",
           "PREFIX", "MIN_KEY_BYTES"]
