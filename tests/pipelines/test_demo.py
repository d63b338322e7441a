"""The synthetic demo dataset: contract, determinism, media, and a real taste structure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines import demo
from pipelines.schema import load_raw, normalise

SMALL = dict(n_users=200, n_items=100, interactions_per_user=20, image_size=32, video_frames=6,
             seed=3)


def _media_off(**kw):
    return {**kw, "with_images": False, "with_videos": False}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "ds"
    summary = demo.generate(out, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def tables(ds):
    out, _ = ds
    ratings = pd.read_csv(out / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(out / "items.csv", dtype={"item_id": str}, keep_default_na=False)
    users = pd.read_csv(out / "users.csv", dtype={"user_id": str})
    truth = json.loads((out / "truth.json").read_text())
    return ratings, items, users, truth


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# ----------------------------------------------------------------------------- contract


def test_files_follow_the_contract_and_load(ds, tables):
    out, summary = ds
    ratings, items, users, truth = tables
    raw = load_raw(out)
    assert raw.users is not None and set(raw.files) == {"ratings", "items", "users"}
    norm = normalise(raw)
    assert len(norm.ratings) == summary["n_ratings"] == len(ratings)
    assert list(ratings.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert {"item_id", "title", "description", "genres", "director", "cast", "year", "image",
            "video"} <= set(items.columns)
    assert {"user_id", "age", "gender", "occupation", "city"} <= set(users.columns)
    assert len(users) == SMALL["n_users"] and len(items) == SMALL["n_items"]
    assert users.user_id.is_unique and items.item_id.is_unique
    # ratings: int 1..5, Unix-second int timestamps, ids that exist, no duplicate pairs
    assert ratings.rating.dtype.kind == "i" and ratings.rating.between(1, 5).all()
    assert set(ratings.rating) == {1, 2, 3, 4, 5}
    assert ratings.timestamp.dtype.kind == "i" and ratings.timestamp.between(1.4e9, 1.6e9).all()
    assert set(ratings.user_id) <= set(users.user_id) and set(ratings.item_id) <= set(items.item_id)
    assert not ratings.duplicated(["user_id", "item_id"]).any()
    # timestamps strictly increase within each user's history
    assert (ratings.groupby("user_id", sort=False).timestamp.diff().dropna() > 0).all()
    # genres are |-separated known genres, every item has text
    known = {g for t in demo.TOPICS for g in t.genres}
    assert all(set(g.split("|")) <= known for g in items.genres)
    assert (items.title.str.len() > 0).all() and (items.description.str.len() > 20).all()
    assert truth["topic_names"] == summary["topics"] and len(summary["topics"]) == 8


def test_media_paths_are_relative_exist_and_a_few_are_missing(ds, tables):
    out, summary = ds
    _, items, _, _ = tables
    for col, folder, ext in (("image", "images", "png"), ("video", "videos", "mp4")):
        present = items[items[col] != ""]
        assert all(p == f"{folder}/{i}.{ext}" for i, p in zip(present.item_id, present[col]))
        assert all((out / p).is_file() for p in present[col])
        assert len(list((out / folder).iterdir())) == len(present)
        missing = (items[col] == "").sum()
        assert 1 <= missing <= 0.2 * len(items)  # a small share exercises missing modalities
    assert summary["n_images"] == (items.image != "").sum()
    assert summary["n_videos"] == (items.video != "").sum()


def test_images_decode_with_pillow(ds, tables):
    out, _ = ds
    _, items, _, _ = tables
    for p in items.image[items.image != ""]:
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)


def test_videos_decode_with_pyav_with_the_expected_frames(ds, tables):
    out, summary = ds
    _, items, _, _ = tables
    assert summary["video_codec"] in ("libx264", "mpeg4")
    paths = list(items.video[items.video != ""])
    moving = 0
    for p in paths:
        frames = _decode(out / p)
        assert frames.shape == (SMALL["video_frames"], 32, 32, 3)
        moving += np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2
    assert moving >= 0.8 * len(paths)  # the clips animate, they are not stills


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes(ds, tmp_path):
    out, summary = ds
    again = demo.generate(tmp_path / "again", **SMALL)
    a, b = _files(out), _files(tmp_path / "again")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".mp4"):
            np.testing.assert_array_equal(_decode(out / name), _decode(tmp_path / "again" / name))
        assert a[name] == b[name], name  # single-threaded encoding: videos are byte-identical too
    assert {k: v for k, v in again.items() if k not in ("seconds", "out_dir")} == \
        {k: v for k, v in summary.items() if k not in ("seconds", "out_dir")}


def test_another_seed_gives_another_dataset(ds, tmp_path):
    out, _ = ds
    demo.generate(tmp_path / "s4", **_media_off(**{**SMALL, "seed": 4}))
    assert (tmp_path / "s4" / "ratings.csv").read_bytes() != (out / "ratings.csv").read_bytes()
    assert (tmp_path / "s4" / "users.csv").read_bytes() != (out / "users.csv").read_bytes()


def test_media_switches_do_not_change_the_tables(ds, tmp_path):
    out, _ = ds
    s = demo.generate(tmp_path / "bare", **_media_off(**SMALL))
    assert s["n_images"] == s["n_videos"] == 0 and s["video_codec"] is None
    assert not (tmp_path / "bare" / "images").exists()
    assert not (tmp_path / "bare" / "videos").exists()
    assert (tmp_path / "bare" / "ratings.csv").read_bytes() == (out / "ratings.csv").read_bytes()
    assert (tmp_path / "bare" / "users.csv").read_bytes() == (out / "users.csv").read_bytes()
    items = pd.read_csv(tmp_path / "bare" / "items.csv", dtype=str, keep_default_na=False)
    assert (items.image == "").all() and (items.video == "").all()


def test_chunked_generation_matches_its_plan(monkeypatch):
    """Ratings stream in user chunks; chunk boundaries must not lose or duplicate rows."""
    topics = demo.TOPICS[:5]
    users, ul = demo.make_users(50, topics, seed=1)
    _, il = demo.make_items(60, topics, seed=1)
    n = demo._activity(50, 60, 12, seed=1)
    monkeypatch.setattr(demo, "_chunk_size", lambda n_items: 7)
    chunks = list(demo.iter_ratings(60, ul["taste_start"], ul["taste_end"], il["mix"],
                                    il["popularity"], il["quality"], n, seed=1))
    assert len(chunks) == 8  # ceil(50 / 7)
    u = np.concatenate([c[0] for c in chunks])
    i = np.concatenate([c[1] for c in chunks])
    np.testing.assert_array_equal(np.bincount(u, minlength=50), n)
    assert len(set(zip(u.tolist(), i.tolist()))) == len(u)
    assert np.all(np.diff(u) >= 0)  # user-major order, as appended to the CSV


# ------------------------------------------------------------------------ formats / CLI / safety


def test_cli_parquet_matches_csv(ds, tmp_path, capsys):
    out, _ = ds
    args = ["--out", str(tmp_path / "pq"), "--users", "200", "--items", "100",
            "--interactions", "20", "--seed", "3", "--no-images", "--no-videos",
            "--format", "parquet"]
    assert demo.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "parquet" and summary["n_images"] == 0
    pq = normalise(load_raw(tmp_path / "pq"))
    assert pq.files["ratings"].suffix == ".parquet"
    csv = normalise(load_raw(out))
    pd.testing.assert_frame_equal(pq.ratings, csv.ratings)
    assert pq.items.image.isna().all()  # media switched off: null, not ""


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        demo.generate(precious, **_media_off(n_users=5, n_items=5))
    assert (precious / "keep.txt").read_text() == "mine"


def test_failure_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    demo.generate(out, **_media_off(n_users=20, n_items=10))
    before = _files(out)

    def boom(*a, **k):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(demo, "write_video", boom)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        demo.generate(out, n_users=20, n_items=10, seed=9, image_size=16)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp dirs left behind


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_topics"):
        demo.generate(tmp_path / "x", n_topics=demo.MAX_TOPICS + 1)
    with pytest.raises(ValueError, match="fmt"):
        demo.generate(tmp_path / "x", fmt="xlsx")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- latent structure


def test_users_interact_with_their_top_topics_far_more_than_chance(tables):
    ratings, items, _, truth = tables
    topic_of = truth["item_topic"]
    catalogue = pd.Series(topic_of).value_counts(normalize=True)
    top = truth["user_top_topics"]
    chance1_u = {u: catalogue.get(t[0], 0.0) for u, t in top.items()}
    chance3_u = {u: sum(catalogue.get(x, 0.0) for x in t) for u, t in top.items()}
    r_topic = ratings.item_id.map(topic_of)
    top1 = np.array([t == top[u][0] for u, t in zip(ratings.user_id, r_topic)])
    assert top1.mean() > 2 * ratings.user_id.map(chance1_u).mean()
    top3 = np.array([t in top[u] for u, t in zip(ratings.user_id, r_topic)])
    assert top3.mean() > 1.4 * ratings.user_id.map(chance3_u).mean()
    # and rate them higher
    assert ratings.rating[top1].mean() > ratings.rating[~top1].mean() + 0.5


def test_tastes_are_correlated_with_user_attributes(tables):
    ratings, _, users, truth = tables
    names = truth["topic_names"]
    taste = np.array([truth["user_taste_start"][u] for u in users.user_id])
    for attr, key in (("age_group", None), ("occupation", "occupation")):
        groups = (users.user_id.map(truth["user_age_group"]) if key is None
                  else users[key]).to_numpy()
        eff = truth["attribute_effects"][attr]
        dev, expected = [], []
        for g in np.unique(groups):
            mask = groups == g
            if mask.sum() < 5:
                continue
            dev.extend(np.log(taste[mask].mean(0)) - np.log(taste.mean(0)))
            expected.extend(eff[g][n] for n in names)
        assert np.corrcoef(dev, expected)[0, 1] > 0.5, attr
    # visible in behaviour too: per age group, over-consumed topics are the favoured ones
    r_topic = ratings.item_id.map(truth["item_topic"])
    r_group = ratings.user_id.map(truth["user_age_group"])
    share = pd.crosstab(r_group, r_topic, normalize="index")
    overall = r_topic.value_counts(normalize=True)
    eff = pd.DataFrame(truth["attribute_effects"]["age_group"]).T.loc[share.index, share.columns]
    assert np.corrcoef((share - overall).to_numpy().ravel(), eff.to_numpy().ravel())[0, 1] > 0.5


def test_activity_is_heavy_tailed_and_popularity_long_tailed(tables):
    ratings, _, _, _ = tables
    per_user = ratings.groupby("user_id").size()
    assert 15 < per_user.mean() < 25  # asked for ~20
    assert per_user.max() > 3 * per_user.median()
    per_item = ratings.groupby("item_id").size().sort_values(ascending=False)
    assert per_item.iloc[:10].sum() > 3 * per_item.iloc[-10:].sum()


def test_tastes_drift_over_each_history(tables):
    ratings, _, _, truth = tables
    mix = np.array([truth["item_topic_mix"][i] for i in ratings.item_id])
    start = np.array([truth["user_taste_start"][u] for u in ratings.user_id])
    end = np.array([truth["user_taste_end"][u] for u in ratings.user_id])
    # how much better each consumed item fits the user's late taste than the early one ...
    fit = ((end - start) * mix).sum(1)
    # ... against its position in the user's history; both centred per user
    pos = ratings.groupby("user_id", sort=False).cumcount() / ratings.groupby("user_id").user_id \
        .transform("size")
    df = pd.DataFrame({"u": ratings.user_id, "fit": fit, "pos": pos})
    centred = df[["fit", "pos"]] - df.groupby("u")[["fit", "pos"]].transform("mean")
    corr = np.corrcoef(centred.fit, centred.pos)[0, 1]
    assert corr > 0.1  # without drift this is 0 +- ~0.016 (1/sqrt(4000))


def test_same_topic_images_are_closer_in_pixel_space(ds, tables):
    out, _ = ds
    _, items, _, truth = tables
    has = items[items.image != ""]
    x = np.stack([np.asarray(Image.open(out / p), np.float32).ravel() / 255 for p in has.image])
    y = np.array([truth["item_topic"][i] for i in has.item_id])
    d = ((x[:, None, :] - x[None, :, :]) ** 2).mean(-1)
    same = y[:, None] == y[None, :]
    off = ~np.eye(len(y), dtype=bool)
    assert d[same & off].mean() < 0.5 * d[~same].mean()
    # leave-one-out nearest neighbour recovers the topic from pixels alone
    d[~off] = np.inf
    assert (y[d.argmin(1)] == y).mean() > 0.9


def test_item_texts_use_their_topic_vocabulary(tables):
    _, items, _, truth = tables
    vocab = {t["name"]: {w.lower() for w in t["words"]} for t in truth["topics"]}

    def hits(text: str, words: set[str]) -> int:
        text = text.lower()
        return sum(bool(re.search(rf"\b{re.escape(w)}\b", text)) for w in words)

    own, best = 0, 0
    for i, title, desc in zip(items.item_id, items.title, items.description):
        topic = truth["item_topic"][i]
        counts = {n: hits(f"{title}. {desc}", v) for n, v in vocab.items()}
        own += counts[topic] >= 2
        best += max(counts, key=counts.get) == topic
    assert own / len(items) > 0.95  # nearly every item names several topic words
    assert best / len(items) > 0.8  # and its own topic is the most-mentioned one


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_every_motion_encodes_and_decodes(tmp_path, codec):
    try:
        av.codec.Codec(codec, "w")
    except (ValueError, av.error.FFmpegError):
        pytest.skip(f"{codec} encoder not in this FFmpeg build")
    motions = sorted({t.motion for t in demo.TOPICS})
    assert len(motions) == len(demo.TOPICS)  # each topic moves its own way
    for k, t in enumerate(demo.TOPICS):
        frames = demo.animate(demo.item_image(0, k, t, 32), t.motion, 5, np.random.default_rng(k))
        assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
        assert len({f.tobytes() for f in frames}) > 1, t.motion
        demo.write_video(tmp_path / f"{k}.mp4", frames, fps=8, codec=codec)
        back = _decode(tmp_path / f"{k}.mp4")
        assert back.shape == frames.shape
        assert np.abs(back.astype(int) - frames.astype(int)).mean() < 25  # lossy but faithful
