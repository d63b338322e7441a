"""Throughput of the transformer user encoder: training and inference sequences/s, TFLOP/s.

    python bench/gpu_encoder.py                      # CUDA when present, sizes for one GPU
    python bench/gpu_encoder.py --tiny               # seconds on CPU (smoke test)
    python bench/gpu_encoder.py --users 200000 --items 100000 --seq 200 --d-model 256 \\
        --layers 4 --heads 4 --batch 512 --compile --out bench.json

Synthetic histories (random items, random lengths up to ``--seq``) are fed
through the real training step of ``pipelines.recommenders.encoder``
(``_make_batch`` + the module's loss + AdamW) under bf16 autocast on CUDA.
Reported: training sequences/s, inference (user encoding) sequences/s, and
achieved TFLOP/s two ways: ``train_tflops`` from an analytic count of the
matmul FLOPs at the batches' mean input length (QKV/out projections,
attention scores and values, feed-forward, softmax logits over the catalogue
or sampled candidates; backward = 2x forward), a lower bound on what the
GPU executed, and ``train_tflops_counted`` from the FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` sees when the same batches are
run again, untimed, forward and backward (padding, the item table's content
projections and the head included; on CPU it does not see the fused
attention kernel).  Data preparation (numpy batching on
the host) is included in the training timing, as in a real run; ``--prebatch``
builds the batches first to time the device work alone; otherwise they are
made as ``train_encoder`` makes them, ``--prefetch`` ahead in a thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.recommenders.encoder import (DEFAULTS, _Histories, _make_batch,  # noqa: E402
                                            build_module, prefetch_depth, training_batches)


def synth(n_users: int, n_items: int, seq: int, seed: int = 0) -> _Histories:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, seq // 4), seq + 1, n_users)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    # Zipf-ish popularity so that softmax targets look like real data
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, int(offsets[-1]), p=pop / pop.sum()).astype(np.int64)
    ts = np.cumsum(rng.integers(60, 86400, int(offsets[-1]))).astype(np.int64)
    rb = rng.integers(1, 11, int(offsets[-1])).astype(np.int64)
    return _Histories(items, ts, rb, offsets)


def flops_per_seq(L: int, d: int, layers: int, ff: int, n_out: float) -> float:
    """Forward matmul FLOPs of one sequence of L tokens (+ the ATTR token) and its logits."""
    T = L + 1
    per_layer = 2 * T * d * (3 * d) + 2 * T * d * d + 2 * 2 * T * T * d + 2 * 2 * T * d * (ff * d)
    return layers * per_layer + 2 * d * n_out


def count_train_flops(model, batches, device, amp) -> float:
    """FLOPs of forward + backward over ``batches`` as FlopCounterMode counts them (untimed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.features import autocast

    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches:
            with autocast(device, amp):
                loss = model(batch)
            loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return float(counter.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--seq", type=int, default=200, help="max_len (tokens per user incl. ATTR)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--full-softmax-max", type=int, default=20_000)
    ap.add_argument("--negatives", type=int, default=8192)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--prebatch", action="store_true", help="make every batch before timing (device work alone)")
    ap.add_argument("--prefetch", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="batches made ahead in a thread, as train_encoder.prefetch_batches (auto: 2 on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    ap.add_argument("--no-count", dest="count", action="store_false",
                    help="skip the FlopCounterMode pass (train_tflops_counted)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tiny:
        args.users, args.items, args.seq, args.d_model, args.layers, args.heads = 256, 500, 32, 32, 1, 2
        args.batch, args.steps, args.warmup, args.negatives = 32, 4, 1, 256

    import torch

    from pipelines.features import autocast, autocast_dtype, select_device

    device = select_device(args.device)
    amp = autocast_dtype(device, "auto")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    hist = synth(args.users, args.items, args.seq - 1)
    arch = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "ff_mult": 2,
            "max_len": args.seq, "dropout": 0.1, "n_items": args.items, "modalities": ["text"],
            "modality_dims": [384], "use_time": True, "use_rating": True, "attr_sizes": [8, 3],
            "attr_hash_buckets": 1024, "pool": "mean", "causal": False, "bag": True}
    torch.manual_seed(0)
    model = build_module(arch)
    with torch.no_grad():
        model.known.fill_(1.0)
        model.feat_text.normal_()
        model.present_text.fill_(1.0)
    model.to(device)
    step_model = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = {**DEFAULTS, "max_len": args.seq, "full_softmax_max": args.full_softmax_max,
         "n_negatives": args.negatives, "_pool": "mean", "objective": "holdout"}
    rng = np.random.default_rng(0)
    attrs = rng.integers(0, 4, (args.users, 2)).astype(np.int64)
    cross = rng.integers(0, 1024, (args.users, 1)).astype(np.int64)

    cpu = torch.device("cpu")

    def batches(n, depth):
        """As the training loop makes them: on the host, ``depth`` ahead in a thread (pinned,
        asynchronous copies on CUDA)."""
        chunks = [rng.integers(0, args.users, args.batch) for _ in range(n)]
        make = lambda users: _make_batch(users, hist, attrs, cross, rng, p, args.items, cpu)  # noqa: E731
        return training_batches(chunks, make, depth, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    total = args.warmup + args.steps
    depth = prefetch_depth(args.prefetch, device)
    pre = list(batches(total, 0)) if args.prebatch else None
    it = iter(pre) if pre is not None else batches(total, depth)
    tok_sum, seq_sum, out_sum = 0, 0, 0.0
    timed_batches = []  # kept for the untimed FLOP count
    t0 = None
    model.train()
    for s in range(total):
        if s == args.warmup:
            sync()
            t0 = time.perf_counter()
        batch = next(it)
        with autocast(device, amp):
            loss = step_model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= args.warmup:
            if args.count:
                timed_batches.append(batch)
            B, W = batch["tokens"].shape
            seq_sum += B
            tok_sum += B * (W + 1)
            out_sum += B * (len(batch["cand"]) if "cand" in batch else args.items)
    sync()
    train_s = time.perf_counter() - t0
    mean_len = tok_sum / max(seq_sum, 1) - 1
    f_fwd = flops_per_seq(int(round(mean_len)), args.d_model, args.layers, 2, out_sum / max(seq_sum, 1))
    train_flops = 3 * f_fwd * seq_sum
    counted_flops = count_train_flops(model, timed_batches, device, amp) if args.count else None
    del timed_batches

    # inference: encode users at full length
    model.eval()
    from pipelines.recommenders.encoder import _pad_sequences

    n_inf = min(args.users, args.batch * max(args.steps, 1))
    L = args.seq - 1
    sync()
    t1 = time.perf_counter()
    inf_tokens = 0
    with torch.no_grad(), autocast(device, amp):
        V, _ = model.item_table()
        for s in range(0, n_inf, args.batch):
            us = range(s, min(s + args.batch, n_inf))
            tok, gap, rat = _pad_sequences([tuple(x[-L:] for x in hist.get(u)) for u in us], L)
            t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
            V_tok = torch.cat([torch.zeros_like(V[:1]), V])[t(tok)]
            idx = np.arange(us.start, us.stop)
            h, pad = model.encode(t(tok), t(gap), t(rat), t(attrs[idx]), t(cross[idx]), V_tok)
            model.pool(h, pad, "mean")
            inf_tokens += tok.size + len(idx)
    sync()
    inf_s = time.perf_counter() - t1
    inf_flops = flops_per_seq(int(round(inf_tokens / n_inf)) - 1, args.d_model, args.layers, 2, 0) * n_inf
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": str(amp).replace("torch.", "") if amp else "fp32", "compile": args.compile,
        "prebatch": args.prebatch, "prefetch": 0 if args.prebatch else depth,
        "config": {k: getattr(args, k) for k in ("users", "items", "seq", "d_model", "layers", "heads", "batch",
                                                  "steps")},
        "softmax": "full" if args.items <= args.full_softmax_max else f"sampled({args.negatives})",
        "train_sequences_per_s": round(seq_sum / train_s, 1),
        "train_tokens_per_s": round(tok_sum / train_s, 1),
        "train_tflops": float(f"{train_flops / train_s / 1e12:.4g}"),
        "train_flops_analytic": float(f"{train_flops:.6g}"),
        "train_tflops_counted": None if counted_flops is None else float(f"{counted_flops / train_s / 1e12:.4g}"),
        "train_flops_counted": None if counted_flops is None else float(f"{counted_flops:.6g}"),
        "infer_sequences_per_s": round(n_inf / inf_s, 1),
        "infer_tflops": float(f"{inf_flops / inf_s / 1e12:.4g}"),
        "mean_input_len": round(mean_len, 1), "final_loss": round(float(loss.detach()), 4),
    }
    if device.type == "cuda":
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
