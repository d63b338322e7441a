"""``bench/bench_cooc_user.py`` (the README's cooc_user timing) runs at a tiny size."""

from __future__ import annotations

import importlib.util

from tests.fixtures import ROOT


def test_cooc_user_benchmark_times_each_pool(capsys):
    spec = importlib.util.spec_from_file_location("bench_cooc_user", ROOT / "bench" / "bench_cooc_user.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--users", "300", "--items", "80", "--sample", "50", "--batch", "20",
                    "--pools", "0", "100"])
    assert out["users"] == 300 and out["sample"] == 50
    assert out["rows"] > 300  # every user has at least one row
    assert set(out["seconds_all_users"]) == {"0", "100"}
    assert all(v >= 0 for v in out["seconds_all_users"].values())
    assert '"seconds_all_users"' in capsys.readouterr().out
