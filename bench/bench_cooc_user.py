"""Time the fuse stage's ``cooc_user`` source (user kNN on the context rows), exact vs pooled.

    python bench/bench_cooc_user.py --users 100000 --items 6708      # the 5M scale's shape
    python bench/bench_cooc_user.py --users 300 --items 100 --sample 60 --pools 0 100   # smoke

Synthetic binary interactions (log-normal history lengths around ``--per-user``, Zipf item
popularity) are scored for ``--sample`` random users in batches of ``--batch`` (the fuse's
batch at 6,708 items and ``memory_mb`` 512), once per ``--pools`` value (0 = exact
neighbours); the time per user is extrapolated to every user.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.fusion import UserKNNScorer  # noqa: E402


def synth(n_users: int, n_items: int, per_user: float, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(per_user) - 0.5, 1.0, n_users).astype(np.int64))
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    rows = np.repeat(np.arange(n_users), lengths)
    cols = rng.choice(n_items, int(lengths.sum()), p=pop / pop.sum())
    X = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    X.sum_duplicates()
    X.data[:] = 1.0
    return X


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=6708)
    ap.add_argument("--per-user", type=float, default=50.0)
    ap.add_argument("--neighbors", type=int, default=50)
    ap.add_argument("--pools", type=int, nargs="+", default=[0, 20_000])
    ap.add_argument("--sample", type=int, default=1860)
    ap.add_argument("--batch", type=int, default=465)
    a = ap.parse_args(argv)
    X = synth(a.users, a.items, a.per_user)
    users = np.random.default_rng(1).choice(a.users, min(a.sample, a.users), replace=False)
    out = {"users": a.users, "items": a.items, "rows": int(X.nnz), "sample": int(len(users)),
           "seconds_all_users": {}}
    cold = np.zeros(a.items, bool)
    for pool in a.pools:
        scorer = UserKNNScorer(X, a.neighbors, cold, pool)
        t = time.perf_counter()
        for b in range(0, len(users), a.batch):
            scorer(users[b:b + a.batch])
        per_user = (time.perf_counter() - t) / len(users)
        out["seconds_all_users"][str(pool)] = round(per_user * a.users, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
