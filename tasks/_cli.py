"""Shared CLI plumbing for stage modules: argument parsing and readable failures."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from pipelines.schema import DataContractError

log = logging.getLogger("mmrec")


def parser(stage: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=doc)
    p.add_argument("--params", default="params.yaml", help="params file (reads section '%s')" % stage)
    return p


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a stage body; expected failures become one readable line + exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        rc = fn()
    except (DataContractError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)
