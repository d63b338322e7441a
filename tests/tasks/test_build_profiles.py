"""build_profiles stage: CLI end to end with features, keywords and a saved encoder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.data import Split
from tasks import build_profiles
from tests.tasks.test_train_encoder import write_modality, write_split


def write_params(path, **kw):
    path.write_text(yaml.safe_dump({"build_profiles": {"min_segment_users": 2, **kw},
                                    "train_encoder": {"bogus": 1}}))
    return path


def test_cli_builds_one_profile_per_user(tmp_path):
    split_dir = write_split(tmp_path / "split")
    split = Split.load(split_dir)
    items = list(split.item_ids)
    text = write_modality(tmp_path / "text", items)
    pd.DataFrame({"item_id": items, "keyword": ["space" if int(i[1:]) < 12 else "love" for i in items],
                  "weight": 1.0}).to_parquet(text / "keywords.parquet", index=False)
    out = tmp_path / "prof"
    rc = build_profiles.main(["--split", str(split_dir), "--text", str(text),
                              "--image", str(tmp_path / "absent"), "--encoder", str(tmp_path / "no-encoder"),
                              "--out", str(out), "--params", str(write_params(tmp_path / "p.yaml"))])
    assert rc == 0
    t = pq.read_table(out / "profiles.parquet")
    assert t.column("user_id").to_pylist() == list(split.users["user_id"])
    by = {r["user_id"]: r for r in t.to_pylist()}
    assert by["u0"]["interests"][0]["name"] in ("Sci-Fi", "Action")
    assert by["u1"]["interests"][0]["name"] == "Romance"
    assert by["u1"]["keywords"][0]["name"] == "love"
    assert by["u1"]["decades"][0]["name"] == "1960s"
    assert by["cold"]["cold_start"] and by["cold"]["profile_source"] == "segment-prior"
    assert by["cold"]["interests"][0]["name"] in ("Sci-Fi", "Action")  # F segment likes block A
    assert by["u0"]["behaviour_embedding"] is None  # no encoder given
    assert by["u0"]["text_affinity"] is not None and by["u0"]["image_affinity"] is None
    sample = json.loads((out / "sample.json").read_text())
    assert 1 <= len(sample) <= 5 and any(s["cold_start"] for s in sample)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_users"] == len(split.users) and summary["n_cold_start"] >= 1


def test_behaviour_embedding_from_saved_encoder(tmp_path):
    pytest.importorskip("torch")
    from pipelines.recommenders.encoder import EncoderRecommender

    split_dir = write_split(tmp_path / "split")
    split = Split.load(split_dir)
    enc = EncoderRecommender(d_model=8, n_heads=2, n_layers=1, max_len=8, epochs=1, batch_size=32,
                             threads=1).set_side_info({}, split.users)
    enc.fit(split.interactions())
    enc.save(tmp_path / "enc" / "model")
    ids, vecs = build_profiles.load_behaviour(tmp_path / "enc")
    assert vecs.shape == (len(split.user_ids), 8)
    table = build_profiles.run(split, {"min_segment_users": 2}, {}, None, (ids, vecs))
    emb = table.column("behaviour_embedding").to_pylist()
    assert all(e is not None and len(e) == 8 for e in emb)
    # the exported (first) member's vector, without its constant column
    np.testing.assert_allclose(emb[0], enc.user_vecs_[0, :8], rtol=1e-6)


def test_unknown_params_fail_without_output(tmp_path):
    split_dir = write_split(tmp_path / "split")
    rc = build_profiles.main(["--split", str(split_dir), "--out", str(tmp_path / "o"),
                              "--params", str(write_params(tmp_path / "p.yaml", colde_user_max=3))])
    assert rc == 1 and not (tmp_path / "o").exists()
