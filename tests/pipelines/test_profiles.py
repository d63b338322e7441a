"""User profiles on generated data with known tastes, and the profile card CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.profiles import (build_profiles, profile_cli, render_card, sample_rows, segment_labels,
                                segment_prior, summary_line, to_records)

DAY = 86400


def taste_data(seed: int = 0):
    """A Drama-heavy catalogue; 'western' users (every 6th) rate only Westerns, 'drama' users
    only dramas, 'mixed' users sample the whole catalogue.  Westerns are from the 1950s, by director Ford."""
    rng = np.random.default_rng(seed)
    n_items = 60
    genres = (["Drama"] * 36 + ["Drama|Romance"] * 8 + ["Western"] * 8 + ["Comedy"] * 8)
    items = pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n_items)],
        "title": [f"Film {i}" for i in range(n_items)],
        "genres": genres,
        "year": [1955 if g == "Western" else 1995 for g in genres],
        "director": ["John Ford" if g == "Western" else f"Dir {i % 7}" for i, g in enumerate(genres)],
        "cast": ["John Wayne|Extra A" if g == "Western" else f"Star {i % 5}|Extra B"
                 for i, g in enumerate(genres)],
    })
    western = np.nonzero(np.array(genres) == "Western")[0]
    drama = np.nonzero(np.array(genres) == "Drama")[0]
    rows, users = [], []
    t0 = 1_600_000_000
    for u in range(30):
        kind = "western" if u % 6 == 0 else ["drama", "mixed"][u % 2]
        gender = "F" if kind == "western" else "M"
        users.append((f"u{u}", 20 + u, gender, "artist" if kind == "western" else "doctor"))
        pool = western if kind == "western" else drama if kind == "drama" else np.arange(n_items)
        for j, i in enumerate(rng.choice(pool, 8, replace=False)):
            rows.append((f"u{u}", f"i{i}", t0 + u * 100 + j * 7 * DAY, float(rng.integers(4, 6))))
    # cold users: one 'western-like' segment (F artist) with 1 interaction, one with none
    users += [("c1", 21, "F", "artist"), ("c2", 22, "F", "artist")]
    rows.append(("c1", f"i{drama[0]}", t0, 4.0))
    users_df = pd.DataFrame(users, columns=["user_id", "age", "gender", "occupation"])
    train = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return train, items, users_df


def _by_user(table):
    return {r["user_id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def profiles():
    train, items, users = taste_data()
    emb = np.eye(60, 8, dtype=np.float32)[:, :8] + 0.1
    present = np.ones(60, bool)
    present[:40] = False  # dramas have no text feature
    kw = pd.DataFrame({"item_id": [f"i{i}" for i in range(60)] * 2,
                       "keyword": ["cowboy" if 44 <= i < 52 else "family" for i in range(60)] + ["film"] * 60,
                       "weight": [1.0] * 60 + [0.5] * 60})
    behaviour = (np.array(["u0", "u1"], dtype=object), np.ones((2, 4), np.float32))
    table = build_profiles(train, items, users, {"min_segment_users": 3, "min_people_items": 2},
                           features={"text": (emb, present)}, keywords=kw, behaviour=behaviour)
    return table, _by_user(table)


def test_one_row_per_user_with_expected_columns(profiles):
    table, by = profiles
    assert table.num_rows == 32 and len(by) == 32
    for col in ("behaviour_embedding", "text_affinity", "image_affinity", "video_affinity", "interests",
                "keywords", "people", "decades", "n_interactions", "first_ts", "last_ts", "days_active",
                "mean_interval_days", "rating_mean", "rating_std", "segment", "cold_start",
                "profile_source", "summary", "shaping_items"):
        assert col in table.column_names, col


def test_genre_lift_beats_the_drama_heavy_prior(profiles):
    _, by = profiles
    for u in ("u0", "u6", "u12"):  # western fans
        ints = by[u]["interests"]
        assert ints[0]["name"] == "Western" and ints[0]["lift"] > 2
        assert "Drama" not in [x["name"] for x in ints]
        assert abs(sum(x["weight"] for x in ints) - 1) < 1e-9
        assert "Western" in by[u]["summary"]
    # drama fans: Drama is over-represented for them (lift > 1) so it is their top interest
    assert by["u2"]["interests"][0]["name"] == "Drama" and by["u2"]["interests"][0]["lift"] > 1
    # weights are sorted descending
    w = [x["weight"] for x in by["u0"]["interests"]]
    assert w == sorted(w, reverse=True)


def test_people_decades_keywords_and_activity(profiles):
    _, by = profiles
    western = by["u0"]
    assert western["people"][0]["name"] in ("John Ford", "John Wayne")
    assert {p["name"] for p in western["people"]} >= {"John Ford", "John Wayne"}
    assert "Extra A" in {p["name"] for p in western["people"]} or western["people"][0]["n_items"] >= 2
    assert western["decades"][0]["name"] == "1950s" and western["decades"][0]["lift"] > 1
    assert western["keywords"][0]["name"] == "cowboy"
    assert "film" not in [k["name"] for k in western["keywords"]]  # on every item: no lift
    assert western["n_interactions"] == 8
    assert western["days_active"] == pytest.approx(49.0)
    assert western["mean_interval_days"] == pytest.approx(7.0)
    assert western["cadence"] == "weekly"
    assert 4 <= western["rating_mean"] <= 5
    assert len(western["shaping_items"]) == 5
    assert all(i in {f"i{k}" for k in range(44, 52)} for i in western["shaping_items"])


def test_modality_affinity_and_behaviour_embedding(profiles):
    _, by = profiles
    a = np.asarray(by["u0"]["text_affinity"])  # westerns have text
    assert a.shape == (8,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert by["u2"]["text_affinity"] is None  # dramas have none
    assert by["u0"]["image_affinity"] is None  # modality absent
    assert by["u0"]["behaviour_embedding"] == [1.0] * 4
    assert by["u2"]["behaviour_embedding"] is None


def test_cold_users_use_their_segment_prior(profiles):
    _, by = profiles
    for u in ("c1", "c2"):
        rec = by[u]
        assert rec["cold_start"] and rec["profile_source"] == "segment-prior"
        # their segment (F artist, like the western fans) suggests Westerns
        assert rec["interests"][0]["name"] == "Western"
        assert "Western" in rec["summary"]
        assert abs(sum(x["weight"] for x in rec["interests"]) - 1) < 1e-9
    assert by["c2"]["n_interactions"] == 0 and by["c2"]["first_ts"] is None
    assert by["c2"]["cadence"] == "inactive"
    assert not by["u0"]["cold_start"] and by["u0"]["profile_source"] == "behaviour"


def test_segments_and_backoff():
    users = pd.DataFrame({"user_id": ["a", "b", "c", "d"], "age": [19, 30, 31, None],
                          "gender": ["F", "M", "M", "F"], "zip": ["1", "2", "3", "4"]})
    parts, names = segment_labels(users, np.array(["a", "b", "c", "d"], dtype=object),
                                  {"segment_max_cardinality": 3})
    assert names == ["age", "gender"]  # zip: too many values
    assert parts["age"].tolist() == ["age 18-24", "age 25-34", "age 25-34", "age ?"]
    vals = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    prior, level = segment_prior(vals, parts, names, np.array([True, True, True, False]), min_users=2)
    assert level.tolist() == [0, 2, 2, 0]  # 'a' alone in its segment: global mean
    np.testing.assert_allclose(prior[1], [0.0, 1.0])
    np.testing.assert_allclose(prior[0], vals[:3].mean(0))


def test_broad_taste_user_has_no_dominant_interest():
    rec = {"interests": [], "decades": [], "people": [], "cadence": "weekly",
           "profile_source": "behaviour", "n_interactions": 20}
    assert summary_line(rec).startswith("broad tastes")


def test_sample_and_records_are_json_friendly(profiles):
    table, _ = profiles
    rows = sample_rows(table, 3)
    recs = to_records(table, rows)
    assert len(recs) == 3 and any(r["cold_start"] for r in recs)
    import json

    json.dumps(recs)


def test_card_and_cli(tmp_path, profiles, capsys):
    table, by = profiles
    text = render_card(by["u0"], {"i44": "Stagecoach"})
    assert "Western" in text and "Segment" in text and "Cold start   no" in text
    d = tmp_path / "prof"
    d.mkdir()
    pq.write_table(table, d / "profiles.parquet")
    split = tmp_path / "split"
    split.mkdir()
    _, items, _ = taste_data()
    items.to_parquet(split / "items.parquet", index=False)
    assert profile_cli(["u0", "--profiles", str(d), "--split", str(split)]) == 0
    out = capsys.readouterr().out
    assert "Profile of user u0" in out and "Western" in out and "John" in out
    shaped = by["u0"]["shaping_items"]
    assert f"Film {shaped[0][1:]}" in out  # titles, not ids
    assert profile_cli(["c2", "--profiles", str(d), "--split", str(split)]) == 0
    assert "COLD START" in capsys.readouterr().out
    assert profile_cli(["nobody", "--profiles", str(d)]) == 2
    assert "unknown user 'nobody'" in capsys.readouterr().err
    assert profile_cli(["u0", "--profiles", str(tmp_path / "missing")]) == 1


def test_cli_via_pipelines_main(tmp_path, profiles):
    import subprocess
    import sys
    from pathlib import Path

    table, _ = profiles
    pq.write_table(table, tmp_path / "profiles.parquet")
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pipelines", "profile", "ghost", "--profiles", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown user" in res.stderr


def test_top_categories_are_the_users_own_shares(profiles):
    table, by = profiles
    assert "top_categories" in table.column_names
    for u in ("u0", "u2"):
        tops = by[u]["top_categories"]
        shares = [x["share"] for x in tops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert by[u]["summary"].startswith(f"mostly {tops[0]['name']}")
    cold = [r for r in by.values() if r["cold_start"]]
    assert cold and all(not r["top_categories"] for r in cold)  # no history: no shares


def test_summary_names_the_majority_then_what_stands_out():
    rec = {"top_categories": [{"name": "Drama", "share": 0.4}, {"name": "Comedy", "share": 0.3},
                              {"name": "Action", "share": 0.2}],
           "interests": [{"name": "Documentary", "weight": 0.6, "lift": 4.9},
                         {"name": "Drama", "weight": 0.4, "lift": 1.1}],
           "decades": [], "people": [], "cadence": "daily", "profile_source": "behaviour",
           "n_interactions": 200}
    assert summary_line(rec) == ("mostly Drama, Comedy and Action, more than most: Documentary (4.9x); "
                                 "active daily")
