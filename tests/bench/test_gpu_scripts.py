"""The GPU benchmark scripts (``bench/gpu_text.py``, ``bench/gpu_encoder.py``) run on CPU at tiny sizes.

They are run for real on a lent GPU a few minutes at a time (``bench/gpu_all.sh``), so a script
that broke since then would waste that time: here they run as subprocesses, as the shell script
runs them, and their JSON is checked for what the README reports from it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import ROOT

pytestmark = pytest.mark.slow


def _run(script: str, args: list[str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_text_benchmark_encodes_like_sentence_transformers(tmp_path):
    res = _run("gpu_text.py", ["--items", "40", "--batch", "16", "--device", "cpu"], tmp_path / "t.json")
    assert res["device"] == "cpu"
    assert res["n_texts"] == 40 and res["n_tokens"] > 40 * 10
    # the same model through both paths: the same normalised embeddings
    assert res["cosine_ours_vs_st_min"] > 0.999
    assert res["ours_tokens_per_s"] > 0 and res["st_tokens_per_s"] > 0
    assert res["speedup"] == pytest.approx(res["st_s"] / res["ours_s"], rel=0.02)


def test_encoder_benchmark_trains_and_counts_flops(tmp_path):
    res = _run("gpu_encoder.py", ["--tiny"], tmp_path / "e.json")
    assert res["device"] == "cpu" and res["softmax"] == "full"
    assert math.isfinite(res["final_loss"]) and res["final_loss"] > 0
    assert res["train_sequences_per_s"] > 0 and res["infer_sequences_per_s"] > 0
    # the analytic count (mean input length, matmuls only) is the documented lower bound of what
    # the counter sees running the same batches (padding, item-table projections, head)
    assert 0 < res["train_flops_analytic"] <= res["train_flops_counted"]
    assert res["train_flops_counted"] < 5 * res["train_flops_analytic"]
    ratio = res["train_tflops_counted"] / res["train_tflops"]
    assert ratio == pytest.approx(res["train_flops_counted"] / res["train_flops_analytic"], rel=0.01)

    assert res["prefetch"] == 0  # auto on CPU
    # batches made ahead in a thread, as train_encoder makes them: the same batches, the same run
    res2 = _run("gpu_encoder.py", ["--tiny", "--no-count", "--prefetch", "2"], tmp_path / "e2.json")
    assert res2["prefetch"] == 2
    assert res2["train_tflops_counted"] is None and res2["train_flops_counted"] is None
    assert res2["final_loss"] == res["final_loss"]
