import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipelines import fusion as F
from pipelines.data import Interactions, Split
from pipelines.metrics import ndcg
from pipelines.recommenders import ItemKNN, Popularity
from tasks import split as split_stage
from tests.fixtures import write_blocks_dataset

FAST = {"n_estimators": 20, "num_threads": 1, "min_child_samples": 2, "k": 5,
        "early_stopping_rounds": 10, "memory_mb": 64, "cold_user_max": 2, "n_bags": 2}


# --------------------------------------------------------------------------- fixtures

def blocks_split(tmp_path, **split_params) -> Split:
    d = write_blocks_dataset(tmp_path / "ds", n_users=40, n_items=30, per_user=10)
    r = pd.read_csv(d / "ratings.csv", dtype={"user_id": str, "item_id": str})
    items = pd.read_csv(d / "items.csv", dtype={"item_id": str})
    users = pd.read_csv(d / "users.csv", dtype={"user_id": str})
    res = split_stage.split(r, items, {"ratio": 0.7, "seed": 0, "val_ratio": 0.3, **split_params})
    return Split(res["train"], res["test"], users, items, res["slices"])


def block_features(split: Split, dim: int = 8, missing=()) -> dict:
    """Text-like embeddings aligned with the two taste blocks (+ noise)."""
    rng = np.random.default_rng(1)
    ids = split.items["item_id"].astype(str).to_numpy()
    half = len(ids) // 2
    emb = rng.normal(0, 0.1, (len(ids), dim)).astype(np.float32)
    num = np.array([int(i[1:]) for i in ids])
    emb[num < half, 0] += 1.0
    emb[num >= half, 1] += 1.0
    present = ~np.isin(ids, list(missing))
    emb[~present] = 0.0
    return {"text": (ids, emb, present)}


def fit_models(split: Split, fold: str | None):
    data = split.interactions(fold)
    return {"popularity": Popularity().fit(data), "itemknn": ItemKNN(neighbors=10).fit(data)}


@pytest.fixture()
def blocks(tmp_path):
    return blocks_split(tmp_path)


def builder(split, models, fold, feats=None, **params):
    p = F.resolve_params({**FAST, **params})
    items = F.build_item_side(split.items, split.item_ids, feats, p)
    users = F.build_user_side(split.users, split.user_ids, p)
    ctx = F.build_context(split.interactions(fold), items, users, p)
    return F.FeatureBuilder(F.make_sources(models, ctx, items, users, p), ctx, items, users, p), p


# --------------------------------------------------------------------------- item / user side

def test_item_side_genres_titles_and_feature_alignment(blocks):
    ids, emb, present = block_features(blocks, missing=("i3",))["text"]
    # feature table in another order and without one catalogue item
    order = np.argsort(ids)[::-1]
    keep = order[ids[order] != "i7"]
    side = F.build_item_side(blocks.items, blocks.item_ids, {"text": (ids[keep], emb[keep], present[keep])},
                             F.resolve_params({}))
    cat = list(blocks.item_ids)
    assert set(side.genre_names) == {"Sci-Fi", "Action", "Romance", "Drama"}
    g0 = set(side.genre_names[side.genres[cat.index("i0")].indices])
    assert g0 == {"Sci-Fi", "Action"}
    assert side.titles[cat.index("i4")] == "Item 4"
    pres = side.present["text"]
    assert not pres[cat.index("i3")] and not pres[cat.index("i7")] and pres[cat.index("i0")]
    j = cat.index("i5")
    np.testing.assert_allclose(side.emb["text"][j], emb[list(ids).index("i5")] /
                               np.linalg.norm(emb[list(ids).index("i5")]), rtol=1e-5)
    S = side.content_sim
    assert S.diagonal().sum() == 0
    # the nearest content neighbours of an item come from its own block
    col = S[:, cat.index("i1")].toarray().ravel()
    best = cat[int(np.argmax(col))]
    assert int(best[1:]) < 15


def test_user_side_segments_skip_id_like_and_bucket_numeric():
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(12)],
                          "age": [18, 19, 22, 25, 31, 35, 40, 45, 50, 55, 60, 65] ,
                          "gender": list("MF" * 6),
                          "zip_code": [f"{10000 + i}" for i in range(12)],
                          "uniq": [f"x{i}" for i in range(12)]})
    p = F.resolve_params({"segment_max_levels": 5, "segment_bins": 2})
    side = F.build_user_side(users, users["user_id"].to_numpy(object), p)
    assert set(side.attrs) == {"age", "gender"}  # zip_code and the id-like column skipped
    assert len(np.unique(side.attrs["age"])) == 2
    assert side.n_seg == 4
    assert side.labels[0].endswith("M") and "-" in side.labels[0]
    # no users table: one global segment
    none = F.build_user_side(None, np.array(["a", "b"], dtype=object), p)
    assert none.n_seg == 1 and list(none.labels) == ["all users", "all users"]
    # a profile segment name wins for the readable label only
    prof = pd.DataFrame({"user_id": ["u0"], "segment": ["binge watcher"]})
    named = F.build_user_side(users, users["user_id"].to_numpy(object), p, prof)
    assert named.labels[0] == "binge watcher" and named.labels[1] == side.labels[1]
    with pytest.raises(ValueError, match="no column 'height'"):
        F.build_user_side(users, users["user_id"].to_numpy(object), {**p, "segment_columns": ["height"]})


# --------------------------------------------------------------------------- context + candidates

def test_context_statistics_come_from_the_given_rows_only(blocks):
    p = F.resolve_params({})
    items = F.build_item_side(blocks.items, blocks.item_ids, block_features(blocks), p)
    users = F.build_user_side(blocks.users, blocks.user_ids, p)
    fit = blocks.interactions("fit")
    ctx = F.build_context(fit, items, users, p)
    counts = fit.df.groupby("uidx").size().reindex(range(fit.n_users), fill_value=0).to_numpy()
    np.testing.assert_array_equal(ctx.user_n, counts)
    pop = fit.df.groupby("iidx").size().reindex(range(fit.n_items), fill_value=0).to_numpy()
    np.testing.assert_array_equal(ctx.pop, pop)
    assert (ctx.cold == (pop == 0)).all()
    # genre shares: even users like the Sci-Fi block only
    g = list(items.genre_names).index("Sci-Fi")
    u0 = fit.user_index(["u0"])[0]
    assert ctx.genre_share[u0, g] == pytest.approx(1.0)
    assert ctx.genre_lift[u0, g] > 1.0
    # content vector of an even user points to the Sci-Fi block direction
    assert ctx.user_vec["text"][u0, 0] > ctx.user_vec["text"][u0, 1]
    # the user's last timestamp is the max over its fit rows
    assert ctx.user_last[u0] == fit.df.loc[fit.df.uidx == u0, "timestamp"].max()


def test_candidates_are_the_union_of_each_source_top_n_without_seen_items(blocks):
    models = fit_models(blocks, "fit")
    fb, p = builder(blocks, models, "fit", block_features(blocks),
                    candidates={"default": 3, "content": 2, "segment_pop": 1, "content_knn": 0})
    uidx = np.arange(len(blocks.user_ids))
    fr = fb.frame(uidx)
    names = [s.name for s in fb.sources]
    assert names == ["itemknn", "popularity", "content_text", "cooc_item", "cooc_user", "segment_pop",
                     "content_knn"]
    assert fr.X.shape == (len(fr.users), len(fb.names))
    seen = fb.ctx.X
    assert np.asarray(seen[fr.users, fr.items]).ravel().sum() == 0
    for u in uidx[:6]:
        got = set(fr.items[fr.users == u])
        expect = set()
        for j, s in enumerate(fb.sources):
            sc = s.score(np.array([u]))[0]
            if s.model and fb.ctx.user_n[u] <= 2:
                sc[:] = -np.inf
            if s.model:
                sc[fb.ctx.cold] = -np.inf
            sc[seen[u].indices] = -np.inf
            if s.n:
                top = np.argsort(-sc, kind="stable")[:s.n]
                expect |= {int(t) for t in top if np.isfinite(sc[t])}
            # the bit of source j is set exactly on its own proposals
            mine = set(fr.items[(fr.users == u) & (((fr.bits >> j) & 1) > 0)])
            if s.n:
                assert mine == {int(t) for t in np.argsort(-sc, kind="stable")[:s.n] if np.isfinite(sc[t])}
            else:
                assert mine == set()
        assert got == expect
    col = fb.names.index("n_sources")
    nb = np.array([bin(int(b)).count("1") for b in fr.bits])
    np.testing.assert_array_equal(fr.X[:, col], nb)
    # the rank feature is 1 for each source's top proposal
    r = fb.names.index("itemknn_rank")
    assert (fr.X[:, r] == 1).sum() == len(uidx)


def test_cold_items_are_proposed_by_content_sources(tmp_path):
    split = blocks_split(tmp_path, cold_item_fraction=0.2)
    cold = set(split.slices["cold_items"])
    assert cold
    models = fit_models(split, None)
    fb, _ = builder(split, models, None, block_features(split))
    fr = fb.frame(np.arange(len(split.user_ids)))
    cand = set(split.item_ids[fr.items])
    assert cold & cand  # CF models cannot, the content sources do
    is_cold = fr.X[:, fb.names.index("is_cold_item")] == 1
    assert set(split.item_ids[fr.items[is_cold]]) <= cold
    j = [s.name for s in fb.sources].index("content_knn")
    knn_prop = ((fr.bits >> j) & 1) > 0
    assert knn_prop.any() and is_cold[knn_prop].all()  # cold-only source
    assert np.isnan(fr.X[is_cold, fb.names.index("itemknn_rank")]).all()


# --------------------------------------------------------------------------- leakage

def manual_split() -> Split:
    """Items i10..i14 occur ONLY in val rows, i15..i19 ONLY in test rows.

    If val (test) rows leaked into training-time (test-time) features, those items
    would have a popularity > 0: the flag ``is_cold_item`` would be perfectly predictive.
    """
    rng = np.random.default_rng(0)
    rows = []
    for u in range(20):
        for i in rng.choice(10, 5, replace=False):
            rows.append((f"u{u}", f"i{i}", 1000 + u * 10 + int(i), "fit"))
        rows.append((f"u{u}", f"i{10 + u % 5}", 5000 + u, "val"))
        rows.append((f"u{u}", f"i{15 + u % 5}", 6000 + u, "test"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "fold"])
    df["rating"] = 4.0
    train = df[df.fold != "test"].reset_index(drop=True)
    test = df[df.fold == "test"].drop(columns="fold").reset_index(drop=True)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(20)], "title": [f"T{i}" for i in range(20)],
                          "genres": ["A|B"] * 10 + ["C"] * 10,
                          "director": [f"D{i % 4}" for i in range(20)]})  # shared across the folds
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(20)], "gender": list("MF" * 10)})
    return Split(train, test, users, items, {"cold_users": [], "cold_items": []})


def manual_features(split):
    ids = split.items["item_id"].astype(str).to_numpy()
    rng = np.random.default_rng(2)
    return {"text": (ids, rng.normal(size=(len(ids), 6)).astype(np.float32), np.ones(len(ids), bool))}


def test_val_labels_never_reach_training_features():
    split = manual_split()
    models = fit_models(split, "fit")
    fb, p = builder(split, models, "fit", manual_features(split),
                    candidates={"default": 20, "content": 20, "content_knn": 20})
    ts = F.build_training_set(fb, split.val(), p)
    pos = ts["y"] > 0
    assert pos.sum() == 20  # every val item is a candidate (the content sources propose cold items)
    names = fb.names
    # val-only items look cold: no popularity, no co-occurrence, no rating: nothing from val rows
    assert (ts["X"][pos, names.index("is_cold_item")] == 1).all()
    assert np.isnan(ts["X"][pos, names.index("popularity_rank")]).all()
    assert np.isnan(ts["X"][pos, names.index("item_rating")]).all()
    assert (np.nan_to_num(ts["X"][pos, names.index("knn_sum")]) == 0).all()
    # people shared with the history: over the user's 5 fit items only, never the val item itself
    fit_rows = split.train[split.train.fold == "fit"]
    director = dict(zip(split.items.item_id, split.items.director))
    iid = split.interactions().item_ids
    uid = split.interactions().user_ids
    for k in np.nonzero(pos)[0]:
        u, item = uid[ts["users"][k]], iid[ts["items"][k]]
        hist = fit_rows.item_id[fit_rows.user_id == u]
        want = np.mean([director[h] == director[item] for h in hist])
        assert ts["X"][k, names.index("tag_share")] == pytest.approx(want)
    # user activity = fit rows only (5 each, equal for everybody -> relative activity 0)
    np.testing.assert_allclose(ts["X"][:, names.index("user_activity")], np.log(5.5 / 5.0), rtol=1e-5)
    # positive control: a context that (wrongly) includes val rows makes the leak visible
    leaky, _ = builder(split, models, None, manual_features(split),
                       candidates={"default": 20, "content": 20, "content_knn": 20})
    assert not leaky.ctx.cold[split.interactions().item_index(["i10"])[0]]


def test_training_features_do_not_depend_on_val_rows(blocks):
    models = fit_models(blocks, "fit")
    fb, p = builder(blocks, models, "fit", block_features(blocks))
    val = blocks.val()
    a = F.build_training_set(fb, val, p)
    # same users, val items moved to other unseen items: only the labels may change
    rng = np.random.default_rng(3)
    val2 = val.copy()
    fit_pairs = set(zip(blocks.train.user_id, blocks.train.item_id))
    new = []
    for u in val2.user_id:
        choices = [i for i in blocks.item_ids if (u, i) not in fit_pairs]
        new.append(str(rng.choice(choices)))
    val2["item_id"] = new
    b = F.build_training_set(fb, val2, p)
    np.testing.assert_array_equal(a["users"], b["users"])
    np.testing.assert_array_equal(a["items"], b["items"])
    np.testing.assert_array_equal(a["X"], b["X"])
    assert not np.array_equal(a["y"], b["y"])


@pytest.mark.parametrize("cv_folds", [1, 3])
def test_test_rows_never_reach_test_time_features(cv_folds):
    split = manual_split()
    fit, full = fit_models(split, "fit"), fit_models(split, None)
    feats = manual_features(split)
    p = {**FAST, "candidates": {"default": 20, "content": 20, "content_knn": 20}, "k": 20,
         "cv_folds": cv_folds}
    out = F.fuse(split, fit, full, feats, None, p)
    # test-only items are cold at test time (never counted by popularity / co-occurrence)
    fb, _ = builder(split, full, None, feats, **p)
    fr = fb.frame(np.arange(20))
    test_items = set(split.interactions().item_index([f"i{15 + k}" for k in range(5)]))
    sel = np.isin(fr.items, list(test_items))
    assert sel.any() and (fr.X[sel, fb.names.index("is_cold_item")] == 1).all()
    assert "tag_share" in fb.names  # the people features are part of what must not move
    # changing the test rows changes nothing in the output
    other = Split(split.train, split.test.assign(item_id="i0"), split.users, split.items, split.slices)
    out2 = F.fuse(other, fit, full, feats, None, p)
    pd.testing.assert_frame_equal(out["recommendations"], out2["recommendations"])
    # and every recommendation is unseen in training
    seen = set(zip(split.train.user_id, split.train.item_id))
    recs = out["recommendations"]
    assert not seen & set(zip(recs.user_id, recs.item_id))


def test_fit_models_trained_on_val_rows_are_refused(blocks):
    leaky = fit_models(blocks, None)  # fitted on fit + val
    with pytest.raises(ValueError, match="leakage"):
        F.check_no_leak(leaky, blocks.val())
    F.check_no_leak(fit_models(blocks, "fit"), blocks.val())
    with pytest.raises(ValueError, match="leakage"):
        F.fuse(blocks, leaky, fit_models(blocks, None), None, None, FAST)


def test_cross_folds_partition_training_rows_without_overlap(blocks):
    train, val = blocks.train, blocks.val()
    folds = F.cross_folds(blocks, 3, seed=0)
    assert len(folds) == 2  # val_ratio 0.3: the fit rows hold two more val-sized chunks
    all_pairs = set(zip(train.user_id, train.item_id))
    test_pairs = set(zip(blocks.test.user_id, blocks.test.item_id))
    seen_labels = set(zip(val.user_id, val.item_id))
    n_val = val.groupby("user_id").size()
    for context, labels in folds:
        ctx_pairs = set(zip(context.user_id, context.item_id))
        lab_pairs = set(zip(labels.user_id, labels.item_id))
        assert lab_pairs and not ctx_pairs & lab_pairs  # a fold's labels are never its context
        assert ctx_pairs | lab_pairs == all_pairs  # every training row, nothing else
        assert not (ctx_pairs | lab_pairs) & test_pairs
        assert not lab_pairs & seen_labels  # folds are disjoint (and disjoint from val)
        seen_labels |= lab_pairs
        assert (labels.fold == "fit").all()
        # each fold hides as many rows per user as the val fold
        pd.testing.assert_series_equal(labels.groupby("user_id").size(),
                                       n_val.reindex(labels.user_id.unique()).sort_index(),
                                       check_names=False)
    assert F.cross_folds(blocks, 1, seed=0) == []
    # deterministic
    again = F.cross_folds(blocks, 3, seed=0)
    for (c1, l1), (c2, l2) in zip(folds, again):
        pd.testing.assert_frame_equal(l1, l2)


def test_cross_fitting_refits_sources_without_the_fold_labels(blocks):
    p = F.resolve_params({**FAST, "cv_folds": 3})
    fit = fit_models(blocks, "fit")
    items = F.build_item_side(blocks.items, blocks.item_ids, block_features(blocks), p)
    users = F.build_user_side(blocks.users, blocks.user_ids, p)
    world = F.training_world(blocks, p)
    ctx = F.build_context(world["context"], items, users, p)
    fb = F.FeatureBuilder(F.make_sources(fit, ctx, items, users, p), ctx, items, users, p)
    ts0 = F.build_training_set(fb, world["labels"], p)
    folds = F.cross_folds(blocks, 3, int(p["seed"]))
    ts, stats = F._add_cross_folds(ts0, folds, blocks, fit, items, users, p)
    nb = len(blocks.user_ids)
    assert [s["fold"] for s in stats] == [1, 2]
    assert len(ts["y"]) == len(ts0["y"]) + sum(s["n_rows"] for s in stats)
    assert set(np.unique(ts["users"] // nb)) == {0, 1, 2} and len(ts["n_truth"]) == 3 * nb
    # fold k's positives are exactly its label rows that are candidates
    for k, (_context, labels) in enumerate(folds, start=1):
        sel = (ts["users"] // nb == k) & (ts["y"] > 0)
        got = set(zip(blocks.user_ids[ts["users"][sel] % nb], blocks.item_ids[ts["items"][sel]]))
        assert got and got <= set(zip(labels.user_id, labels.item_id))
    # positive control: a fold whose context holds its labels is refused as leakage
    context, labels = folds[0]
    with pytest.raises(ValueError, match="cross-fitting fold 1 label.*leakage"):
        F._add_cross_folds(ts0, [(blocks.train, labels)], blocks, fit, items, users, p)
    # the ranker trains on every fold and holds out real users (all their folds) for early stopping
    ranker, diag = F.train_ranker(ts, fb.names, [s.name for s in fb.sources], p)
    assert diag["n_groups"] > len(np.unique(ts0["users"][ts0["y"] > 0]))
    assert ranker.predict(ts["X"][:5]).shape == (5,)


# --------------------------------------------------------------------------- ranker

def ranking_data(seed=0, n_groups=60, size=15):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * size, 4)).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    y = ((np.nan_to_num(X[:, 0]) + 0.5 * np.nan_to_num(X[:, 1]) + rng.normal(0, 0.3, len(X))) > 1.0)
    groups = np.repeat(np.arange(n_groups), size)
    return X, y.astype(np.float32), groups


@pytest.mark.parametrize("kind", ["lightgbm", "sklearn"])
def test_ranker_learns_saves_and_reloads(tmp_path, kind):
    X, y, g = ranking_data()
    ev = g >= 45
    p = F.resolve_params({**FAST, "ranker": kind, "n_estimators": 30})
    r = F.Ranker.train(X[~ev], y[~ev], g[~ev], X[ev], y[ev], g[ev], ["a", "b", "c", "d"], p)
    assert r.kind == kind
    s = r.predict(X[ev])
    nt = np.bincount(g[ev] - 45, weights=y[ev]).astype(int)
    learned = F.group_ndcg(g[ev], s, y[ev], nt, 5)
    rand = F.group_ndcg(g[ev], -X[ev, 3], y[ev], nt, 5)
    assert learned > rand + 0.2
    r.save(tmp_path)
    assert (tmp_path / ("model.txt" if kind == "lightgbm" else "model.json")).exists()
    meta = json.loads((tmp_path / "features.json").read_text())
    assert meta["features"] == ["a", "b", "c", "d"] and meta["kind"] == kind
    back = F.Ranker.load(tmp_path)
    np.testing.assert_allclose(back.predict(X), r.predict(X), rtol=1e-6, atol=1e-9)
    imp = r.importances()
    assert set(imp) == {"a", "b", "c", "d"}
    assert max(imp, key=lambda f: imp[f]["gain"]) == "a"
    # deterministic
    r2 = F.Ranker.train(X[~ev], y[~ev], g[~ev], X[ev], y[ev], g[ev], ["a", "b", "c", "d"], p)
    np.testing.assert_array_equal(r2.predict(X), r.predict(X))
    with pytest.raises(ValueError, match="expects 4 features"):
        r.predict(X[:, :3])


@pytest.mark.parametrize("limit,bags,refit", [(0, 2, True), (10_000, 2, True), (500, 1, False)])
def test_large_training_sets_train_one_ranker_without_refit(limit, bags, refit):
    pytest.importorskip("lightgbm")
    X, y, g = ranking_data()  # 900 rows: 675 to learn on, 225 for early stopping
    ev = g >= 45
    p = F.resolve_params({**FAST, "n_estimators": 30, "bag_max_rows": limit, "refit_max_rows": limit})
    r = F.Ranker.train(X[~ev], y[~ev], g[~ev], X[ev], y[ev], g[ev], ["a", "b", "c", "d"], p)
    best = r.info["best_iteration"]
    assert r.info["n_bags"] == bags and r.booster.num_trees() == bags * best
    assert r.info.get("refit_full", False) is refit
    assert ("bags_capped" in r.info) is (not refit) and ("refit_skipped" in r.info) is (not refit)
    if not refit:  # the early-stopped model itself: what it learnt does not include the eval users
        assert "900 training rows > bag_max_rows 500" in r.info["bags_capped"]
        solo = F.Ranker.train(X[~ev], y[~ev], g[~ev], X[ev], y[ev], g[ev], ["a", "b", "c", "d"],
                              {**p, "n_bags": 1, "refit_full": False, "bag_max_rows": 0,
                               "refit_max_rows": 0})
        np.testing.assert_array_equal(solo.predict(X), r.predict(X))


def _ranking_set(n_groups=60, size=15):
    X, y, g = ranking_data(n_groups=n_groups, size=size)
    return {"users": g, "items": np.tile(np.arange(size), n_groups), "X": X, "y": y,
            "cold": np.zeros(len(y), bool), "n_truth": np.bincount(g, weights=y).astype(np.int64),
            "n_users": n_groups}


@pytest.mark.parametrize("kind", ["lightgbm", "sklearn"])
def test_the_inner_evaluation_of_the_hybrid_is_held_out_even_after_the_refit(kind):
    if kind == "lightgbm":
        pytest.importorskip("lightgbm")
    ts, names = _ranking_set(), ["a", "b", "c", "d"]
    p = F.resolve_params({**FAST, "ranker": kind, "n_estimators": 30, "eval_fraction": 0.3})
    ranker, diag = F.train_ranker(ts, names, [], p)
    # without the refit and with one bag, the saved ranker is the early-stopped model itself
    plain, diag_plain = F.train_ranker(ts, names, [], {**p, "refit_full": False, "n_bags": 1})
    held, plain_held = diag["eval_ndcg@10"], diag_plain["eval_ndcg@10"]
    # the figure is the early-stopped model's, which never learnt on the eval users: the
    # refit (LightGBM: every user, the saved model) changes the saved ranker, not the figure
    assert held["hybrid"] == pytest.approx(plain_held["hybrid"], abs=1e-12)
    assert "hybrid_refit_in_sample" not in plain_held
    if kind == "lightgbm":
        assert ranker.info.get("refit_full") and not plain.info.get("refit_full")
        assert not np.array_equal(ranker.predict(ts["X"]), plain.predict(ts["X"]))
        assert "hybrid_refit_in_sample" in held
    else:  # the scikit-learn fallback never refits: its saved model is the held-out one
        assert "hybrid_refit_in_sample" not in held


@pytest.mark.parametrize("kind", ["lightgbm", "sklearn"])
def test_too_few_held_out_users_train_every_tree_on_every_user(kind):
    if kind == "lightgbm":
        pytest.importorskip("lightgbm")
    ts, names = _ranking_set(), ["a", "b", "c", "d"]  # 54 users with a label: 16 held out
    base = {**FAST, "ranker": kind, "n_estimators": 30, "eval_fraction": 0.3, "n_bags": 1}
    stopped, d_stop = F.train_ranker(ts, names, [], F.resolve_params(
        {**base, "early_stopping_min_users": 16}))
    full, d_full = F.train_ranker(ts, names, [], F.resolve_params(
        {**base, "early_stopping_min_users": 17}))
    assert d_stop["n_eval_groups"] == 16 and "early_stopping_skipped" not in d_stop
    assert stopped.info["early_stopping"] is True
    assert d_full["n_eval_groups"] == 0 and "eval_ndcg@10" not in d_full
    assert "16 held-out users < early_stopping_min_users=17" in d_full["early_stopping_skipped"]
    assert full.info["early_stopping"] is False and full.info["best_iteration"] == 30
    if kind == "lightgbm":
        assert full.booster.num_trees() == 30
    # the same as switching early stopping off: every user, n_estimators trees
    off, _ = F.train_ranker(ts, names, [], F.resolve_params({**base, "early_stopping_rounds": 0}))
    np.testing.assert_array_equal(full.predict(ts["X"]), off.predict(ts["X"]))


def test_early_stopping_min_users_must_not_be_negative():
    with pytest.raises(ValueError, match="fuse.early_stopping_min_users must be >= 0"):
        F.resolve_params({"early_stopping_min_users": -1})
    with pytest.raises(ValueError, match="cold_ranker_params.early_stopping_min_users"):
        F.resolve_params({"cold_ranker_params": {"early_stopping_min_users": -5}})


def test_sklearn_tree_export_matches_the_model():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    X, y, _ = ranking_data(1)
    with threadpool_limits(1, user_api="openmp"):
        m = HistGradientBoostingClassifier(max_iter=15, max_leaf_nodes=8, random_state=0).fit(X, y)
    np.testing.assert_allclose(F.predict_trees(F.export_hgb(m), X), m.decision_function(X),
                               rtol=1e-6, atol=1e-8)


def test_lightgbm_missing_falls_back_to_sklearn(monkeypatch):
    def boom():
        raise ImportError("no lightgbm")

    monkeypatch.setattr(F, "_lightgbm", boom)
    assert F.ranker_kind(F.resolve_params({"ranker": "auto"})) == "sklearn"
    with pytest.raises(ImportError):
        F.ranker_kind(F.resolve_params({"ranker": "lightgbm"}))
    with pytest.raises(ValueError, match="ranker"):
        F.resolve_params({"ranker": "xgboost"})


def test_group_ndcg_matches_the_metrics_module():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(5), 8)
    scores = rng.random(40)
    labels = (rng.random(40) < 0.3).astype(float)
    n_truth = np.bincount(groups, weights=labels).astype(int) + 1  # one relevant item not a candidate
    reco, truth = [], []
    for gi in range(5):
        sel = np.nonzero(groups == gi)[0]
        order = sel[np.argsort(-scores[sel])]
        reco.append(order[:5])
        truth.append(set(sel[labels[sel] > 0]) | {1000 + gi})
    expect = ndcg(np.array(reco), truth, 5)
    assert F.group_ndcg(groups, scores, labels, n_truth, 5) == pytest.approx(expect.mean())


# --------------------------------------------------------------------------- helpers + reasons

def test_csr_lookup_and_expand():
    S = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3], [0, 0, 0]], np.float32))
    v = F._csr_lookup(S, np.array([0, 1, 1, 2, 0]), np.array([1, 0, 2, 2, 0]))
    np.testing.assert_array_equal(v, [2, 1, 3, 0, 0])
    pair, cols, counts = F._expand(S.indptr, S.indices, np.array([1, 2, 0]))
    np.testing.assert_array_equal(pair, [0, 0, 2])
    np.testing.assert_array_equal(cols, [0, 2, 1])
    np.testing.assert_array_equal(counts, [2, 0, 1])


def test_csr_lookup_matches_dense_indexing_and_leaves_its_input_alone():
    rng = np.random.default_rng(0)
    D = rng.random((30, 40)).astype(np.float32) * (rng.random((30, 40)) < 0.2)
    S = sp.csr_matrix(D)
    # unsorted column indices and a duplicated entry (summed, as scipy's dense view does)
    S = sp.csr_matrix((np.r_[S.data, 1.5], np.r_[S.indices, 3], np.r_[S.indptr[:-1], S.nnz + 1]),
                      shape=S.shape)
    S.indices[S.indptr[5]:S.indptr[6]] = S.indices[S.indptr[5]:S.indptr[6]][::-1].copy()
    S.data[S.indptr[5]:S.indptr[6]] = S.data[S.indptr[5]:S.indptr[6]][::-1].copy()
    before = (S.indices.copy(), S.data.copy())
    rows, cols = rng.integers(0, 30, 500), rng.integers(0, 40, 500)
    at = F.CsrLookup(S)
    np.testing.assert_allclose(at(rows, cols), S.toarray()[rows, cols], rtol=1e-6)
    np.testing.assert_allclose(at(rows[:7], cols[:7]), S.toarray()[rows[:7], cols[:7]], rtol=1e-6)
    np.testing.assert_array_equal(S.indices, before[0])
    np.testing.assert_array_equal(S.data, before[1])
    empty = F.CsrLookup(sp.csr_matrix((3, 4), dtype=np.float32))
    np.testing.assert_array_equal(empty(np.array([0, 2]), np.array([1, 3])), [0, 0])


def test_split_tokens_strips_drops_empties_and_caps_per_row():
    col = pd.Series([" A | B|C ", None, "", "B||A", "D"], index=["x", "y", "z", "w", "v"])
    ex = F._split_tokens(col, "|")
    assert list(zip(ex.index, ex)) == [(0, "A"), (0, "B"), (0, "C"), (3, "B"), (3, "A"), (4, "D")]
    capped = F._split_tokens(col, "|", max_per_item=1)
    assert list(zip(capped.index, capped)) == [(0, "A"), (3, "B"), (4, "D")]
    M = F._binary_csr(np.array([0, 0, 1]), np.array([2, 2, 0]), (2, 3))
    np.testing.assert_array_equal(M.toarray(), [[0, 0, 1], [1, 0, 0]])


def test_reasons_are_readable_and_follow_the_evidence():
    ids = [f"i{i}" for i in range(6)]
    rows = [("a", "i0"), ("a", "i1"), ("b", "i0"), ("b", "i1"), ("c", "i0"), ("c", "i1"),
            ("c", "i2"), ("d", "i3"), ("d", "i4")]
    df = pd.DataFrame(rows, columns=["user_id", "item_id"])
    df["timestamp"] = np.arange(len(df))
    inter = Interactions.build(df, np.array(["a", "b", "c", "d", "new"], dtype=object),
                               np.array(ids, dtype=object))
    items = pd.DataFrame({"item_id": ids, "title": [f"Film {i}" for i in range(6)],
                          "genres": ["Sci-Fi", "Sci-Fi", "Sci-Fi", "Drama", "Drama", "Sci-Fi"]})
    emb = np.eye(6, 4, dtype=np.float32)
    emb[5] = [0.9, 0.1, 0, 0]  # cold item i5 looks like i0
    p = F.resolve_params({"reason_min_sim": 0.05})
    side = F.build_item_side(items, np.array(ids, dtype=object),
                             {"text": (np.array(ids, dtype=object), emb, np.ones(6, bool))}, p)
    users = pd.DataFrame({"user_id": ["a", "b", "c", "d", "new"], "gender": list("MFMFM")})
    us = F.build_user_side(users, inter.user_ids, p)
    ctx = F.build_context(inter, side, us, p)
    ex = F.Explainer(ctx, side, us, p)
    U = lambda x: inter.user_index([x])[0]  # noqa: E731
    I = lambda x: inter.item_index([x])[0]  # noqa: E731
    got = ex.reasons(np.array([U("a"), U("a"), U("new"), U("d")]),
                     np.array([I("i2"), I("i5"), I("i0"), I("i2")]))
    assert got[0] in ("because you liked Film 0", "because you liked Film 1")
    assert got[1] == "new item similar to Film 0"
    assert got[2] == "popular with users like you (M)"
    assert got[3].startswith("popular with users like you") or got[3].startswith("matches your")


def test_item_tags_keep_the_first_names_per_column_shared_by_two_to_max_items():
    it = pd.DataFrame({"director": ["Ann", "Ann", "Bob", None, "Cy"],
                       "cast": ["Dee|Eve|Fay", " Eve |Gus", "Dee|Hal|Eve", "Gus", ""]})
    T, names = F.item_tags(it, F.resolve_params({"tag_max_per_item": 2, "tag_max_items": 2,
                                                 "tag_columns": ["director", "cast", "writer"]}))
    got = {names[c]: sorted(T[:, c].nonzero()[0].tolist()) for c in range(T.shape[1])}
    # Eve is 2nd in rows 0, 1 but 3rd in row 2 (cut by tag_max_per_item); Dee's 2 items;
    # Gus on 2 items; Bob, Cy, Fay, Hal on one item only; no column 'writer': skipped
    assert got == {"Ann": [0, 1], "Dee": [0, 2], "Eve": [0, 1], "Gus": [1, 3]}
    assert set(np.unique(T.data)) == {1.0}
    # a name on more items than tag_max_items tells nothing apart: dropped
    T3, names3 = F.item_tags(it, F.resolve_params({"tag_max_items": 2, "tag_columns": ["cast"]}))
    assert "Eve" not in set(names3)  # on 3 items with the default 5 names per item
    assert F.item_tags(it, F.resolve_params({"tag_columns": []})) == (None, None)
    assert F.item_tags(it[["cast"]].iloc[:1], F.resolve_params({})) == (None, None)
    with pytest.raises(ValueError, match="tag_max_items"):
        F.resolve_params({"tag_max_items": 1})


def test_tag_features_count_the_people_an_item_shares_with_the_history():
    ids = [f"i{i}" for i in range(5)]
    df = pd.DataFrame({"user_id": ["a", "a", "b", "c", "c"], "item_id": ["i0", "i1", "i4", "i2", "i3"],
                       "timestamp": [1, 2, 3, 4, 5]})  # c: every item is warm, a candidate
    inter = Interactions.build(df, np.array(["a", "b", "c"], dtype=object), np.array(ids, dtype=object))
    items = pd.DataFrame({"item_id": ids, "director": ["Ann", "Bob", "Ann", "Bob", "Cy"],
                          "cast": ["Dee|Eve", "Eve", "Dee|Eve", "Fay", "Fay"]})
    p = F.resolve_params({**FAST, "candidates": {"default": 5}})
    side = F.build_item_side(items, inter.item_ids, None, p)
    us = F.build_user_side(None, inter.user_ids, p)
    ctx = F.build_context(inter, side, us, p)
    pop = Popularity().fit(inter)
    fb = F.FeatureBuilder(F.make_sources({"popularity": pop}, ctx, side, us, p), ctx, side, us, p)
    fr = fb.frame(np.array([0, 1]))
    col = {n: k for k, n in enumerate(fr.names)}
    val = {(int(u), ids[int(i)]): fr.X[k] for k, (u, i) in enumerate(zip(fr.users, fr.items))}
    # user a had i0 (Ann, Dee, Eve) and i1 (Bob, Eve): i2 shares Ann, Dee, Eve with i0 and Eve
    # with i1 -> 4 names over 2 history items, both history items share one
    assert val[(0, "i2")][col["tag_sum"]] == pytest.approx(4 / 2)
    assert val[(0, "i2")][col["tag_share"]] == pytest.approx(1.0)
    assert val[(0, "i3")][col["tag_sum"]] == pytest.approx(1 / 2)  # Bob, with i1
    assert val[(0, "i4")][col["tag_sum"]] == 0.0
    assert val[(1, "i3")][col["tag_share"]] == pytest.approx(1.0)  # Fay, with i4
    # without tag columns the features are not there at all
    p0 = F.resolve_params({**FAST, "tag_columns": []})
    side0 = F.build_item_side(items, inter.item_ids, None, p0)
    assert side0.tag_sim is None
    fb0 = F.FeatureBuilder(F.make_sources({"popularity": pop}, ctx, side0, us, p0), ctx, side0, us, p0)
    assert not {"tag_sum", "tag_share", "tag_recent"} & set(fb0.names)


def test_reasons_name_a_person_the_item_shares_with_the_history():
    ids = [f"i{i}" for i in range(4)]
    df = pd.DataFrame({"user_id": ["a", "b", "b"], "item_id": ["i0", "i1", "i2"],
                       "timestamp": [1, 2, 3]})
    inter = Interactions.build(df, np.array(["a", "b"], dtype=object), np.array(ids, dtype=object))
    items = pd.DataFrame({"item_id": ids, "title": ["Alpha", "Beta", "Gamma", "Delta"],
                          "genres": ["Drama"] * 4, "director": ["Ann", "Bob", "Cy", "Ann"],
                          "cast": ["Eve", "Fay", "Gus", "Hal"]})
    p = F.resolve_params({})
    side = F.build_item_side(items, inter.item_ids, None, p)
    us = F.build_user_side(None, inter.user_ids, p)
    ctx = F.build_context(inter, side, us, p)
    assert ctx.cold[3]  # i3: never rated
    got = F.Explainer(ctx, side, us, p).reasons(np.array([0, 1]), np.array([3, 3]))
    assert got[0] == "new item with Ann, as in Alpha"
    assert not got[1].startswith("new item with")  # b shares no one with i3


def test_planted_structure_end_to_end(blocks):
    fit, full = fit_models(blocks, "fit"), fit_models(blocks, None)
    out = F.fuse(blocks, fit, full, block_features(blocks), None, {**FAST, "k": 5})
    recs = out["recommendations"]
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "reason", "sources"]
    assert set(recs.user_id) == set(blocks.user_ids)
    assert recs.groupby("user_id")["rank"].apply(lambda r: list(r) == list(range(1, len(r) + 1))).all()
    assert (recs.groupby("user_id").size() <= 5).all()
    # recommendations respect the planted taste blocks
    same = [(int(u[1:]) % 2 == 0) == (int(i[1:]) < 15) for u, i in zip(recs.user_id, recs.item_id)]
    assert np.mean(same) > 0.9
    assert recs.reason.str.len().gt(0).all() and recs.sources.str.len().gt(0).all()
    s = out["summary"]
    assert 0 < s["training"]["candidate_recall"] <= 1
    assert s["k"] == 5 and s["ranker"] == "lightgbm"
    assert set(s["training"]["candidate_recall_by_source"]) == set(s["sources"])
    # sklearn fallback through the same stage logic
    out2 = F.fuse(blocks, fit, full, block_features(blocks), None, {**FAST, "k": 5, "ranker": "sklearn"})
    assert out2["summary"]["ranker"] == "sklearn" and len(out2["recommendations"]) == len(recs)


def test_user_side_buckets_numbers_stored_as_text(tmp_path):
    """CSV tables are read as text (ML-100K's age): a column of number strings is bucketed like
    the numbers themselves, not dropped as a many-level category."""
    from pipelines.schema import read_table

    ages = [18 + (i * 7) % 50 for i in range(40)]
    csv = tmp_path / "users.csv"
    pd.DataFrame({"user_id": [f"u{i}" for i in range(40)], "age": ages,
                  "gender": list("MF" * 20)}).to_csv(csv, index=False)
    users = read_table(csv)
    assert not pd.api.types.is_numeric_dtype(users["age"])
    p = F.resolve_params({"segment_max_levels": 5, "segment_bins": 2})
    ids = users["user_id"].to_numpy(object)
    side = F.build_user_side(users, ids, p)
    assert set(side.attrs) == {"age", "gender"}
    as_numbers = F.build_user_side(users.assign(age=ages), ids, p)
    np.testing.assert_array_equal(side.attrs["age"], as_numbers.attrs["age"])
    assert list(side.labels) == list(as_numbers.labels)
    # one unreadable cell in 40 (2.5%) is an "NA" level of its own; the rest still bucketed
    messy = users.assign(age=users["age"].where(users.index != 3, "unknown"))
    codes = F.build_user_side(messy, ids, {**p, "segment_max_levels": 5}).attrs["age"]
    assert len(np.unique(codes)) == 3 and (codes == codes[3]).sum() == 1
    # text that is mostly not numbers stays a category (here: too many levels, so skipped)
    words = users.assign(age=[f"{a} years" if i % 2 else str(a) for i, a in enumerate(ages)])
    assert set(F.build_user_side(words, ids, p).attrs) == {"gender"}


def test_fuse_without_content_or_user_attributes(blocks):
    bare = Split(blocks.train, blocks.test, blocks.users[["user_id"]], blocks.items[["item_id"]],
                 blocks.slices)
    out = F.fuse(bare, fit_models(bare, "fit"), fit_models(bare, None), None, None, FAST)
    s = out["summary"]
    assert s["modalities"] == [] and s["segment_attributes"] == []
    assert "content_knn" not in s["sources"]
    assert len(out["recommendations"]) == 5 * len(bare.user_ids)


def test_fit_and_full_sources_must_match(blocks):
    fit, full = fit_models(blocks, "fit"), fit_models(blocks, None)
    full.pop("itemknn")
    with pytest.raises(ValueError, match="differ"):
        F.fuse(blocks, fit, full, None, None, FAST)


def test_cold_item_slots_force_cold_items_into_the_top_k():
    items = np.arange(6)
    cold = np.array([False, False, False, False, True, True])
    order = F._apply_cold_slots(items, np.array([6, 5, 4, 3, 2, 1.0]), cold, 3, 1)
    assert list(order) == [0, 1, 4]
    assert list(F._apply_cold_slots(items, np.array([6, 5, 4, 3, 2, 1.0]), cold, 3, 0)) == [0, 1, 2]


# --------------------------------------------------------------------------- built-in sources

def test_cooc_sources_match_brute_force(blocks):
    fb, _ = builder(blocks, fit_models(blocks, "fit"), "fit", block_features(blocks))
    src = {s.name: s for s in fb.sources}
    ctx = fb.ctx
    u = np.arange(6)
    expect = (ctx.X[u] @ ctx.S).toarray()
    expect[:, ctx.cold] = -np.inf
    np.testing.assert_allclose(src["cooc_item"].score(u), expect, rtol=1e-5)
    # user kNN: cosine between users, top-k neighbours, weighted sum of their items
    X = ctx.X.toarray()
    norm = np.sqrt(X.sum(1))
    sims = (X @ X.T) / np.maximum(norm[:, None] * norm[None, :], 1e-12)
    np.fill_diagonal(sims, 0)
    k = 50
    for uu in u:
        top = np.argsort(-sims[uu])[:k]
        want = (sims[uu, top][:, None] * X[top]).sum(0)
        want[ctx.cold] = -np.inf
        np.testing.assert_allclose(src["cooc_user"].score(np.array([uu]))[0], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool", [0, 5, 12, 40])
def test_user_neighbours_come_from_the_pool_of_the_most_active_users(pool):
    rng = np.random.default_rng(pool)
    nu, ni, k = 40, 400, 4  # many items: no tied similarities at the k-th neighbour
    X = (rng.random((nu, ni)) < rng.uniform(0.05, 0.6, nu)[:, None]).astype(np.float32)
    X[7] = 0  # a user without history
    cold = np.zeros(ni, bool)
    cold[[3, 11]] = True
    X[:, cold] = 0
    n = X.sum(1)
    # the pool: the `pool` users with the longest histories, ties to the lower index
    members = np.sort(np.argsort(-n, kind="stable")[:pool]) if 0 < pool < nu else np.arange(nu)
    scorer = F.UserKNNScorer(sp.csr_matrix(X), k, cold, pool)
    norm = np.sqrt(n)
    sims = (X @ X.T) / np.maximum(norm[:, None] * norm[None, :], 1e-12)
    np.fill_diagonal(sims, 0)
    got = scorer(np.arange(nu))
    for u in range(nu):
        cand = sims[u, members]
        top = members[np.argsort(-cand, kind="stable")[:k]]
        top = top[sims[u, top] > 0]
        want = (sims[u, top][:, None] * X[top]).sum(0)
        want[cold] = -np.inf
        np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-6)
        if 0 < pool < nu:  # every neighbour's items come from pool members only
            outside = np.setdiff1d(np.arange(nu), members)
            solo = X[outside].sum(0) > 0
            solo &= X[members].sum(0) == 0
            assert (got[u][solo & ~cold] == 0).all()


def test_user_neighbor_pool_rejects_negative_sizes():
    with pytest.raises(ValueError, match="user_neighbor_pool"):
        F.resolve_params({"user_neighbor_pool": -1})


# --------------------------------------------------------------------------- cold-start simulation

def test_training_world_moves_rows_into_labels_without_leaking_model_knowledge(tmp_path):
    split = blocks_split(tmp_path, cold_item_fraction=0.1, cold_user_fraction=0.2, cold_user_max=2)
    p = F.resolve_params({**FAST, "cold_item_simulation": 0.2, "cold_user_simulation": 0.3})
    w = F.training_world(split, p)
    st = w["stats"]
    assert st["cold_items"] > 0 and st["cold_users"] > 0
    fit = split.train[split.train.fold == "fit"]
    ctx_pairs = set(zip(w["context"].df.user_id, w["context"].df.item_id))
    label_pairs = set(zip(w["labels"].user_id, w["labels"].item_id))
    fit_pairs = set(zip(fit.user_id, fit.item_id))
    val_pairs = set(zip(split.val().user_id, split.val().item_id))
    assert not ctx_pairs & label_pairs  # a moved row is a label, never context
    assert ctx_pairs | label_pairs == fit_pairs | val_pairs  # nothing lost, nothing added
    assert ctx_pairs <= fit_pairs and val_pairs <= label_pairs
    # deterministic
    w2 = F.training_world(split, p)
    pd.testing.assert_frame_equal(w["labels"], w2["labels"])
    # the fit models saw the moved rows: their features are never used on those pairs
    items = F.build_item_side(split.items, split.item_ids, block_features(split), p)
    users = F.build_user_side(split.users, split.user_ids, p)
    ctx = F.build_context(w["context"], items, users, p)
    fb = F.FeatureBuilder(F.make_sources(fit_models(split, "fit"), ctx, items, users, p), ctx, items,
                          users, p)
    ts = F.build_training_set(fb, w["labels"], p)
    moved = label_pairs - val_pairs
    uid, iid = split.user_ids[ts["users"]], split.item_ids[ts["items"]]
    is_moved = np.array([(a, b) in moved for a, b in zip(uid, iid)])
    assert is_moved.any() and ts["y"][is_moved].min() == 1
    model_cols = [j for j, n in enumerate(fb.names) if n.split("_")[0] in ("itemknn", "popularity")]
    assert np.isnan(ts["X"][np.ix_(is_moved, model_cols)]).all()
    # simulated cold users keep 1..cold_user_max context rows
    n_ctx = w["context"].df.groupby("user_id").size()
    sim_users = list(w["sim_users"])
    assert len(sim_users) == st["cold_users"]
    assert n_ctx.reindex(sim_users).between(1, 2).all()
    assert not set(w["context"].df.item_id) & set(w["sim_items"])  # simulated cold items
    assert ctx.cold[split.interactions().item_index(w["sim_items"])].all()


def test_refit_sources_lets_models_score_simulated_cold_users_without_leaking(tmp_path):
    split = blocks_split(tmp_path, cold_user_fraction=0.2, cold_user_max=2)
    fit, full = fit_models(split, "fit"), fit_models(split, None)
    with pytest.raises(ValueError, match="model_cold_users needs fuse.refit_sources"):
        F.fuse(split, fit, full, None, None, {**FAST, "model_cold_users": True})
    p = F.resolve_params({**FAST, "cold_user_simulation": 0.3, "refit_sources": True,
                          "model_cold_users": True})
    w = F.training_world(split, p)
    # the fit models saw the simulated cold users' hidden rows: the guard refuses them ...
    with pytest.raises(ValueError, match="leakage"):
        F.check_no_leak(fit, w["labels"], what="training label")
    # ... while clones re-fitted on the simulated context never saw any label row
    clones = {n: F.clone_model(m).fit(w["context"]) for n, m in fit.items()}
    F.check_no_leak(clones, w["labels"], what="training label")
    assert clones["itemknn"].params == fit["itemknn"].params
    items = F.build_item_side(split.items, split.item_ids, None, p)
    users = F.build_user_side(split.users, split.user_ids, p)
    ctx = F.build_context(w["context"], items, users, p)
    fb = F.FeatureBuilder(F.make_sources(clones, ctx, items, users, p), ctx, items, users, p)
    ts = F.build_training_set(fb, w["labels"], p)
    sim = np.isin(split.user_ids[ts["users"]], list(w["sim_users"]))
    assert sim.any()
    col = fb.names.index("itemknn_rank")
    assert np.isfinite(ts["X"][sim, col]).any()  # model features now reach cold users
    out = F.fuse(split, fit, full, None, None, dict(p))
    assert out["summary"]["training"]["n_groups"] > 0


def test_merged_bags_predict_the_mean():
    lgb = pytest.importorskip("lightgbm")
    X, y, g = ranking_data(2)
    boosters = []
    for seed in range(3):
        m = lgb.LGBMRanker(objective="rank_xendcg", n_estimators=8, num_leaves=4, min_child_samples=5,
                           subsample=0.7, subsample_freq=1, random_state=seed, verbose=-1, n_jobs=1)
        m.fit(X, y, group=F._group_sizes(g))
        boosters.append(m.booster_)
    merged = lgb.Booster(model_str=F.merge_lgb_models([b.model_to_string() for b in boosters]))
    assert merged.num_trees() == sum(b.num_trees() for b in boosters)
    np.testing.assert_allclose(merged.predict(X), np.mean([b.predict(X) for b in boosters], axis=0),
                               atol=1e-12)


def test_reasons_are_chunked_without_changing_them(blocks):
    p = F.resolve_params(FAST)
    items = F.build_item_side(blocks.items, blocks.item_ids, block_features(blocks), p)
    users = F.build_user_side(blocks.users, blocks.user_ids, p)
    ctx = F.build_context(blocks.interactions(), items, users, p)
    ex = F.Explainer(ctx, items, users, p)
    rng = np.random.default_rng(0)
    u = np.sort(rng.integers(0, len(blocks.user_ids), 200))
    i = rng.integers(0, len(blocks.item_ids), 200)
    assert ex.reasons(u, i, budget=7) == ex.reasons(u, i)
    assert len(ex.reasons(u[:0], i[:0])) == 0


def test_auto_cold_item_simulation_follows_the_held_out_slice_not_rare_items(tmp_path):
    # no held-out items: items that merely lack a training row (too rare) must not trigger a
    # simulation that moves every row of popular items into the labels
    split = blocks_split(tmp_path)
    rare = split.train["item_id"].astype(str) == split.train["item_id"].astype(str).iloc[0]
    split = Split(split.train[~rare.to_numpy()], split.test, split.users, split.items, split.slices)
    X = split.interactions().matrix()
    assert (np.asarray(X.sum(axis=0)).ravel() == 0).any() and not split.slices["cold_items"]
    p = F.resolve_params({**FAST, "cold_item_simulation": "auto", "cold_user_simulation": 0.0})
    assert F.training_world(split, p)["stats"]["cold_items"] == 0
    # with a held-out slice, auto simulates about the same share of items
    split = blocks_split(tmp_path / "b", cold_item_fraction=0.2)
    w = F.training_world(split, p)
    n_items = len(split.item_ids)
    assert w["stats"]["item_share"] == pytest.approx(len(split.slices["cold_items"]) / n_items)
    assert w["stats"]["cold_items"] > 0


def test_a_source_the_stage_cannot_refit_is_masked_on_cold_users_and_absent_from_extra_folds(tmp_path):
    """A fixed source (e.g. the sequence encoder, which needs side information to fit) is used as
    trained on the fit rows: never on the simulated cold users / items, whose moved rows it saw,
    and absent (NaN features) from the extra cross-fitting folds, whose labels it learned from."""
    split = blocks_split(tmp_path, cold_user_fraction=0.2, cold_user_max=2)
    fit, full = fit_models(split, "fit"), fit_models(split, None)
    for models, fold in ((fit, "fit"), (full, None)):
        m = ItemKNN(neighbors=10).fit(split.interactions(fold))
        m.set_side_info = lambda *a, **k: None  # what makes a model fixed (see F.refittable)
        models["fixedknn"] = m
    assert not F.refittable(fit["fixedknn"]) and F.refittable(fit["itemknn"])
    p = F.resolve_params({**FAST, "cold_user_simulation": 0.3, "refit_sources": True,
                          "model_cold_users": True, "cv_folds": 2})
    w = F.training_world(split, p)
    with pytest.raises(ValueError, match="leakage"):  # it saw the simulated cold users' rows ...
        F.check_no_leak({"fixedknn": fit["fixedknn"]}, w["labels"])
    items = F.build_item_side(split.items, split.item_ids, None, p)
    users = F.build_user_side(split.users, split.user_ids, p)
    ctx = F.build_context(w["context"], items, users, p)
    # ... but none of a warm user x warm item, the only pairs where it is used
    F.check_no_leak({"fixedknn": fit["fixedknn"]}, F.warm_rows(w["labels"], ctx, p))
    clones = {n: F.clone_model(m).fit(w["context"]) for n, m in fit.items() if F.refittable(m)}
    fb = F.FeatureBuilder(F.make_sources({**fit, **clones}, ctx, items, users, p), ctx, items, users, p)
    ts = F.build_training_set(fb, w["labels"], p)
    col = {n: fb.names.index(f"{n}_rank") for n in ("fixedknn", "itemknn")}
    sim = np.isin(split.user_ids[ts["users"]], list(w["sim_users"]))
    assert sim.any() and (~sim).any()
    assert np.isnan(ts["X"][sim, col["fixedknn"]]).all()  # masked on the simulated cold users
    assert np.isfinite(ts["X"][sim, col["itemknn"]]).any()  # a re-fitted model is not
    assert np.isfinite(ts["X"][~sim, col["fixedknn"]]).any()
    folds = F.cross_folds(split, 2, 0)
    both, stats = F._add_cross_folds(ts, folds, split, fit, items, users, p)
    extra = both["users"] >= ts["n_users"]
    assert extra.any() and stats[0]["n_rows"] == extra.sum()
    assert np.isnan(both["X"][extra, col["fixedknn"]]).all()  # absent where it saw the labels
    assert np.isfinite(both["X"][extra, col["itemknn"]]).any()
    # the whole stage runs (a fixed source used to stop refit_sources / cv_folds) and, at test
    # time, the full variant proposes candidates
    out = F.fuse(split, fit, full, None, None, dict(p))
    assert "fixedknn" in out["summary"]["sources"]
    assert out["summary"]["test"]["candidates_per_user"]["mean"] > 0
    assert out["recommendations"]["sources"].str.contains("fixedknn").any()


# --------------------------------------------------------------------------- cold-user ranker

def _two_pattern_set(n_groups=120, size=15, seed=3):
    """Warm groups: label follows feature 0; cold groups (every other group): feature 1."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_groups * size, 4)).astype(np.float32)
    groups = np.repeat(np.arange(n_groups), size)
    cold = (groups % 2) == 1
    signal = np.where(cold, X[:, 1], X[:, 0])
    y = (signal + rng.normal(0, 0.2, len(X)) > 1.0).astype(np.float32)
    return {"users": groups, "items": np.tile(np.arange(size), n_groups), "X": X, "y": y,
            "cold": cold, "n_truth": np.bincount(groups, weights=y).astype(np.int64),
            "n_users": n_groups}


def test_cold_ranker_learns_on_the_cold_groups_only():
    ts = _two_pattern_set()
    names = ["f0", "f1", "f2", "f3"]
    p = F.resolve_params({**FAST, "n_estimators": 40, "cold_ranker_min_users": 10})
    cold_ranker, info = F.train_cold_ranker(ts, names, [], p)
    assert info["used"] and cold_ranker is not None
    assert info["n_groups"] == len(np.unique(ts["users"][ts["cold"] & (ts["y"] > 0)]))
    main, _ = F.train_ranker(ts, names, [], p)
    # the specialist ranks by the cold users' signal (feature 1), not the warm users' (feature 0)
    probe = np.zeros((2, 4), np.float32)
    probe[0, 1] = probe[1, 0] = 2.0
    sc = cold_ranker.predict(probe)
    assert sc[0] > sc[1]
    assert main.predict(probe)[1] > main.predict(probe)[0]  # the warm majority's signal wins
    # too few cold groups, or switched off: no specialist, and the summary says why
    none, why = F.train_cold_ranker(ts, names, [], {**p, "cold_ranker_min_users": 10_000})
    assert none is None and not why["used"] and "cold_ranker_min_users" in why["reason"]
    none, why = F.train_cold_ranker(ts, names, [], {**p, "cold_ranker": False})
    assert none is None and why["reason"] == "cold_ranker is off"


def _label_count_conflict(n_few: int = 100, n_many: int = 150, many: int = 20, size: int = 40):
    """Groups with 1 label whose positive is marked by feature 0, and groups with ``many``
    labels whose positives are marked by feature 1 (each group's other rows carry the other
    pattern as a decoy, the rest are blank)."""
    rng = np.random.default_rng(0)
    X, y, g, n_truth = [], [], [], []
    for gid in range(n_few + n_many):
        few = gid < n_few
        n_pos = 1 if few else many
        pos_col, neg_col = (0, 1) if few else (1, 0)
        rows = np.zeros((size, 2), np.float32)
        rows[:n_pos, pos_col] = 1.0
        rows[n_pos:2 * n_pos, neg_col] = 1.0
        rows += rng.normal(0, 0.01, rows.shape).astype(np.float32)
        X.append(rows)
        y.append((np.arange(size) < n_pos).astype(np.float32))
        g.append(np.full(size, gid))
        n_truth.append(n_pos)
    return np.concatenate(X), np.concatenate(y), np.concatenate(g), np.array(n_truth)


@pytest.mark.parametrize("kind", ["lightgbm", "sklearn"])
def test_group_weights_shift_the_ranker_towards_users_with_few_labels(kind):
    X, y, g, n_truth = _label_count_conflict()
    probe = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # feature 0's pattern, feature 1's
    none = np.zeros((0, 2), np.float32)
    prefer, margin = {}, {}
    for power in (0.0, 1.0):
        p = F.resolve_params({**FAST, "ranker": kind, "n_estimators": 60, "early_stopping_rounds": 0,
                              "n_bags": 1, "group_weight_power": power})
        r = F.Ranker.train(X, y, g, none, np.zeros(0), np.zeros(0, np.int64), ["f0", "f1"], p,
                           F.group_weights(n_truth, power))
        sc = r.predict(probe)
        prefer[power] = "few" if sc[0] > sc[1] else "many"
        margin[power] = sc[0] - sc[1]
        assert r.info["group_weight_power"] == power
    assert margin[1.0] > margin[0.0]  # the weights move the order towards the one-label groups
    if kind == "lightgbm":
        # listwise: unweighted, the more numerous many-label groups win; weighted by
        # 1 / n_labels each of them counts 1/20 and the one-label groups' pattern ranks first
        # (the pointwise sklearn fallback counts rows, so there the shift stays partial)
        assert prefer == {0.0: "many", 1.0: "few"}


def test_group_weights_are_a_power_of_the_label_count_with_mean_one():
    n = np.array([0, 1, 4, 16])
    assert F.group_weights(n, 0.0) is None
    w = F.group_weights(n, 0.5)
    np.testing.assert_allclose(w[1:] / w[1], [1.0, 0.5, 0.25])
    assert w[1:].mean() == pytest.approx(1.0)


def test_cold_ranker_params_merge_into_their_default_and_are_checked():
    default = dict(F.DEFAULTS["cold_ranker_params"])
    try:  # a default entry survives a user's partial override
        F.DEFAULTS["cold_ranker_params"] = {"group_weight_power": 0.5}
        p = F.resolve_params({"cold_ranker_params": {"num_leaves": 7}})
        assert p["cold_ranker_params"] == {"group_weight_power": 0.5, "num_leaves": 7}
        assert F.resolve_params({"cold_ranker_params": {"group_weight_power": 0}})[
            "cold_ranker_params"]["group_weight_power"] == 0
    finally:
        F.DEFAULTS["cold_ranker_params"] = default
    assert F.resolve_params({})["group_weight_power"] == 0.0
    assert F.resolve_params({})["cold_ranker_params"] == default
    with pytest.raises(ValueError, match="cold_ranker_params.group_weight_power"):
        F.resolve_params({"cold_ranker_params": {"group_weight_power": -1}})
    with pytest.raises(ValueError, match="fuse.group_weight_power"):
        F.resolve_params({"group_weight_power": 3})


class _ColumnRanker:
    """A stand-in ranker scoring by +/- one feature column."""

    kind = "lightgbm"

    def __init__(self, features, col, sign):
        self.features, self.col, self.sign = list(features), col, sign

    def predict(self, X):
        return self.sign * np.nan_to_num(np.asarray(X, np.float64)[:, self.col], nan=-1e9)


def test_cold_users_are_ranked_by_the_cold_ranker_and_warm_users_by_the_main_one(tmp_path):
    split = blocks_split(tmp_path, cold_user_fraction=0.3, cold_user_max=2)
    fb, p = builder(split, fit_models(split, None), None)
    users = np.arange(len(split.user_ids))
    col = fb.names.index("pop_log")
    main, cold = _ColumnRanker(fb.names, col, 1.0), _ColumnRanker(fb.names, col, -1.0)
    both, stats = F.recommend_all(main, fb, users, p, cold_ranker=cold)
    only_main, _ = F.recommend_all(main, fb, users, p)
    only_cold, _ = F.recommend_all(cold, fb, users, p)
    is_cold = set(split.user_ids[fb.ctx.user_n <= p["cold_user_max"]].astype(str))
    assert is_cold and stats["users_ranked_by_cold_ranker"] == len(is_cold)

    def part(df, cold_side):
        sel = df.user_id.isin(is_cold) == cold_side
        return df[sel].reset_index(drop=True)[["user_id", "item_id", "rank"]]

    pd.testing.assert_frame_equal(part(both, False), part(only_main, False))
    pd.testing.assert_frame_equal(part(both, True), part(only_cold, True))
    assert not part(only_main, True).equals(part(only_cold, True))  # the two orders differ


def test_fuse_trains_a_cold_ranker_when_cold_users_are_simulated(tmp_path):
    split = blocks_split(tmp_path, cold_user_fraction=0.3, cold_user_max=2)
    fit, full = fit_models(split, "fit"), fit_models(split, None)
    p = {**FAST, "cold_user_simulation": 0.3, "refit_sources": True, "model_cold_users": True,
         "cold_ranker_min_users": 3}
    out = F.fuse(split, fit, full, None, None, p)
    info = out["summary"]["cold_ranker"]
    assert info["used"] and out["cold_ranker"] is not None and info["n_groups"] >= 3
    assert out["summary"]["test"]["users_ranked_by_cold_ranker"] == len(split.slices["cold_users"])
    off = F.fuse(split, fit, full, None, None, {**p, "cold_ranker": False})
    assert off["cold_ranker"] is None and not off["summary"]["cold_ranker"]["used"]
    assert off["summary"]["test"]["users_ranked_by_cold_ranker"] == 0


@pytest.mark.parametrize("seed", range(8))
def test_stratified_cold_item_draw_takes_one_item_per_popularity_range(seed):
    items = np.array([f"i{k:03d}" for k in range(100)], dtype=object)
    pop = np.random.default_rng(99).permutation(100) + 1  # distinct popularity 1..100
    got = F._draw_cold_items(items, pop, 10, "stratified", np.random.default_rng(seed))
    assert len(got) == len(set(got)) == 10 and list(got) == sorted(got)
    ranks = np.argsort(np.argsort(-pop))  # 0 = most popular
    blocks = np.sort(ranks[[int(g[1:]) for g in got]] // 10)
    np.testing.assert_array_equal(blocks, np.arange(10))  # one from each tenth of the ranking
    again = F._draw_cold_items(items, pop, 10, "stratified", np.random.default_rng(seed))
    np.testing.assert_array_equal(got, again)


def test_uniform_cold_item_draw_is_the_plain_random_draw():
    items = np.array([f"i{k:03d}" for k in range(100)], dtype=object)
    pop = np.arange(100) + 1
    ranks = 99 - np.arange(100)
    uneven = 0
    for seed in range(8):
        got = F._draw_cold_items(items, pop, 10, "uniform", np.random.default_rng(seed))
        expect = np.sort(np.random.default_rng(seed).choice(items, 10, replace=False))
        np.testing.assert_array_equal(got, expect)
        uneven += len(set(ranks[[int(g[1:]) for g in got]] // 10)) < 10
    assert uneven  # a random draw leaves some popularity ranges out: what stratifying removes
    assert len(F._draw_cold_items(items, pop, 0, "stratified", np.random.default_rng(0))) == 0


def test_cold_item_draw_must_be_known():
    with pytest.raises(ValueError, match="cold_item_draw"):
        F.resolve_params({"cold_item_draw": "popular"})
