"""``python -m pipelines recommend``: one user's top-K list with titles and reasons."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipelines.__main__ import main
from pipelines.recs import render, user_list


def _write(tmp_path, with_titles: bool = True):
    fuse, split = tmp_path / "fuse", tmp_path / "split"
    fuse.mkdir()
    split.mkdir()
    # rows out of rank order, two users, ids that look numeric (stored as strings)
    recs = pd.DataFrame({
        "user_id": ["7", "7", "7", "8", "7"],
        "item_id": ["30", "10", "20", "10", "40"],
        "rank": [3, 1, 2, 1, 4],
        "score": [0.3, 0.9, 0.5, 0.8, 0.1],
        "reason": ["popular with users like you", "because you liked Alpha",
                   "matches your interest in Sci-Fi", "because you liked Beta", "new in the catalogue"],
        "sources": ["popularity", "itemknn,als", "content_text", "als", "content_knn"],
    })
    recs.to_parquet(fuse / "recommendations.parquet", index=False)
    items = pd.DataFrame({"item_id": ["10", "20", "30", "40"]})
    if with_titles:
        items["title"] = ["Ten", "Twenty", "Thirty", "Forty"]
    items.to_parquet(split / "items.parquet", index=False)
    return ["--recs", str(fuse), "--split", str(split)], recs


def test_cli_prints_the_users_list_in_rank_order_with_titles_and_reasons(tmp_path, capsys):
    args, _ = _write(tmp_path)
    assert main(["recommend", "7", "-k", "3", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Top 3 for user 7"
    assert [ln.split()[1] for ln in lines[1:]] == ["Ten", "Twenty", "Thirty"]
    assert lines[1].endswith("because you liked Alpha")
    assert lines[3].endswith("popular with users like you")
    assert "Forty" not in "\n".join(lines)  # k respected


def test_cli_json_carries_ids_scores_and_sources(tmp_path, capsys):
    args, _ = _write(tmp_path)
    assert main(["recommend", "7", "--json", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in rows] == ["10", "20", "30", "40"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["sources"] == ["itemknn", "als"] and rows[0]["score"] == pytest.approx(0.9)
    assert rows[1]["title"] == "Twenty"


def test_without_titles_the_item_id_stands_in(tmp_path, capsys):
    args, _ = _write(tmp_path, with_titles=False)
    assert main(["recommend", "8", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Top 1 for user 8" and len(out) == 2
    assert out[1].split()[:2] == ["1.", "10"]
    assert out[1].endswith("because you liked Beta")


def test_unknown_user_and_missing_file_are_clear_errors(tmp_path, capsys):
    args, _ = _write(tmp_path)
    assert main(["recommend", "nobody", *args]) == 2
    assert "no recommendations for user 'nobody'" in capsys.readouterr().err
    assert main(["recommend", "7", "--recs", str(tmp_path / "none")]) == 1
    assert "run the fuse stage first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["recommend", "7", "-k", "0", *args])


def test_user_list_refuses_bad_input():
    recs = pd.DataFrame({"user_id": ["1"], "item_id": ["2"], "rank": [1], "score": [1.0]})
    with pytest.raises(ValueError, match="lack the columns"):
        user_list(recs, "1", 5)
    full = recs.assign(reason="r", sources="")
    with pytest.raises(ValueError, match="k must be"):
        user_list(full, "1", 0)
    assert user_list(full, "1", 5)[0]["sources"] == []


def test_render_shortens_long_titles():
    rows = [{"rank": 1, "item_id": "1", "title": "x" * 80, "score": 0.5, "reason": "why",
             "sources": []}]
    line = render(rows, "u").splitlines()[1]
    assert "x" * 45 + "..." in line and "x" * 49 not in line and line.endswith("why")
