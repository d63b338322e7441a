"""The contract every :class:`~pipelines.recommenders.base.Recommender` must honour.

Use it by subclassing in a test module::

    class TestMyModel(RecommenderContract):
        def make_model(self):
            return MyModel(param=...)

Class attributes switch off checks that do not apply to a model:

* ``planted = False``: the model does not personalise (popularity), skip the
  planted two-group structure test;
* ``cold_user_popularity = False``: users with no history are not ranked by
  popularity;
* ``cold_items_unscorable = False``: the model can score items with no
  training interaction (content-based models);
* ``validates_state = False``: ``_set_state`` does not check array shapes.

:class:`ArtifactContract` is the persistence half alone (round trip without
pickle; ``TAMPER_CASES``: every saved file truncated, bit-flipped, edited,
removed or replaced by a pickle payload must fail with a ``ValueError`` naming
the file, and the payload must never run), for models whose behaviour is
tested elsewhere (the encoder).

Also home of :func:`ml100k_split`, the per-user random 75/25 split used by
the slow integration tests on the shared ml100k-mm dataset.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import struct

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file

from pipelines.data import Interactions
from pipelines.recommenders.base import REGISTRY, Recommender

N_PER_GROUP = 15
BLOCK = 10  # items per taste block
PER_USER = 6  # interactions per user, all inside the user's block
COLD_ITEMS = ("cold_a", "cold_b")  # in the catalogue, never interacted with
COLD_USER = "u_cold"  # in the catalogue, no history


def planted_data(seed: int = 0) -> Interactions:
    """Two user groups liking two disjoint item blocks (+ cold items and a cold user).

    Group "a" users ``ua00..`` interact with ``PER_USER`` of the items
    ``a0..a9``, group "b" users with items ``b0..b9``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for g in ("a", "b"):
        for u in range(N_PER_GROUP):
            for t, i in enumerate(rng.choice(BLOCK, size=PER_USER, replace=False)):
                rows.append((f"u{g}{u:02d}", f"{g}{i}", 1_600_000_000 + 60 * t, 1.0))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    users = sorted(df["user_id"].unique()) + [COLD_USER]
    items = sorted(df["item_id"].unique()) + list(COLD_ITEMS)
    return Interactions.build(df, users, items)


def group_of(user_id: str) -> str:
    return str(user_id)[1]


# ---- tampering ------------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker``: proof of code execution if it ever exists."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _edit_config(fn):
    def tamper(saved, _marker):
        f = saved / "config.json"
        cfg = json.loads(f.read_text(encoding="utf-8"))
        out = fn(cfg)
        f.write_text(out if isinstance(out, str) else json.dumps(out), encoding="utf-8")
        return "config.json"
    return tamper


def _write(name: str, make):
    def tamper(saved, marker):
        f = saved / name
        f.write_bytes(make(f.read_bytes(), marker))
        return name
    return tamper


def _flip(raw: bytes, at: float, n: int = 8) -> bytes:
    out = bytearray(raw)
    i = int(len(out) * at)
    for k in range(i, min(i + n, len(out))):
        out[k] ^= 0xA5
    return bytes(out)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _drop(name: str):
    def tamper(saved, _marker):
        (saved / name).unlink()
        return name
    return tamper


def _huge_header(raw: bytes, _marker) -> bytes:
    return struct.pack("<Q", 2**60) + raw[8:]  # header length claims an exabyte


def _wrong_seen_shape(raw: bytes, _marker) -> bytes:
    import scipy.sparse as sp

    m = sp.load_npz(io.BytesIO(raw)).tocsr()
    buf = io.BytesIO()
    sp.save_npz(buf, sp.csr_matrix((m.shape[0] + 3, m.shape[1])))
    return buf.getvalue()


def _bad_seen_indices(raw: bytes, _marker) -> bytes:
    import scipy.sparse as sp

    m = sp.load_npz(io.BytesIO(raw)).tocsr()
    indices = m.indices.copy()
    indices[0] = m.shape[1] + 1000  # column outside the catalogue
    return _npz(format=np.array("csr"), shape=np.array(m.shape), data=m.data, indices=indices,
                indptr=m.indptr)


# case -> tamper(saved_dir, marker) -> name of the tampered file
TAMPER_CASES = {
    "config-not-json": _write("config.json", lambda raw, m: b"\x00\x01 not json {"),
    "config-truncated": _write("config.json", lambda raw, m: raw[: len(raw) // 2]),
    "config-utf16": _write("config.json", lambda raw, m: raw.decode().encode("utf-16")),
    "config-not-an-object": _edit_config(lambda c: [c]),
    "config-unknown-model": _edit_config(lambda c: {**c, "model": "os.system"}),
    "config-params-not-a-dict": _edit_config(lambda c: {**c, "params": ["__import__('os')"]}),
    "config-user-ids-not-a-list": _edit_config(lambda c: {**c, "user_ids": 42}),
    "config-item-ids-missing": _edit_config(lambda c: {k: v for k, v in c.items() if k != "item_ids"}),
    "config-one-user-fewer": _edit_config(lambda c: {**c, "user_ids": c["user_ids"][:-1]}),
    "config-one-item-more": _edit_config(lambda c: {**c, "item_ids": c["item_ids"] + ["intruder"]}),
    "config-missing": _drop("config.json"),
    "npz-flipped-bytes": _write("seen.npz", lambda raw, m: _flip(raw, 0.5)),
    "npz-truncated": _write("seen.npz", lambda raw, m: raw[: len(raw) * 2 // 3]),
    "npz-pickle-payload": _write("seen.npz", lambda raw, m: pickle.dumps(_Payload(m))),
    "npz-object-array": _write("seen.npz", lambda raw, m: _npz(
        format=np.array([_Payload(m)], dtype=object), shape=np.array([1, 1]))),
    "npz-wrong-shape": _write("seen.npz", _wrong_seen_shape),
    "npz-column-out-of-range": _write("seen.npz", _bad_seen_indices),
    "npz-missing": _drop("seen.npz"),
    "safetensors-pickle-payload": _write("arrays.safetensors", lambda raw, m: pickle.dumps(_Payload(m))),
    "safetensors-header-flipped": _write("arrays.safetensors", lambda raw, m: raw[:8]
                                         + _flip(raw[8:], 0.0, 40)),
    "safetensors-huge-header-length": _write("arrays.safetensors", _huge_header),
    "safetensors-missing": _drop("arrays.safetensors"),
}


class ArtifactContract:
    """Persistence half of the contract: save/load round trip without pickle, and tampered
    artifacts rejected with a ``ValueError`` naming the file, never code execution.

    Subclasses implement :meth:`make_model`; :class:`RecommenderContract` includes it.
    """

    validates_state = True

    def make_model(self) -> Recommender:  # pragma: no cover - hook
        raise NotImplementedError

    # ---- fixtures -----------------------------------------------------
    @pytest.fixture(scope="class")
    def data(self) -> Interactions:
        return planted_data()

    @pytest.fixture(scope="class")
    def model(self, data) -> Recommender:
        return self.make_model().fit(data)

    @pytest.fixture
    def saved(self, model, tmp_path):
        path = tmp_path / "model"
        model.save(path)
        return path

    # ---- persistence --------------------------------------------------
    def test_save_load_roundtrip(self, model, data, saved):
        files = [p for p in saved.rglob("*") if p.is_file()]
        assert files and all(p.suffix in {".json", ".safetensors", ".npz"} for p in files), files
        for p in files:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    for key in z.files:
                        assert z[key].dtype != object
            elif p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
        users = list(data.user_ids) + ["unknown"]
        r0, s0 = model.recommend(users, k=7, return_scores=True)
        for loader in (type(model), Recommender):
            loaded = loader.load(saved)
            assert type(loaded) is type(model) and loaded.params == model.params
            r1, s1 = loaded.recommend(users, k=7, return_scores=True)
            assert np.array_equal(r0, r1)
            np.testing.assert_array_equal(s0, s1)

    @pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
    def test_corrupt_arrays_file_fails_load(self, saved, damage):
        f = saved / "arrays.safetensors"
        raw = f.read_bytes()
        f.write_bytes({"garbage": b"\x07not a safetensors file" * 8,
                       "truncated": raw[: len(raw) // 2],
                       "empty": b""}[damage])
        with pytest.raises(ValueError, match=str(saved)):
            type(self.make_model()).load(saved)

    @pytest.mark.parametrize("damage", ["garbage", "truncated"])
    def test_corrupt_seen_file_fails_load(self, saved, damage):
        f = saved / "seen.npz"
        raw = f.read_bytes()
        f.write_bytes(b"\x07not a zip file" * 8 if damage == "garbage" else raw[: len(raw) // 2])
        with pytest.raises(ValueError, match=str(saved)):
            Recommender.load(saved)

    def test_missing_array_fails_load(self, saved):
        f = saved / "arrays.safetensors"
        arrays = load_file(str(f))
        dropped = sorted(arrays)[0]
        save_file({k: v for k, v in arrays.items() if k != dropped}, str(f))
        with pytest.raises(ValueError, match=str(saved)):
            Recommender.load(saved)

    def test_inconsistent_arrays_fail_load(self, saved):
        if not self.validates_state:
            pytest.skip("model does not validate its state arrays")
        f = saved / "arrays.safetensors"
        arrays = load_file(str(f))
        # every array cut to half its first dimension: a well-formed file with wrong content
        save_file({k: np.ascontiguousarray(v[: len(v) // 2]) for k, v in arrays.items()}, str(f))
        with pytest.raises(ValueError, match=str(saved)):
            Recommender.load(saved)

    # ---- tampered artifacts ---------------------------------------------
    @pytest.mark.parametrize("case", sorted(TAMPER_CASES))
    def test_tampered_artifact_fails_with_an_error_naming_the_file(self, saved, tmp_path, case):
        """Every tampered file: ValueError naming it; a pickle payload is never executed."""
        marker = tmp_path / "pwned"
        victim = TAMPER_CASES[case](saved, marker)
        loaders = (type(self.make_model()), Recommender)
        for loader in loaders:
            with pytest.raises(ValueError) as info:
                loader.load(saved)
            msg = str(info.value)
            assert str(saved / victim) in msg, f"{case}: error does not name {victim}: {msg}"
        assert not marker.exists(), f"{case}: a pickle payload was executed"


class RecommenderContract(ArtifactContract):
    """Mixin of contract tests; subclasses implement :meth:`make_model`."""

    planted = True
    cold_user_popularity = True
    cold_items_unscorable = True

    @staticmethod
    def active_users(data: Interactions) -> list[str]:
        return [u for u in data.user_ids if u != COLD_USER]

    @staticmethod
    def seen_sets(data: Interactions) -> dict[str, set[str]]:
        return {u: set(g) for u, g in data.df.groupby("user_id")["item_id"]}

    # ---- behaviour ----------------------------------------------------
    def test_registered_and_params_json(self, model):
        assert REGISTRY[model.name] is type(model)
        params = json.loads(json.dumps(model.params))
        assert type(model)(**params).params == model.params

    def test_planted_structure(self, model, data):
        if not self.planted:
            pytest.skip("model does not personalise")
        users = self.active_users(data)
        recs = model.recommend(users, k=3)
        in_block = [[r is not None and r[0] == group_of(u) for r in row] for u, row in zip(users, recs)]
        share = np.mean(in_block)
        assert share >= 0.9, f"only {share:.0%} of top-3 recommendations come from the user's block"
        # most users get a perfect top-3
        assert np.mean([all(row) for row in in_block]) >= 0.8

    def test_recommend_excludes_seen(self, model, data):
        seen = self.seen_sets(data)
        users = self.active_users(data)
        recs = model.recommend(users, k=data.n_items)
        for u, row in zip(users, recs):
            got = {r for r in row if r is not None}
            assert not got & seen[u], f"user {u} got already-seen items {got & seen[u]}"
            # everything scorable and unseen is ranked
            assert len(got) >= 1

    def test_output_shape_and_padding(self, model, data):
        users = self.active_users(data)[:4] + [COLD_USER]
        k = data.n_items + 5
        recs, scores = model.recommend(users, k=k, return_scores=True)
        assert recs.shape == (len(users), k) and scores.shape == (len(users), k)
        assert scores.dtype == np.float32
        seen = self.seen_sets(data)
        for u, row, sc in zip(users, recs, scores):
            present = np.array([r is not None for r in row])
            n = int(present.sum())
            assert present[:n].all() and not present[n:].any(), "None padding must be at the end"
            assert n <= data.n_items - len(seen.get(u, ()))
            assert len(set(row[:n])) == n, "duplicate items in a recommendation list"
            assert set(row[:n]) <= set(data.item_ids)
            assert np.isfinite(sc[:n]).all() and np.isneginf(sc[n:]).all()
            assert (np.diff(sc[:n]) <= 0).all(), "scores must be sorted descending"

    def test_score_users_shape_dtype(self, model, data):
        sc = model.score_users(np.array([0, 1, -1], dtype=np.int64))
        assert sc.shape == (3, data.n_items)
        assert sc.dtype == np.float32
        assert not np.isnan(sc).any()

    def test_cold_items_not_recommended(self, model, data):
        if not self.cold_items_unscorable:
            pytest.skip("model scores cold items")
        recs = model.recommend(list(data.user_ids) + ["unknown"], k=data.n_items)
        got = {r for row in recs for r in row if r is not None}
        assert not got & set(COLD_ITEMS)

    def test_unknown_and_cold_users(self, model, data):
        recs = model.recommend(["never-seen-user", COLD_USER, 12345], k=5)
        assert recs.shape == (3, 5)
        assert any(r is not None for r in recs[0])
        if not self.cold_user_popularity:
            return
        counts = data.df["item_id"].value_counts()
        for row in recs:
            got = [r for r in row if r is not None]
            assert len(got) == 5
            pops = counts.reindex(got).to_numpy()
            assert (np.diff(pops) <= 0).all(), "cold-user list is not in popularity order"
            rest = counts.drop(got)
            assert pops.min() >= rest.max(), "cold-user list skips a more popular item"

    def test_determinism(self, data):
        a = self.make_model().fit(data)
        b = self.make_model().fit(data)
        users = list(data.user_ids)
        ra, sa = a.recommend(users, k=8, return_scores=True)
        rb, sb = b.recommend(users, k=8, return_scores=True)
        assert np.array_equal(ra, rb)
        np.testing.assert_array_equal(sa, sb)


# ---- integration split ---------------------------------------------------

@functools.lru_cache(maxsize=2)
def ml100k_split(path, test_share: float = 0.25, seed: int = 42):
    """Per-user random split of ml100k-mm: ``(train Interactions, truth)``.

    Every user's interactions (sorted by item id, so the split does not
    depend on file order) are shuffled with one ``default_rng(seed)`` and
    ``round(test_share * n)`` of them go to the test side (stratified per
    user).  The catalogue is every item of ``items.csv`` (items only in the
    test side are cold).  ``truth[u]`` is the set of test item indices of
    user index ``u``.  Cached: callers must not modify the result.
    """
    from pipelines.schema import load_raw, normalise

    ds = normalise(load_raw(path))
    r = ds.ratings.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    u = r["user_id"].to_numpy()
    bounds = np.r_[0, np.nonzero(u[1:] != u[:-1])[0] + 1, len(r)]
    test = np.zeros(len(r), dtype=bool)
    for a, b in zip(bounds[:-1], bounds[1:]):
        n_test = int(round(test_share * (b - a)))
        test[a + rng.permutation(b - a)[:n_test]] = True
    users = np.asarray(sorted(r["user_id"].unique()), dtype=object)
    items = np.asarray(sorted(ds.items["item_id"].unique()), dtype=object)
    train = Interactions.build(r[~test], users, items)
    held = Interactions.build(r[test], users, items)
    truth: list[set] = [set() for _ in range(len(users))]
    for ui, ii in zip(held.df["uidx"].to_numpy(), held.df["iidx"].to_numpy()):
        truth[ui].add(int(ii))
    return train, truth


def evaluate_model(model: Recommender, train: Interactions, truth: list, k: int = 10) -> dict:
    from pipelines.metrics import evaluate

    model.fit(train)
    reco, _ = model.recommend_idx(np.arange(train.n_users), k, exclude_seen=True)
    return evaluate(reco, truth, [k], n_items=train.n_items)
