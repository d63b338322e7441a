"""Personal-data detection of the validator: e-mail addresses and phone numbers.

The rule (``pii``): a text column where more than ``validate.pii_share`` of the
values look like an e-mail address or a phone number stops validation unless the
column is listed in ``validate.allow_pii_columns``; offending values are never
copied into messages or reports.  Here: which values count (formats from several
countries, and look-alikes that must not), and the rule end to end on a users
table.  The BAD cases of ``tests/tasks/test_validate.py`` cover the report side.
"""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.expectations import EMAIL_RE, PHONE_RE, PII_RE
from tasks import validate as v
from tests import hostile

EMAILS = ["a@b.org", "first.last+tag@sub.example.co.uk", "Contact: jo@example.com please",
          "JO_99@EXAMPLE.IO"]
PHONES = ["+1 555-010-1234", "(555) 010-1234", "555.010.1234", "555-010-1234", "+442071838750",
          "+44 20 7183 8750", "020 7183 8750", "06 12 34 56 78", "+33 6 12 34 56 78",
          "+49 (0)30 1234 5678"]
NOT_PII = ["881250949", "85711", "2024-01-01", "1990-1999", "01.02.2024", "1.2.3", "Toy Story (1995)",
           "M · 25-34", "12:30:45", "3.14159", "1,234,567", "1990 2000", "Drama|Comedy", "4.5",
           "10 20 30", "+1 20", "user@localhost", "@handle", "a @ b"]


def _matches(values: list[str], pattern: str) -> list[bool]:
    return pd.Series(values, dtype="string[pyarrow]").str.contains(pattern, regex=True).tolist()


@pytest.mark.parametrize("value", EMAILS)
def test_email_addresses_are_personal_data(value):
    assert _matches([value], EMAIL_RE) == [True] and _matches([value], PII_RE) == [True]


@pytest.mark.parametrize("value", PHONES)
def test_phone_numbers_are_personal_data(value):
    assert _matches([value], PHONE_RE) == [True] and _matches([value], PII_RE) == [True]


@pytest.mark.parametrize("value", NOT_PII)
def test_look_alikes_are_not(value):
    assert _matches([value], PII_RE) == [False]


def _dataset(root, contact: list[str]):
    """The base dataset; ``contact`` values spread over users columns contact, contact_1, ..."""
    root.mkdir()
    tables = hostile.base_tables()
    for name, rows in tables.items():
        df = pd.DataFrame(rows[1:], columns=rows[0])
        if name == "users":
            n = len(df)
            for k in range(0, len(contact), n):
                chunk = contact[k:k + n]
                df["contact" + (f"_{k // n}" if k else "")] = [chunk[i % len(chunk)] for i in range(n)]
        df.to_csv(root / f"{name}.csv", index=False)
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff")
    return root


@pytest.mark.parametrize("kind, values", [("phones", PHONES[-4:]), ("emails", EMAILS[:4])])
def test_validation_stops_on_personal_data_unless_allowed(tmp_path, kind, values):
    root = _dataset(tmp_path / "d", values)
    res = v.validate(root, {"data_docs": False})
    assert not res.passed
    [f] = res.errors
    assert (f.rule, f.column) == ("pii", "contact") and "users.csv" in f.file
    word = "phone numbers" if kind == "phones" else "e-mail addresses"
    assert word in f.message
    assert not any(x in res.message() for x in values)  # redacted
    for allow in (["contact"], ["users.contact"]):
        assert v.validate(root, {"data_docs": False, "allow_pii_columns": allow}).passed
    assert not v.validate(root, {"data_docs": False, "allow_pii_columns": ["items.contact"]}).passed


def test_look_alike_columns_pass(tmp_path):
    root = _dataset(tmp_path / "d", NOT_PII)
    assert sum(c.startswith("contact") for c in pd.read_csv(root / "users.csv").columns) == 5
    res = v.validate(root, {"data_docs": False})
    assert res.passed, res.message()
