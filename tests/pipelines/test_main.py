"""``python -m pipelines metrics``: the compact table `make run` prints."""

from __future__ import annotations

import json

from pipelines.__main__ import main


def test_metrics_table_sorted_by_all_slice(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({
        "popularity": {"all": {"ndcg@10": 0.25}, "cold_users": {"ndcg@10": 0.1}},
        "hybrid": {"all": {"ndcg@10": 0.5}, "cold_users": {"ndcg@10": 0.3}, "cold_items": {"ndcg@10": 0.05}},
    }))
    assert main(["metrics", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ndcg@10", "all", "cold_users", "cold_items"]
    assert lines[1].split() == ["hybrid", "0.5000", "0.3000", "0.0500"]
    assert lines[2].split() == ["popularity", "0.2500", "0.1000", "nan"]


def test_metrics_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["metrics", str(tmp_path / "nope.json")]) == 1
    assert "nope.json: no such file" in capsys.readouterr().err
