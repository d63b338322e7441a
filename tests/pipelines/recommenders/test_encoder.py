"""The transformer user encoder: shapes, masking, learning, determinism, persistence, cold start."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from pipelines.data import Interactions  # noqa: E402
from pipelines.recommenders import Recommender  # noqa: E402
from tests.recommender_mixin import ArtifactContract  # noqa: E402
from pipelines.recommenders.encoder import (  # noqa: E402
    EncoderRecommender, attribute_codes, attribute_spec, build_module, cross_codes, refit_epochs)

N_USERS, N_ITEMS, HALF = 48, 24, 12
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "max_len": 16, "batch_size": 16, "epochs": 12,
        "patience": 0, "dropout": 0.1, "lr": 5e-3, "threads": 1, "samples_per_user": 1,
        "cold_member": False}  # the cold-user member has its own tests


def blocks(seed: int = 0, per_user: int = 8, cold_items=(), n_users: int = N_USERS):
    """Even users (gender F) like items [0, 12), odd users (M) the rest; last 2 rows/user are val."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        block = [i for i in (range(HALF) if u % 2 == 0 else range(HALF, N_ITEMS)) if i not in cold_items]
        for j, i in enumerate(rng.choice(block, per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", 1_600_000_000 + u * 1000 + j * 3600, float(rng.integers(3, 6)),
                         "val" if j >= per_user - 2 else "fit"))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "fold"])
    user_ids = [f"u{u}" for u in range(n_users)] + ["newF", "newM"]
    users = pd.DataFrame({"user_id": user_ids,
                          "gender": ["F" if u % 2 == 0 else "M" for u in range(n_users)] + ["F", "M"]})
    data = Interactions.build(df, user_ids, [f"i{i}" for i in range(N_ITEMS)])
    feat = np.zeros((N_ITEMS, 6), np.float32)
    feat[:HALF, 0] = 1.0
    feat[HALF:, 1] = 1.0
    feat += np.random.default_rng(1).normal(0, 0.05, feat.shape).astype(np.float32)
    return data, users, feat


def fit(data, users, feat, present=None, **kw):
    present = np.ones(N_ITEMS, bool) if present is None else present
    m = EncoderRecommender(**{**TINY, **kw}).set_side_info({"text": (feat, present)}, users)
    return m.fit(data)


def block_share(model, user_ids, block):
    recs = model.recommend(user_ids, k=4)
    return np.mean([[int(str(i)[1:]) in block for i in row if i is not None] for row in recs])


def test_item_table_masks_missing_modalities_and_unknown_ids():
    arch = {"d_model": 8, "n_layers": 1, "n_heads": 2, "ff_mult": 2, "max_len": 10, "dropout": 0.0,
            "n_items": 5, "modalities": ["text", "image"], "modality_dims": [4, 3], "use_time": True,
            "use_rating": True, "attr_sizes": [2, 3], "attr_hash_buckets": 16, "pool": "cls"}
    m = build_module(arch).eval()
    with torch.no_grad():
        m.known[1:] = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
        m.feat_text[1:] = torch.randn(5, 4)
        m.present_text[1:] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
        m.feat_image[1:] = torch.randn(5, 3)
        m.present_image[1:] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])  # modality missing everywhere
        m.proj_bias["text"].weight.fill_(0.3)
        V, b = m.item_table()
        assert V.shape == (5, 8) and b.shape == (5,)
        # item 3: unknown id, no modality present -> exactly zero
        assert torch.count_nonzero(V[3]) == 0 and b[3] == 0
        # changing a missing item's features changes nothing
        m.feat_text[2] = 100.0  # item index 1 (text missing)
        m.feat_image[:] = 100.0
        V2, b2 = m.item_table()
        assert torch.equal(V, V2) and torch.equal(b, b2)
        # item 2: cold (unknown id) but text present -> content vector
        assert torch.count_nonzero(V[2]) > 0
        B, L = 3, 4
        tokens = torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0], [5, 4, 3, 1]])
        V_tok = torch.cat([torch.zeros_like(V[:1]), V])[tokens]
        h, pad = m.encode(tokens, torch.zeros(B, L, dtype=torch.long), torch.ones(B, L, dtype=torch.long),
                          torch.tensor([[1, 2], [0, 0], [2, 3]]), torch.tensor([[3], [0], [7]]), V_tok)
        assert h.shape == (B, L + 1, 8) and pad.shape == (B, L + 1)
        assert not pad[:, 0].any() and pad[1, 1:].all()
        u = m.pool(h, pad, "cls")
        assert u.shape == (B, 8) and torch.isfinite(u).all()  # a user with no history still encodes


def test_attribute_spec_categorical_numeric_and_dropped():
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(100)],
                          "gender": ["M", "F"] * 50,
                          "age": np.arange(100) + 10,
                          "zip": [f"Z{i:03d}" for i in range(100)]})
    spec = attribute_spec(users, {"use_attributes": True, "attr_max_categories": 50,
                                  "attr_numeric_buckets": 4})
    kinds = {c["name"]: c["kind"] for c in spec}
    assert kinds == {"gender": "cat", "age": "num"}  # zip: high-cardinality text, dropped
    codes = attribute_codes(users, ["u0", "u99", "stranger"], spec)
    assert codes.shape == (3, 2)
    assert (codes[:2] > 0).all() and (codes[2] == 0).all()  # unknown user -> code 0
    assert codes[1, 1] > codes[0, 1]  # older -> higher age bucket


def test_training_lowers_loss_and_recommends_the_right_block():
    data, users, feat = blocks()
    m = fit(data, users, feat)
    hist = m.train_info_["history"]
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1
    assert block_share(m, [f"u{u}" for u in range(0, N_USERS, 2)], range(HALF)) > 0.9
    assert block_share(m, [f"u{u}" for u in range(1, N_USERS, 2)], range(HALF, N_ITEMS)) > 0.9
    # early stopping metric is recorded and the vectors are shaped [u, 1] . [v, b] per member
    # (refit + ensemble: the refit model's, then the phase-1 model's)
    assert "recall@20" in hist[0]
    d = TINY["d_model"] + 1
    assert len(m.member_weights_) == 1
    assert m.user_vecs_.shape == (N_USERS + 2, 2 * d)
    assert np.all(m.user_vecs_[:, d - 1] == 1.0) and np.all(m.user_vecs_[:, -1] == 1.0)
    assert m.item_vecs_.shape == (N_ITEMS, 2 * d)


def test_cold_users_get_their_segment_from_attributes():
    data, users, feat = blocks()
    m = fit(data, users, feat, epochs=15, cold_train_prob=0.5)
    assert block_share(m, ["newF"], range(HALF)) >= 0.75
    assert block_share(m, ["newM"], range(HALF, N_ITEMS)) >= 0.75
    # an id outside the catalogue gets the (finite) prior
    s = m.score_users(np.array([-1]))
    assert np.isfinite(s).all()


def test_cold_items_scored_from_content():
    cold = (3, 15)  # one per block, never in training
    data, users, feat = blocks(cold_items=cold)
    m = fit(data, users, feat, epochs=15, id_dropout=0.5)
    scores = m.score_users(np.arange(N_USERS))
    assert np.isfinite(scores[:, list(cold)]).all()
    even, odd = scores[0::2], scores[1::2]
    # the block-A cold item scores higher for block-A users than for block-B users, and vice versa
    assert even[:, 3].mean() > odd[:, 3].mean()
    assert odd[:, 15].mean() > even[:, 15].mean()


def test_variants_untied_wide_items_and_no_ema():
    data, users, feat = blocks()
    m = fit(data, users, feat, epochs=8, tie=False, d_item=24, head_mlp=True, ema=0.0, bag=False)
    assert m.item_vecs_.shape == (N_ITEMS, 2 * 25) and m.user_vecs_.shape[1] == 2 * 25
    assert block_share(m, [f"u{u}" for u in range(0, N_USERS, 2)], range(HALF)) > 0.8


def test_deterministic_on_cpu():
    data, users, feat = blocks()
    a = fit(data, users, feat, epochs=3)
    b = fit(data, users, feat, epochs=3)
    assert a.weights_.keys() == b.weights_.keys()
    for k in a.weights_:
        assert np.array_equal(a.weights_[k], b.weights_[k]), k
    assert np.array_equal(a.user_vecs_, b.user_vecs_)
    c = fit(data, users, feat, epochs=3, seed=7)
    assert not np.array_equal(a.item_vecs_, c.item_vecs_)


def test_save_load_round_trip_without_pickle(tmp_path):
    data, users, feat = blocks()
    present = np.ones(N_ITEMS, bool)
    present[::5] = False
    m = fit(data, users, feat, present=present, epochs=3)
    m.save(tmp_path / "enc")
    files = sorted(p.name for p in (tmp_path / "enc").iterdir())
    assert files == ["arrays.safetensors", "config.json", "seen.npz"]
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["model"] == "encoder" and cfg["params"]["_arch"]["modalities"] == ["text"]
    loaded = Recommender.load(tmp_path / "enc")
    assert isinstance(loaded, EncoderRecommender)
    uidx = np.arange(N_USERS + 2)
    assert np.array_equal(loaded.score_users(uidx), m.score_users(uidx))
    ids = [f"u{u}" for u in range(6)]
    assert np.array_equal(loaded.recommend(ids, k=5), m.recommend(ids, k=5))
    # the torch module rebuilt from the saved arrays encodes new histories consistently
    vec = loaded.encode_users([["i0", "i1", "i2", "i3"], ["i12", "i13", "i14", "i15"]], users,
                              user_ids=["newF", "newM"])
    d = TINY["d_model"] + 1
    assert vec.shape == (2, 2 * d) and np.all(vec[:, -1] == 1) and np.all(vec[:, d - 1] == 1)
    assert len(loaded.member_weights_) == 1
    s = vec @ loaded.item_vecs_.T
    assert s[0, :HALF].mean() > s[0, HALF:].mean() and s[1, HALF:].mean() > s[1, :HALF].mean()


def test_ensemble_sums_the_refit_and_phase_one_models():
    data, users, feat = blocks()
    ens = fit(data, users, feat, epochs=3)
    single = fit(data, users, feat, epochs=3, ensemble=False)
    phase1 = fit(data, users, feat, epochs=3, refit=False)
    d = TINY["d_model"] + 1
    assert single.member_weights_ == [] and single.user_vecs_.shape[1] == d
    # [refit member | phase-1 member]: the score is the sum of both models' scores
    np.testing.assert_allclose(ens.user_vecs_, np.hstack([single.user_vecs_, phase1.user_vecs_]))
    np.testing.assert_allclose(ens.item_vecs_, np.hstack([single.item_vecs_, phase1.item_vecs_]))
    uidx = np.arange(N_USERS)
    np.testing.assert_allclose(ens.score_users(uidx),
                               single.score_users(uidx) + phase1.score_users(uidx), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(ens.behaviour_vectors(), single.user_vecs_[:, :-1])
    first = ens.first_member()  # what the fuse pairs with the fit variant
    np.testing.assert_allclose(first.score_users(uidx), single.score_users(uidx), rtol=1e-5)
    assert first.member_weights_ == [] and len(ens.member_weights_) == 1  # ens left whole
    assert single.first_member() is single
    assert ens.train_info_["refit"]["ensemble"] is True


def _with_short_users(n_short=8, keep=2):
    """blocks() with users u0..u{n_short-1} cut to their first ``keep`` rows (fit fold)."""
    data, users, feat = blocks()
    df = data.df
    short = df.user_id.isin([f"u{u}" for u in range(n_short)])
    cut = df[short].groupby("user_id").head(keep)
    df = pd.concat([df[~short], cut]).sort_index()
    return Interactions.build(df, data.user_ids, data.item_ids), users, feat


def test_cold_member_scores_short_histories_and_the_main_members_the_others(tmp_path):
    data, users, feat = _with_short_users()
    m = fit(data, users, feat, epochs=6, cold_member=True)
    info = m.train_info_["cold_member"]
    d = TINY["d_model"] + 1
    assert info["members"] == 2 and info["users"] == 8 + 2  # u0..u7 + the two without history
    assert m.user_vecs_.shape[1] == 4 * d and len(m.member_weights_) == 3
    cut = 2 * d
    uidx = m.user_index(["u0", "u9", "newF"])
    sc = m.score_users(uidx)
    U, V = m.user_vecs_[uidx], m.item_vecs_
    np.testing.assert_allclose(sc[0], U[0, cut:] @ V[:, cut:].T, rtol=1e-5, atol=1e-5)  # short
    np.testing.assert_allclose(sc[1], U[1, :cut] @ V[:, :cut].T, rtol=1e-5, atol=1e-5)  # warm
    np.testing.assert_allclose(sc[2], U[2, cut:] @ V[:, cut:].T, rtol=1e-5, atol=1e-5)
    unknown = m.score_users(np.array([-1]))[0]  # an unknown user gets the cold prior
    np.testing.assert_allclose(unknown, m.prior_vec_[cut:] @ V[:, cut:].T, rtol=1e-5, atol=1e-5)
    # short users still get their block (u0, u2, ... like the first half)
    assert block_share(m, [f"u{u}" for u in range(0, 8, 2)], range(HALF)) > 0.7
    # the saved model routes the same way; new short histories are encoded by the cold member
    m.save(tmp_path / "enc")
    loaded = Recommender.load(tmp_path / "enc")
    np.testing.assert_array_equal(loaded.score_users(uidx), sc)
    vec = loaded.encode_users([["i0", "i1"], [f"i{i}" for i in range(8)]], users,
                              user_ids=["newF", "newF"])
    assert np.all(vec[0, :cut] == 0) and np.any(vec[0, cut:] != 0)
    assert np.all(vec[1, cut:] == 0) and np.any(vec[1, :cut] != 0)
    # what the fuse and the profiles use: the first (refit) main member only, every user
    first = m.first_member()
    assert first.user_vecs_.shape[1] == d and np.any(first.user_vecs_[uidx[0]] != 0)
    np.testing.assert_array_equal(m.behaviour_vectors(), m.user_vecs_[:, :d - 1])


def test_cold_member_warm_starts_from_the_previous_models_cold_member():
    data, users, feat = _with_short_users()
    prev = fit(data, users, feat, epochs=4, cold_member=True)
    view = prev.cold_view()
    d = TINY["d_model"] + 1
    assert view.params["_arch"] == prev.params["_cold_arch"] and "_cold_members" not in view.params
    np.testing.assert_array_equal(view.item_vecs_, prev.item_vecs_[:, 2 * d:])
    assert view.weights_ is prev.member_weights_[1]  # the cold member's refit model
    warm = EncoderRecommender(**{**TINY, "cold_member": True, "warm_start": True, "warm_epochs": 1})
    warm.set_side_info({"text": (feat, np.ones(N_ITEMS, bool))}, users).set_warm_start(prev)
    warm.fit(data)
    assert warm.train_info_["warm_start"]["used"]
    assert warm.params["_cold_members"] == 2 and warm.train_info_["cold_member"]["members"] == 2
    assert warm.train_info_["cold_member"]["warm_start"]["used"]
    plain = fit(data, users, feat, epochs=1)
    assert plain.cold_view() is None  # no cold member, no view
    # an incremental run after a run without a cold member stays without one
    warm = EncoderRecommender(**{**TINY, "cold_member": True, "warm_start": True, "warm_epochs": 1})
    warm.set_side_info({"text": (feat, np.ones(N_ITEMS, bool))}, users).set_warm_start(plain)
    warm.fit(data)
    assert warm.train_info_["warm_start"]["used"] and "_cold_members" not in warm.params
    assert "previous model has no cold member" in warm.train_info_["cold_member"]["skipped"]


def test_cold_member_is_skipped_without_short_users_or_time():
    data, users, feat = _with_short_users()
    m = fit(data, users, feat, epochs=2, cold_member=True, cold_member_max_seconds=0)
    assert "no time left" in m.train_info_["cold_member"]["skipped"]
    assert "_cold_members" not in m.params and m.user_vecs_.shape[1] == 2 * (TINY["d_model"] + 1)
    full, _, _ = blocks()  # every user has 8 rows, none is without history
    full = Interactions.build(full.df, [f"u{u}" for u in range(N_USERS)], full.item_ids)
    m = fit(full, users, feat, epochs=2, cold_member=True)
    assert "no user has at most" in m.train_info_["cold_member"]["skipped"]


def test_without_side_info_or_val_fold():
    data, _, _ = blocks()
    plain = Interactions.build(data.df.drop(columns=["fold"]), data.user_ids, data.item_ids)
    m = EncoderRecommender(**{**TINY, "epochs": 2}).fit(plain)
    assert m.params["_arch"]["modalities"] == [] and m.params["_arch"]["attr_sizes"] == []
    assert len(m.train_info_["history"]) == 2  # no val fold: fixed epochs, no early stopping
    s = m.score_users(np.arange(4))
    assert s.shape == (4, N_ITEMS) and np.isfinite(s).all()


def test_next_item_objective_runs():
    data, users, feat = blocks()
    m = fit(data, users, feat, objective="next", epochs=6)
    assert m.params["_arch"]["pool"] == "last" and not m.params["_arch"]["bag"]
    assert m.train_info_["history"][-1]["loss"] < m.train_info_["history"][0]["loss"]
    assert block_share(m, [f"u{u}" for u in range(0, N_USERS, 2)], range(HALF)) > 0.7


class TestEncoderArtifacts(ArtifactContract):
    """The encoder's saved model under the shared persistence / tampering contract."""

    def make_model(self):
        return EncoderRecommender(**{**TINY, "epochs": 2})


@pytest.mark.parametrize("damage", ["json-garbage", "json-list", "safetensors-truncated",
                                    "safetensors-pickle", "wrong-shapes"])
def test_tampered_checkpoint_fails_with_an_error_naming_the_file(tmp_path, damage):
    """A checkpoint under <workdir>/checkpoints/last is resumed from: tampering is a clear error."""
    import pickle

    from tests.recommender_mixin import _Payload

    data, _users, _feat = blocks()
    work = tmp_path / "run"
    EncoderRecommender(**{**TINY, "epochs": 2}).set_run(work).fit(data)
    last = work / "checkpoints" / "last"
    j, s = last / "state.json", last / "state.safetensors"
    marker = tmp_path / "pwned"
    if damage == "json-garbage":
        j.write_bytes(b"\x00{ not json")
        victim = j
    elif damage == "json-list":
        j.write_text("[1, 2]")
        victim = j
    elif damage == "safetensors-truncated":
        s.write_bytes(s.read_bytes()[:100])
        victim = s
    elif damage == "safetensors-pickle":
        s.write_bytes(pickle.dumps(_Payload(marker)))
        victim = s
    else:  # a well-formed file whose tensors do not fit the module
        from safetensors.numpy import load_file, save_file

        arrays = load_file(str(s))
        save_file({k: np.ascontiguousarray(v.reshape(-1)[:1]) for k, v in arrays.items()}, str(s))
        victim = s
    with pytest.raises(ValueError) as info:
        EncoderRecommender(**{**TINY, "epochs": 2}).set_run(work).fit(data)  # same run: resumes
    assert str(victim) in str(info.value) and "delete" in str(info.value)
    assert not marker.exists()


def test_refit_epochs_takes_the_last_epoch_that_validates_like_the_best():
    hist = [{"epoch": e, "loss": 1.0, "recall@20": r}
            for e, r in enumerate([0.20, 0.28, 0.2866, 0.283, 0.2856, 0.25], start=1)]
    assert refit_epochs(hist, "recall@20", 0.01, 3) == 5       # 0.2856 >= 0.99 * 0.2866
    assert refit_epochs(hist, "recall@20", 0.0, 3) == 3        # no tolerance: the best epoch
    assert refit_epochs(hist, "recall@20", 0.5, 3) == 6
    assert refit_epochs([], "recall@20", 0.01, 4) == 4         # no curve (no val fold)
    assert refit_epochs([{"epoch": 1, "loss": 2.0}], "recall@20", 0.01, 0) == 1


def test_refit_learns_from_the_val_rows_too():
    data, users, feat = blocks()
    df = data.df.copy()
    only_val = "i11"  # an item seen in val rows only: the fit-fold model cannot know its id
    df.loc[df["item_id"] == only_val, "fold"] = "val"
    data = Interactions.build(df.drop(columns=["uidx", "iidx"]), data.user_ids, data.item_ids)
    j = list(data.item_ids).index(only_val)
    plain = fit(data, users, feat, epochs=4, refit=False)
    both = fit(data, users, feat, epochs=4, refit=True, refit_tolerance=0.0)
    assert "refit" not in plain.train_info_ and plain.weights_["known"][1 + j] == 0
    info = both.train_info_["refit"]
    hist = both.train_info_["history"]
    assert info["epochs"] == refit_epochs(hist, "recall@20", 0.0, 0) >= both.train_info_["best_epoch"]
    assert both.weights_["known"][1 + j] == 1  # the exported model is the one fitted on every row
    # phase 1 is the same run as without refit: same curve
    assert [r["loss"] for r in both.train_info_["history"]] == \
        [r["loss"] for r in plain.train_info_["history"]]
    assert block_share(both, [f"u{u}" for u in range(0, N_USERS, 2)], range(HALF)) > 0.8


def test_warm_start_continues_the_moving_average():
    data, users, feat = blocks()
    prev = fit(data, users, feat, epochs=3, refit=False)
    warm = EncoderRecommender(**{**TINY, "epochs": 3, "warm_epochs": 1, "lr": 5e-2, "refit": False})
    warm.set_side_info({"text": (feat, np.ones(N_ITEMS, bool))}, users).set_warm_start(prev)
    warm.fit(data)
    assert warm.train_info_["warm_start"]["used"]
    a, b = prev.weights_["item_emb.weight"], warm.weights_["item_emb.weight"]
    # a few high-LR steps move the raw weights a lot; the exported average stays near the
    # previous model (a restarted average would export nearly the raw weights)
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 0.1


def test_rare_attribute_crosses_are_not_embedded():
    data, users, feat = blocks()
    users = users.assign(region=["north" if i % 4 < 2 else "south" for i in range(len(users))],
                         zip=[f"z{i}" for i in range(len(users))])  # unique per user: an id
    m = fit(data, users, feat, epochs=2, refit=False, attr_cross_min_users=10)
    arch = m.params["_arch"]
    assert [c["name"] for c in arch["attr_spec"]] == ["gender", "region", "zip"]
    cross = cross_codes(attribute_codes(users, data.user_ids, arch["attr_spec"]),
                        arch["attr_hash_buckets"])
    counts = np.bincount(cross[:N_USERS].ravel(), minlength=arch["attr_hash_buckets"])
    keep = m.weights_["cross_keep"]
    assert np.array_equal(keep, (counts >= 10).astype(np.float32))
    # gender x region (4 values of 12 users) is embedded, the crosses with zip are not
    assert keep[cross[:N_USERS, 0]].all() and not keep[cross[:N_USERS, 1:]].any()
    # the mask travels with the saved model: new users are encoded the same way
    assert np.array_equal(m.torch_module().cross_keep.numpy(), keep)


def test_refit_shares_the_time_box_with_the_first_phase():
    data, users, feat = blocks()
    m = fit(data, users, feat, epochs=3, refit=True, max_train_seconds=1e-6)
    assert "skipped" in m.train_info_["refit"]  # the first phase spent it: its model is exported
    assert m.weights_["known"].sum() == len(np.unique(data.df[data.df["fold"] == "fit"]["iidx"]))


def test_changed_users_compares_item_sets_not_only_counts():
    from pipelines.recommenders.encoder import changed_users
    from pipelines.recommenders.popularity import Popularity

    df = pd.DataFrame({"user_id": ["a", "a", "b", "b", "c"], "item_id": ["x", "y", "x", "z", "y"],
                       "timestamp": range(5), "rating": 4.0})
    prev = Popularity().fit(Interactions.build(df))
    same = Interactions.build(df.iloc[::-1])  # row order and id order do not matter
    assert not changed_users(prev, same).any()
    # b: same count, one item replaced; d: new user; a and c untouched
    new = pd.concat([df.replace({"item_id": {"z": "w"}}).where(df.user_id == "b", df),
                     pd.DataFrame({"user_id": ["d"], "item_id": ["x"], "timestamp": [9], "rating": 3.0})])
    data = Interactions.build(new)
    got = dict(zip(data.user_ids, changed_users(prev, data)))
    assert got == {"a": False, "b": True, "c": False, "d": True}


def test_fit_variant_scores_from_the_fit_rows_alone(tmp_path):
    data, users, feat = blocks()
    m = fit(data, users, feat, epochs=3, refit=True, refit_tolerance=0.0)
    fv = m.fit_model_
    assert fv is not None and fv.fit_model_ is None
    fit_rows = data.df[data.df["fold"] == "fit"]
    # seen items = the fit rows only: the val items stay recommendable (the fuse's labels)
    want = Interactions(fit_rows.drop(columns="fold"), data.user_ids, data.item_ids).matrix()
    assert (fv._seen != want).nnz == 0 and m._seen.nnz > fv._seen.nnz
    # phase-1 weights (the exported model was refitted on every row: other weights)
    assert not np.allclose(fv.weights_["item_emb.weight"], m.weights_["item_emb.weight"])
    # its user vectors encode each user's fit history (not the whole training history)
    from pipelines.recommenders.encoder import _Histories

    arch = fv.params["_arch"]
    codes = attribute_codes(users, data.user_ids, arch["attr_spec"])
    cross = cross_codes(codes, arch["attr_hash_buckets"])

    def vectors(rows):
        hist = _Histories.from_df(rows, data.n_users, tuple(arch["rating_range"]))
        return fv._user_vectors(fv.torch_module(), hist, codes, cross, torch.device("cpu"), None)

    np.testing.assert_allclose(fv.user_vecs_, vectors(fit_rows), rtol=1e-4, atol=1e-5)
    assert not np.allclose(fv.user_vecs_, vectors(data.df), rtol=1e-3, atol=1e-4)
    fv.save(tmp_path / "fit")
    back = Recommender.load(tmp_path / "fit")
    np.testing.assert_array_equal(back.score_users(np.arange(4)), fv.score_users(np.arange(4)))
    # no val fold: no fit variant
    plain = fit(Interactions(data.df.drop(columns="fold"), data.user_ids, data.item_ids), users, feat,
                epochs=1)
    assert plain.fit_model_ is None


# ------------------------------------------------------------------ prefetched training batches

def _numbered_make(log):
    """A batch maker with state like the real one: a random generator used in call order."""
    import torch

    rng = np.random.default_rng(5)

    def make(chunk):
        log.append(int(chunk[0]))
        if chunk[0] % 4 == 3:  # no user with a history: no batch
            return None
        return {"tokens": torch.as_tensor(rng.integers(0, 100, (2, 3))), "chunk": int(chunk[0]),
                "n_rows": 2.0}
    return make


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_batches_are_the_inline_batches_in_order(depth):
    import torch

    from pipelines.recommenders.encoder import training_batches

    chunks = [np.array([c]) for c in range(11)]
    inline = list(training_batches(chunks, _numbered_make([]), 0, torch.device("cpu")))
    ahead = list(training_batches(chunks, _numbered_make([]), depth, torch.device("cpu")))
    assert [b["chunk"] for b in inline] == [c for c in range(11) if c % 4 != 3]
    assert [b["chunk"] for b in ahead] == [b["chunk"] for b in inline]
    for a, b in zip(inline, ahead):
        assert torch.equal(a["tokens"], b["tokens"]) and a["n_rows"] == b["n_rows"]


def _batch_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "encoder-batches"]


def test_prefetch_error_reaches_the_training_loop_and_the_thread_ends():
    import torch

    from pipelines.recommenders.encoder import training_batches

    def make(chunk):
        if chunk[0] == 2:
            raise OSError("disk gone at chunk 2")
        return {"chunk": int(chunk[0])}

    seen = []
    with pytest.raises(OSError, match="disk gone at chunk 2"):
        for b in training_batches([np.array([c]) for c in range(6)], make, 2, torch.device("cpu")):
            seen.append(b["chunk"])
    assert seen == [0, 1]
    assert not _batch_threads()


def test_a_training_loop_that_stops_early_stops_the_thread():
    import torch

    from pipelines.recommenders.encoder import training_batches

    log: list[int] = []
    gen = training_batches([np.array([c]) for c in range(1000)], _numbered_make(log), 2, torch.device("cpu"))
    for b in gen:
        if b["chunk"] == 4:
            break
    gen.close()  # what leaving the loop does when the generator is collected (a failing step)
    assert not _batch_threads()
    # made at most `depth` batches (+ the one in hand) ahead, not all 1000; chunks without a
    # batch (7) take no queue slot, so the last one made can be 8
    ahead = [c for c in range(5, 1000) if c % 4 != 3][:2 + 1]
    assert max(log) <= ahead[-1] == 8


def test_prefetch_depth_setting():
    import torch

    from pipelines.recommenders.encoder import prefetch_depth

    assert prefetch_depth("auto", torch.device("cpu")) == 0
    assert prefetch_depth("auto", torch.device("cuda")) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3
    for bad in (-1, "2", True, 1.5):
        with pytest.raises(ValueError, match="prefetch_batches"):
            prefetch_depth(bad, torch.device("cpu"))


def test_training_with_prefetched_batches_gives_the_same_model():
    data, users, feat = blocks()
    a = fit(data, users, feat, epochs=3, prefetch_batches=0)
    b = fit(data, users, feat, epochs=3, prefetch_batches=2)
    for k in a.weights_:
        assert np.array_equal(a.weights_[k], b.weights_[k]), k
    assert np.array_equal(a.user_vecs_, b.user_vecs_)
    # losses and val metrics too (not the seconds)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in a.train_info_["history"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in b.train_info_["history"]]


@pytest.mark.gpu
def test_prefetched_batches_arrive_on_cuda_unchanged():
    import torch

    from pipelines.recommenders.encoder import training_batches

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    chunks = [np.array([c]) for c in range(7)]
    cpu = list(training_batches(chunks, _numbered_make([]), 0, torch.device("cpu")))
    for depth in (0, 2):
        got = list(training_batches(chunks, _numbered_make([]), depth, torch.device("cuda")))
        assert [b["chunk"] for b in got] == [b["chunk"] for b in cpu]
        for a, b in zip(cpu, got):
            assert b["tokens"].is_cuda and torch.equal(a["tokens"], b["tokens"].cpu())
