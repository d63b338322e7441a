"""Hypothesis strategies for hostile tabular inputs (malformed CSV / parquet datasets).

Used by the property tests of the loaders (``tests/pipelines/test_schema_hostile.py``)
and of the validator (``tests/tasks/test_validate_hostile.py``).  Every strategy
draws *files as bytes* (or Arrow tables written to parquet), so the code under
test reads them from disk exactly as it reads a real dataset.

What is drawn:

* cells: empty / NA spellings, NaN and infinities, huge and negative numbers,
  numbers in other scripts, ISO dates (valid and not), e-mail / phone values,
  path traversal, NUL / BOM / bidi / control characters, quotes, separators,
  newlines, arbitrary unicode and huge fields (up to 30k characters);
* headers: required columns present, missing, duplicated, mis-spelt, empty,
  reserved helper names (``_ts_seconds``), quoted, unicode;
* keys: ids drawn from a tiny pool, so duplicate keys and duplicate
  interactions are common;
* CSV bytes: written with the csv module or naively joined (ragged rows,
  unbalanced quotes), LF / CRLF / CR line ends, UTF-8, UTF-8 with BOM,
  UTF-16, Latin-1 and CP1252 encodings, sometimes truncated mid-row;
* parquet: Arrow columns of every common type (ints, uint64 beyond int64,
  floats with NaN/inf, strings with NUL, binary, bool, timestamps with and
  without time zones, dates, durations, decimals, lists, structs, dictionary,
  null) under the contract's column names, duplicated column names included;
* raw bytes: random, and valid parquet files with flipped bytes or truncated.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

REQUIRED_NAMES = ("user_id", "item_id", "timestamp", "rating")
OTHER_NAMES = ("title", "description", "genres", "image", "video", "age", "email", "phone")
WEIRD_NAMES = ("", " user_id", "USER_ID", "user_id ", "Unnamed: 0", "_ts_seconds", "_item_known",
               "_email", "1", "ü", "a,b", 'x"y', "user_id.1", "\ufeffuser_id", "timestamp\n")

SPECIAL_CELLS = (
    "", " ", "nan", "NaN", "NA", "N/A", "null", "None", "inf", "-inf", "Infinity", "1e309", "-0",
    "0x10", "1_000", "\u0663", "\uff11\uff12", "4.5", "5", "0.5", "3", "-1",
    "881250949", "99999999999", "-62135596800", "9" * 40,
    "2024-02-30T00:00:00Z", "2024-01-01", "1999-12-31T23:59:59+14:00", "1970-01-01T00:00:00+99:00",
    "yesterday", "true", "=cmd|' /C calc'!A0", "person@example.com", "+1 555-010-1234",
    "../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "images/a.jpg", "images/",
    "images/link.jpg", "images/../images/a.jpg", "\x00", "\ufeff", "\u202e", "\r", "\t", '"', '""',
    "\\", ",", "|", "||", "Drama|", "a\nb",
)
ID_POOL = ("1", "2", "3", "u1", "007", " 1", "1.0", "-1", "", "NaN", "用户", "a,b", 'q"x', "\u202e1")
ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252")
MEDIA_CELLS = ("images/a.jpg", "images/link.jpg", "images/dir", "images/fifo.jpg", "images/nope.jpg",
               "../outside.jpg", "/etc/passwd", "images/../../outside.jpg", "images/a.jpg\x00.png",
               "C:\\x.jpg", "~/x.jpg", "images/" + "d/" * 3000 + "x.jpg", "n" * 300 + ".jpg", " ", "")


def huge_field() -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "😀", ",", '"', "a b "]),
                     st.integers(1_000, 30_000))


def cells() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(SPECIAL_CELLS),
        st.sampled_from(ID_POOL),
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(max_size=30),
        huge_field(),
    )


def contract_header(required: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    """A header that usually holds the required names (each dropped 1 time in 6) plus extras."""
    return st.builds(lambda keep, extra: [c for c, k in zip(required, keep) if k] + extra,
                     st.lists(st.integers(0, 5).map(bool), min_size=len(required), max_size=len(required)),
                     st.lists(st.one_of(st.sampled_from(OTHER_NAMES), st.sampled_from(WEIRD_NAMES),
                                        st.sampled_from(required)), max_size=3))


def column_names() -> st.SearchStrategy[list[str]]:
    """A header: usually the required names (some missing), plus extras and oddities."""
    return st.lists(st.one_of(st.sampled_from(REQUIRED_NAMES), st.sampled_from(OTHER_NAMES),
                              st.sampled_from(WEIRD_NAMES), st.text(max_size=6)),
                    min_size=0, max_size=7)


@st.composite
def table_rows(draw, names: list[str], max_rows: int = 12) -> list[list[str]]:
    """Rows for ``names``: mostly plausible values per column, often hostile ones."""
    n = draw(st.integers(0, max_rows))
    plausible = {
        "user_id": st.sampled_from(ID_POOL), "item_id": st.sampled_from(ID_POOL),
        "timestamp": st.sampled_from(("881250949", "881250950", "2001-09-09T01:46:40Z", "")),
        "rating": st.sampled_from(("1", "2.5", "4", "5", "")),
        "image": st.sampled_from(MEDIA_CELLS), "video": st.sampled_from(MEDIA_CELLS),
    }
    rows = []
    for _ in range(n):
        row = []
        for name in names:
            base = plausible.get(name, st.text(max_size=12))
            row.append(draw(st.one_of(base, cells()) if draw(st.booleans()) else base))
        if names and draw(st.integers(0, 9)) == 0:  # ragged row
            row = row[: draw(st.integers(0, len(row)))] + draw(st.lists(cells(), max_size=2))
        rows.append(row)
    return rows


@st.composite
def csv_bytes(draw, names: list[str] | None = None, max_rows: int = 12) -> bytes:
    """One CSV file as bytes (see module docstring for what varies)."""
    names = draw(column_names()) if names is None else names
    rows = draw(table_rows(names, max_rows))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.booleans()):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator=eol)
        if draw(st.integers(0, 9)):  # usually a header
            w.writerow(names)
        w.writerows(rows)
        text = buf.getvalue()
    else:  # naive join: separators / quotes / newlines inside cells break the structure
        lines = [",".join(names)] + [",".join(r) for r in rows]
        text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    enc = draw(st.sampled_from(("utf-8",) * 6 + ENCODINGS))  # mostly UTF-8: get past decoding
    data = text.encode(enc, errors="replace")
    if data and draw(st.integers(0, 11)) == 0:  # truncated mid-file
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


# --------------------------------------------------------------------------- parquet

_INT = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, 2, 3, -1]))
_FLOAT = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.5, 1.0, 4.0, 5.0, 881250949.0]))
_TEXT = st.one_of(st.none(), st.sampled_from(SPECIAL_CELLS), st.sampled_from(ID_POOL),
                  st.sampled_from(MEDIA_CELLS), st.text(max_size=20))
_TS = st.one_of(st.none(), st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)))


def _arrow_column(kind: str, n: int):
    """(strategy for n values, arrow type) of one column kind."""
    if kind == "int64":
        return st.lists(_INT, min_size=n, max_size=n), pa.int64()
    if kind == "uint64":
        return st.lists(st.one_of(st.none(), st.integers(0, 2**64 - 1)), min_size=n, max_size=n), pa.uint64()
    if kind == "float64":
        return st.lists(_FLOAT, min_size=n, max_size=n), pa.float64()
    if kind == "float32":
        return st.lists(st.one_of(st.none(), st.floats(width=32)), min_size=n, max_size=n), pa.float32()
    if kind == "string":
        return st.lists(_TEXT, min_size=n, max_size=n), pa.string()
    if kind == "large_string":
        return st.lists(st.one_of(_TEXT, huge_field()), min_size=n, max_size=n), pa.large_string()
    if kind == "binary":
        return st.lists(st.one_of(st.none(), st.binary(max_size=16)), min_size=n, max_size=n), pa.binary()
    if kind == "bool":
        return st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n), pa.bool_()
    if kind == "ts-naive":
        return st.lists(_TS, min_size=n, max_size=n), pa.timestamp("us")
    if kind == "ts-utc":
        return st.lists(_TS, min_size=n, max_size=n), pa.timestamp("ms", tz="UTC")
    if kind == "ts-offset":
        return st.lists(_TS, min_size=n, max_size=n), pa.timestamp("s", tz="+05:30")
    if kind == "date":
        return st.lists(st.one_of(st.none(), st.dates()), min_size=n, max_size=n), pa.date32()
    if kind == "duration":
        return (st.lists(st.one_of(st.none(), st.timedeltas(min_value=dt.timedelta(days=-9999),
                                                            max_value=dt.timedelta(days=9999))),
                         min_size=n, max_size=n), pa.duration("s"))
    if kind == "decimal":
        dec = st.decimals(min_value=-(10**20), max_value=10**20, places=4, allow_nan=False,
                          allow_infinity=False)
        return (st.lists(st.one_of(st.none(), dec), min_size=n, max_size=n), pa.decimal128(30, 4))
    if kind == "list":
        return (st.lists(st.one_of(st.none(), st.lists(st.integers(-5, 5), max_size=3)), min_size=n,
                         max_size=n), pa.list_(pa.int64()))
    if kind == "struct":
        return (st.lists(st.one_of(st.none(), st.fixed_dictionaries({"a": st.integers(0, 3),
                                                                     "b": st.text(max_size=3)})),
                         min_size=n, max_size=n), pa.struct([("a", pa.int64()), ("b", pa.string())]))
    if kind == "dictionary":
        return st.lists(_TEXT, min_size=n, max_size=n), "dictionary"
    if kind == "null":
        return st.just([None] * n), pa.null()
    raise ValueError(kind)


ARROW_KINDS = ("int64", "uint64", "float64", "float32", "string", "large_string", "binary", "bool",
               "ts-naive", "ts-utc", "ts-offset", "date", "duration", "decimal", "list", "struct",
               "dictionary", "null")


@st.composite
def arrow_tables(draw, required: tuple[str, ...] = REQUIRED_NAMES, max_rows: int = 12) -> pa.Table:
    """An Arrow table whose columns use the contract's names with arbitrary types."""
    n = draw(st.integers(0, max_rows))
    names = [c for c in required if draw(st.integers(0, 5))]  # a required column is sometimes missing
    names += draw(st.lists(st.one_of(st.sampled_from(OTHER_NAMES), st.sampled_from(WEIRD_NAMES),
                                     st.sampled_from(required)), max_size=3))  # dup names possible
    arrays = []
    for _name in names:
        kind = draw(st.sampled_from(ARROW_KINDS))
        values_st, typ = _arrow_column(kind, n)
        values = draw(values_st)
        if typ == "dictionary":
            arr = pa.array(values, type=pa.string()).dictionary_encode()
        else:
            if isinstance(typ, pa.Decimal128Type):
                values = [None if v is None else decimal.Decimal(v) for v in values]
            arr = pa.array(values, type=typ)
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, names=names) if names else pa.table({})


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, a slice cut out, or truncated."""
    out = bytearray(data)
    how = draw(st.sampled_from(["flip", "truncate", "cut", "append"]))
    if how == "flip" and out:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        out = out[: draw(st.integers(0, max(len(out) - 1, 0)))]
    elif how == "cut" and len(out) > 2:
        a = draw(st.integers(0, len(out) - 2))
        b = draw(st.integers(a + 1, len(out)))
        del out[a:b]
    else:
        out += draw(st.binary(min_size=1, max_size=64))
    return bytes(out)


# --------------------------------------------------------------------------- mutated valid datasets

def base_tables() -> dict[str, list[list[str]]]:
    """A tiny valid dataset (header + rows, all text): 12 ratings, 4 items, 4 users."""
    ratings = [["user_id", "item_id", "rating", "timestamp"]]
    t = 881250000
    for u in range(1, 5):
        for i in range(1, 5):
            if (u + i) % 4:
                ratings.append([str(u), str(i), str(1 + (u * i) % 5), str(t)])
                t += 3600
    items = [["item_id", "title", "genres", "image"]] + [
        [str(i), f"Movie {i}", "Drama|Comedy", "images/a.jpg"] for i in range(1, 5)]
    users = [["user_id", "age", "gender"]] + [[str(u), str(20 + u), "MF"[u % 2]] for u in range(1, 5)]
    return {"ratings": ratings, "items": items, "users": users}


@st.composite
def mutated_dataset(draw, max_mutations: int = 3) -> dict[str, bytes]:
    """The valid base dataset with 0..max_mutations hostile edits, as CSV bytes per table.

    Edits: a cell set to a hostile value, a column dropped / renamed / duplicated,
    a row duplicated or cut short, a media path replaced; then each file is
    encoded (mostly UTF-8) with a random line end.  With 0 edits it is valid, so
    both outcomes of validation are exercised.
    """
    tables = {k: [list(r) for r in v] for k, v in base_tables().items()}
    for _ in range(draw(st.integers(0, max_mutations))):
        name = draw(st.sampled_from(sorted(tables)))
        rows = tables[name]
        kind = draw(st.sampled_from(["cell", "cell", "media", "drop-col", "rename-col", "dup-col",
                                     "dup-row", "short-row"]))
        ncol = len(rows[0])
        if kind in ("cell", "media") and len(rows) > 1 and ncol:
            r = draw(st.integers(1, len(rows) - 1))
            c = rows[0].index("image") if kind == "media" and "image" in rows[0] else \
                draw(st.integers(0, ncol - 1))
            if c < len(rows[r]):
                rows[r][c] = draw(st.sampled_from(MEDIA_CELLS) if kind == "media" else cells())
        elif kind == "drop-col" and ncol:
            c = draw(st.integers(0, ncol - 1))
            for row in rows:
                del row[c:c + 1]
        elif kind == "rename-col" and ncol:
            rows[0][draw(st.integers(0, ncol - 1))] = draw(st.sampled_from(WEIRD_NAMES + OTHER_NAMES))
        elif kind == "dup-col" and ncol:
            c = draw(st.integers(0, ncol - 1))
            for row in rows:
                row.append(row[c] if c < len(row) else "")
        elif kind == "dup-row" and len(rows) > 1:
            rows.append(list(rows[draw(st.integers(1, len(rows) - 1))]))
        elif kind == "short-row" and len(rows) > 1:
            r = draw(st.integers(1, len(rows) - 1))
            rows[r] = rows[r][: draw(st.integers(0, len(rows[r])))]
    out = {}
    for name, rows in tables.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(rows)
        enc = draw(st.sampled_from(("utf-8",) * 8 + ENCODINGS))
        out[name] = buf.getvalue().encode(enc, errors="replace")
    return out


_ID_TYPES = ("string", "large_string", "dictionary", "int64", "uint64")
_TS_TYPES = ("int64", "float64", "string-iso", "ts-naive", "ts-utc", "ts-offset", "date")
_RATING_TYPES = ("float64", "float32", "int64", "string", "decimal")


def _typed(values: list[str], kind: str) -> pa.Array:
    if kind in ("string", "large_string"):
        return pa.array(values, type=pa.string() if kind == "string" else pa.large_string())
    if kind == "dictionary":
        return pa.array(values, type=pa.string()).dictionary_encode()
    if kind in ("int64", "uint64"):
        return pa.array([int(float(v)) for v in values], type=pa.int64() if kind == "int64" else pa.uint64())
    if kind in ("float64", "float32"):
        return pa.array([float(v) for v in values], type=pa.float64() if kind == "float64" else pa.float32())
    if kind == "decimal":
        return pa.array([decimal.Decimal(v) for v in values], type=pa.decimal128(10, 2))
    secs = [int(v) for v in values]
    when = [dt.datetime(1970, 1, 1) + dt.timedelta(seconds=s) for s in secs]
    if kind == "string-iso":
        return pa.array([w.isoformat() + "Z" for w in when], type=pa.string())
    if kind == "date":
        return pa.array([w.date() for w in when], type=pa.date32())
    tz = {"ts-naive": None, "ts-utc": "UTC", "ts-offset": "+05:30"}[kind]
    return pa.array(when, type=pa.timestamp("s", tz=tz))


@st.composite
def typed_base_tables(draw) -> dict[str, pa.Table]:
    """The valid base dataset as parquet-ready Arrow tables with a random type per column."""
    out = {}
    for name, rows in base_tables().items():
        header, body = rows[0], rows[1:]
        arrays = []
        for c, col in enumerate(header):
            values = [r[c] for r in body]
            if col in ("user_id", "item_id"):
                kind = draw(st.sampled_from(_ID_TYPES))
            elif col == "timestamp":
                kind = draw(st.sampled_from(_TS_TYPES))
            elif col == "rating":
                kind = draw(st.sampled_from(_RATING_TYPES))
            elif col == "age":
                kind = draw(st.sampled_from(("int64", "string", "float64")))
            else:
                kind = draw(st.sampled_from(("string", "large_string", "dictionary")))
            arrays.append(_typed(values, kind))
        out[name] = pa.Table.from_arrays(arrays, names=header)
    return out
