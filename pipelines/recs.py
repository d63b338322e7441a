"""``python -m pipelines recommend USER_ID``: one user's top-K list with its reasons.

Reads the fuse stage's ``recommendations.parquet`` (``user_id, item_id, rank, score, reason,
sources``) and, for titles, the split's ``items.parquet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from .data import item_titles
from .schema import ITEM, RECOMMENDATION_COLUMNS, USER


def user_list(recs: pd.DataFrame, user_id: str, k: int, titles: dict[str, str] | None = None) -> list[dict]:
    """The user's first ``k`` recommendations in rank order, each with its title (or id)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    missing = [c for c in RECOMMENDATION_COLUMNS if c not in recs.columns]
    if missing:
        raise ValueError(f"recommendations lack the columns {missing}")
    mine = recs[recs[USER].astype(str) == str(user_id)].sort_values("rank", kind="stable").head(k)
    titles = titles or {}
    out = []
    for row in mine.itertuples(index=False):
        item = str(getattr(row, ITEM))
        out.append({"rank": int(row.rank), "item_id": item, "title": titles.get(item, item),
                    "score": float(row.score), "reason": str(row.reason),
                    "sources": [s for s in str(row.sources).split(",") if s]})
    return out


def render(rows: list[dict], user_id: str) -> str:
    width = min(max((len(r["title"]) for r in rows), default=5), 48)
    lines = [f"Top {len(rows)} for user {user_id}"]
    for r in rows:
        title = r["title"] if len(r["title"]) <= width else r["title"][:width - 3] + "..."
        lines.append(f"{r['rank']:>3}. {title:<{width}}  {r['score']:7.3f}  {r['reason']}")
    return "\n".join(lines)


def recommend_cli(argv=None) -> int:
    """``python -m pipelines recommend USER_ID [-k K] [--recs DIR] [--split DIR] [--json]``."""
    ap = argparse.ArgumentParser(prog="python -m pipelines recommend",
                                 description="Print one user's top-K recommendations with reasons.")
    ap.add_argument("user_id")
    ap.add_argument("-k", type=int, default=10, help="how many (at most fuse.k are stored)")
    ap.add_argument("--recs", default="artifacts/fuse",
                    help="fuse output directory (holds recommendations.parquet)")
    ap.add_argument("--split", default="artifacts/split", help="split directory (item titles)")
    ap.add_argument("--json", action="store_true", help="print the list as JSON")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"-k must be >= 1, got {args.k}")
    path = Path(args.recs) / "recommendations.parquet"
    if not path.is_file():
        print(f"error: no recommendations at {path} (run the fuse stage first)", file=sys.stderr)
        return 1
    table = pq.read_table(path, filters=[(USER, "=", str(args.user_id))])
    if table.num_rows == 0:
        print(f"error: no recommendations for user '{args.user_id}' in {path}", file=sys.stderr)
        return 2
    recs = table.to_pandas()
    rows = user_list(recs, args.user_id, args.k,
                     item_titles(args.split, recs[ITEM].astype(str).tolist()))
    print(json.dumps(rows, indent=2) if args.json else render(rows, args.user_id))
    return 0


__all__ = ["user_list", "render", "recommend_cli"]
