"""In-memory interaction data shared by every model: ids <-> indices + CSR."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .schema import ITEM, RATING, TS, USER


@dataclass
class Interactions:
    """Users x items interactions over a fixed catalogue.

    ``user_ids``/``item_ids`` map row/column index -> external id (str).  The
    catalogue includes users and items with no interaction in ``df`` (cold
    users and cold items), so every model scores the same item space.
    """

    df: pd.DataFrame  # user_id, item_id, timestamp, rating (+ uidx, iidx)
    user_ids: np.ndarray
    item_ids: np.ndarray

    @classmethod
    def build(cls, df: pd.DataFrame, user_ids=None, item_ids=None) -> "Interactions":
        user_ids = np.asarray(sorted(df[USER].astype(str).unique()) if user_ids is None else user_ids,
                              dtype=object)
        item_ids = np.asarray(sorted(df[ITEM].astype(str).unique()) if item_ids is None else item_ids,
                              dtype=object)
        uidx = pd.Index(user_ids).get_indexer(df[USER].astype(str))
        iidx = pd.Index(item_ids).get_indexer(df[ITEM].astype(str))
        if (uidx < 0).any() or (iidx < 0).any():
            raise ValueError("interactions reference users/items outside the catalogue")
        out = df.copy()
        out["uidx"] = uidx.astype(np.int64)
        out["iidx"] = iidx.astype(np.int64)
        return cls(out.reset_index(drop=True), user_ids, item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def matrix(self, values: str | None = None) -> sp.csr_matrix:
        """CSR users x items; binary (1.0) unless ``values`` names a column.

        Duplicate (user, item) pairs are collapsed (max value)."""
        d = self.df
        data = np.ones(len(d), np.float32) if values is None else d[values].to_numpy(np.float32)
        m = sp.coo_matrix((data, (d["uidx"].to_numpy(), d["iidx"].to_numpy())),
                          shape=(self.n_users, self.n_items)).tocsr()
        m.sum_duplicates()
        if values is None:
            m.data[:] = 1.0
        return m.astype(np.float32)

    def user_index(self, ids) -> np.ndarray:
        return pd.Index(self.user_ids).get_indexer(np.asarray(ids, dtype=object).astype(str))

    def item_index(self, ids) -> np.ndarray:
        return pd.Index(self.item_ids).get_indexer(np.asarray(ids, dtype=object).astype(str))

    def sequences(self) -> list[np.ndarray]:
        """Per user (by index) the item indices in time order."""
        d = self.df.sort_values(["uidx", TS, "iidx"], kind="stable")
        bounds = np.searchsorted(d["uidx"].to_numpy(), np.arange(self.n_users + 1))
        items = d["iidx"].to_numpy()
        return [items[bounds[u]:bounds[u + 1]] for u in range(self.n_users)]


def item_popularity(X: sp.csr_matrix) -> np.ndarray:
    return np.asarray(X.sum(axis=0)).ravel().astype(np.float32)


__all__ = ["Interactions", "item_popularity", "USER", "ITEM", "TS", "RATING"]


@dataclass
class Split:
    """The split stage's output, loaded: tables + catalogue + slices."""

    train: pd.DataFrame
    test: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    slices: dict

    @classmethod
    def load(cls, path) -> "Split":
        import json
        from pathlib import Path

        path = Path(path)
        train = pd.read_parquet(path / "train.parquet")
        test = pd.read_parquet(path / "test.parquet")
        users = pd.read_parquet(path / "users.parquet")
        items = pd.read_parquet(path / "items.parquet")
        slices = json.loads((path / "slices.json").read_text(encoding="utf-8"))
        return cls(train, test, users, items, slices)

    @property
    def user_ids(self) -> np.ndarray:
        ids = pd.Index(self.users[USER].astype(str))
        extra = pd.Index(pd.concat([self.train[USER], self.test[USER]]).astype(str).unique())
        return np.asarray(ids.append(extra.difference(ids)).unique(), dtype=object)

    @property
    def item_ids(self) -> np.ndarray:
        return np.asarray(self.items[ITEM].astype(str).unique(), dtype=object)

    def interactions(self, fold: str | None = None) -> Interactions:
        """Training interactions over the full catalogue; ``fold='fit'`` drops the val fold."""
        df = self.train if fold is None else self.train[self.train["fold"] == fold]
        return Interactions.build(df, self.user_ids, self.item_ids)

    def val(self) -> pd.DataFrame:
        return self.train[self.train["fold"] == "val"]


def item_titles(split_dir, item_ids) -> dict[str, str]:
    """``{item_id: title}`` for the given ids, read from the split's ``items.parquet`` (only the
    two columns); empty when there is no such file, no ``title`` column or no id asked for."""
    from pathlib import Path

    import pyarrow.parquet as pq

    path = Path(split_dir) / "items.parquet"
    wanted = {str(i) for i in item_ids}
    if not wanted or not path.is_file() or "title" not in pq.read_schema(path).names:
        return {}
    it = pq.read_table(path, columns=[ITEM, "title"]).to_pandas()
    it = it[it[ITEM].astype(str).isin(wanted)]
    return dict(zip(it[ITEM].astype(str), it["title"].astype(str)))
