"""publish stage: gate the new model against the champion, then publish it.

Gate: the new run's primary metric (``publish.primary``, default ``ndcg@10``)
of ``publish.model`` (default ``hybrid``; when absent from metrics.json the
best available model on that metric) on ``publish.slice`` (``all``) is
compared with the current champion's (``champion.json`` in the publish
target).  The model is promoted only if ``value >= champion - tolerance``.
Not promoting is not a failure (exit 0): the decision and its reason are
recorded in ``--out``/decision.json and in the target under
``decisions/<version>.json``.

Publish: metrics, profiles (``--profiles`` dir, if present), recommendations
(``--recs``/recommendations.parquet, if present) and a generated model card
go to ``<prefix>/versions/<version>/...`` with a ``manifest.json`` of
checksums; then ``champion.json``; ``latest.json`` (pointer to the version +
checksums) is written LAST, so readers never see a half-published version.
The version id is a content hash of metrics + artifacts + the selected model:
publishing the same content again uploads nothing new.

Privacy: with ``publish.pseudonymize: true`` every user id in what is published
(profiles, recommendations, samples) is replaced by ``u_`` + HMAC-SHA256 of the id
keyed by the secret in the environment variable ``publish.pseudonym_key_env``
(default ``MMREC_PSEUDONYM_KEY``); see :mod:`pipelines.privacy`.  Pseudonymisation
on and no key set is an error before anything is uploaded.

Target: ``s3://<s3_bucket>/<s3_prefix>`` when ``publish.s3_bucket`` is set
(endpoint: ``s3_endpoint_url`` or env ``MMREC_S3_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL``; credentials ONLY from boto3's default chain, e.g. the
environment; never from params.yaml), else the local directory
``publish.local_dir`` (default ``publish/``).

    python -m tasks.publish --metrics reports/evaluate/metrics.json \
        --profiles artifacts/build_profiles --recs artifacts/fuse \
        --out artifacts/publish --params params.yaml
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipelines.io import atomic_path, load_params, read_json
from pipelines.privacy import pseudonym_key, pseudonymize_files
from pipelines.publish_s3 import LocalStore, S3Store, sha256_file

from ._cli import parser, run_main

DEFAULTS: dict[str, Any] = {
    "primary": "ndcg@10",
    "model": "hybrid",
    "slice": "all",
    "tolerance": 0.005,  # absolute: promote if new >= champion - tolerance
    "force": False,  # promote regardless of the gate (recorded in the decision)
    "champion_file": "champion.json",
    "local_dir": "publish",  # target when s3_bucket is empty
    "s3_bucket": "",
    "s3_prefix": "mmrec",
    "s3_endpoint_url": "",
    "region": "",
    "pseudonymize": False,  # replace user ids by keyed pseudonyms in everything published
    "pseudonym_key_env": "MMREC_PSEUDONYM_KEY",  # env var holding the HMAC key (never in params)
}
RECS_FILE = "recommendations.parquet"


def merge_params(params: dict | None) -> dict[str, Any]:
    params = dict(params or {})
    secret = [k for k in params if any(w in k.lower() for w in ("secret", "access_key", "password", "token"))]
    if secret:
        raise ValueError(f"params 'publish.{secret[0]}': credentials never go in params.yaml (use the "
                         "environment / boto3 default chain or an Airflow connection)")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"params section 'publish': unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    p["tolerance"] = float(p["tolerance"])
    if not isinstance(p["pseudonymize"], bool):
        raise ValueError("params 'publish.pseudonymize' must be true or false")
    if p["tolerance"] < 0:
        raise ValueError("params 'publish.tolerance' must be >= 0")
    return p


# --------------------------------------------------------------------------- gate (pure)
def select_model(metrics: dict, p: dict) -> tuple[str, float, list[str]]:
    """(model, value of the primary metric on the slice, notes)."""
    metric, sl = p["primary"], p["slice"]

    def value(m):
        v = metrics.get(m, {}).get(sl, {}).get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    if value(p["model"]) is not None:
        return p["model"], value(p["model"]), []
    scored = {m: value(m) for m in metrics if value(m) is not None}
    if not scored:
        raise ValueError(f"metrics.json: no model has '{metric}' on slice '{sl}' "
                         f"(models: {sorted(metrics)})")
    best = max(sorted(scored), key=lambda m: scored[m])
    return best, scored[best], [f"model '{p['model']}' has no '{metric}' on slice '{sl}' in "
                                f"metrics.json; using the best available model '{best}'"]


def decide(value: float, version: str, champion: dict | None, p: dict) -> tuple[bool, str]:
    """The gate: (promote?, reason)."""
    metric, sl, tol = p["primary"], p["slice"], p["tolerance"]
    if p["force"]:
        return True, "publish.force is set: promoted without comparing"
    if not champion:
        return True, "no champion yet: first published model"
    if champion.get("version") == version:
        return True, "same content as the champion: re-published (idempotent, nothing new uploaded)"
    if champion.get("metric") != metric or champion.get("slice") != sl:
        return False, (f"champion was measured with {champion.get('metric')} on slice "
                       f"'{champion.get('slice')}', not {metric} on '{sl}': not comparable, kept the "
                       "champion (set publish.force to promote anyway)")
    champ = float(champion["value"])
    if value >= champ - tol:
        return True, (f"{metric}[{sl}] {value:.6f} >= champion {champ:.6f} - tolerance {tol:g} "
                      f"(delta {value - champ:+.6f})")
    return False, (f"metrics regression: {metric}[{sl}] {value:.6f} < champion {champ:.6f} - tolerance "
                   f"{tol:g} (delta {value - champ:+.6f}): kept champion {champion.get('version')}")


# --------------------------------------------------------------------------- content
def collect_files(metrics: Path, profiles: Path | None, recs: Path | None) -> tuple[dict[str, Path], list[str]]:
    """Store key (relative to the version) -> local file; notes on skipped inputs."""
    files = {"metrics.json": metrics}
    notes = []
    if profiles is not None:
        if profiles.is_dir():
            for f in sorted(profiles.rglob("*")):
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(profiles).parts):
                    files[f"profiles/{f.relative_to(profiles).as_posix()}"] = f
        else:
            notes.append(f"profiles {profiles} not found: skipped")
    if recs is not None:
        r = recs / RECS_FILE if recs.is_dir() else recs
        if r.is_file():
            files[RECS_FILE] = r
        else:
            notes.append(f"recommendations {r} not found: skipped")
    return files, notes


def checksums(files: dict[str, Path]) -> dict[str, str]:
    return {key: sha256_file(path) for key, path in sorted(files.items())}


def version_id(sums: dict[str, str], model: str) -> str:
    """Content hash of metrics + artifacts (paths and bytes) and of the model they publish.

    The model is part of the identity: the same files published for another model (e.g.
    ``publish.model`` switched to a weaker one) are a different version, so the gate compares
    it with the champion instead of taking it for a re-publication of the champion.
    """
    h = hashlib.sha256()
    h.update(f"model\0{model}\n".encode())
    for key, digest in sorted(sums.items()):
        h.update(f"{key}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def lock_info(lock_file: Path | None) -> dict:
    """Data version (source deps) and params of every stage, from dvc.lock."""
    if lock_file is None or not lock_file.is_file():
        return {"data": {}, "params": {}}
    stages = (yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    outs = [o["path"] for st in stages.values() for o in st.get("outs", [])]

    def produced(path):
        return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs)

    data, params = {}, {}
    for name, st in stages.items():
        for d in st.get("deps", []):
            path = d["path"]
            if path.endswith(".py") or path.startswith(("pipelines", "tasks")) or produced(path):
                continue
            data[path] = d.get("md5") or d.get("hash")
        for _file, values in (st.get("params") or {}).items():
            params[name] = values
    return {"data": data, "params": params}


def model_card(*, version: str, model: str, p: dict, value: float, metrics: dict, sums: dict,
               info: dict, decision: dict, when: str) -> str:
    metric, sl = p["primary"], p["slice"]
    lines = [f"# Model card: mmrec {model} ({version})", "",
             f"- Generated: {when}",
             f"- Model: `{model}`; primary metric `{metric}` on slice `{sl}`: **{value:.4f}**",
             f"- Decision: {'PROMOTED' if decision['promoted'] else 'not promoted'}: {decision['reason']}",
             *([f"- User ids: pseudonymised (HMAC-SHA256 keyed by the secret in "
                f"`{p['pseudonym_key_env']}`; joinable across the published files)"]
               if p.get("pseudonymize") else []),
             ""]
    lines += ["## Data version", ""]
    if info["data"]:
        lines += [f"- `{path}`: `{md5}`" for path, md5 in sorted(info["data"].items())]
    else:
        lines.append("_unknown (no dvc.lock)_")
    lines += ["", "## Metrics", ""]
    slices = sorted({s for m in metrics.values() for s in m})
    lines += ["| model | " + " | ".join(f"{metric} [{s}]" for s in slices) + " |",
              "|---|" + "---:|" * len(slices)]
    for m in sorted(metrics):
        cells = []
        for s in slices:
            v = metrics[m].get(s, {}).get(metric)
            cells.append("" if v is None else f"{v:.4f}")
        lines.append(f"| {'**' + m + '**' if m == model else m} | " + " | ".join(cells) + " |")
    sel = metrics.get(model, {}).get(sl, {})
    lines += ["", f"All metrics of `{model}` on `{sl}`:", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
              for k, v in sorted(sel.items())]
    lines += ["", "## Parameters (from dvc.lock)", ""]
    if info["params"]:
        lines += ["```yaml", yaml.safe_dump(info["params"], sort_keys=True).rstrip(), "```"]
    else:
        lines.append("_unknown (no dvc.lock)_")
    lines += ["", "## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(sums.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- publish
def open_target(p: dict):
    if p["s3_bucket"]:
        return S3Store(p["s3_bucket"], p["s3_prefix"] or "", endpoint_url=p["s3_endpoint_url"] or None,
                       region=p["region"] or None)
    return LocalStore(p["local_dir"])


def upload_version(store, version: str, files: dict[str, Path], sums: dict[str, str], card: str,
                   manifest_extra: dict) -> list[str]:
    """Upload a version's files (skipped when the same version is already complete)."""
    base = f"versions/{version}"
    manifest = store.get_json(f"{base}/manifest.json")
    if manifest and manifest.get("files") == sums:
        return []  # complete already: idempotent
    uploaded = []
    for key, path in sorted(files.items()):
        store.put_file(f"{base}/{key}", path)
        uploaded.append(f"{base}/{key}")
    store.put_bytes(f"{base}/model_card.md", card.encode("utf-8"))
    uploaded.append(f"{base}/model_card.md")
    store.put_json(f"{base}/manifest.json", {"version": version, "files": sums, **manifest_extra})
    uploaded.append(f"{base}/manifest.json")  # the manifest last: marks the version complete
    return uploaded


def run(metrics_path: Path, profiles: Path | None, recs: Path | None, params: dict, *,
        store=None, lock_file: Path | None = None, now: dt.datetime | None = None) -> dict:
    """Gate + publish. Returns the decision record (also written to the store).

    With ``publish.pseudonymize`` every file is published from a copy whose user ids are
    replaced by keyed pseudonyms (:mod:`pipelines.privacy`); a missing key fails here,
    before anything is read from or written to the target.
    """
    p = merge_params(params)
    if not p["pseudonymize"]:
        return _run(metrics_path, profiles, recs, p, store=store, lock_file=lock_file, now=now)
    key = pseudonym_key(p["pseudonym_key_env"])
    with tempfile.TemporaryDirectory(prefix="mmrec-pseudonymized-") as tmp:
        files, skipped = collect_files(metrics_path, profiles, recs)
        files = pseudonymize_files(files, key, Path(tmp))
        return _run(files["metrics.json"], profiles, recs, p, store=store, lock_file=lock_file,
                    now=now, collected=(files, skipped))


def _run(metrics_path: Path, profiles: Path | None, recs: Path | None, params: dict, *,
         store=None, lock_file: Path | None = None, now: dt.datetime | None = None,
         collected: tuple[dict[str, Path], list[str]] | None = None) -> dict:
    p = merge_params(params)
    store = store if store is not None else open_target(p)
    when = (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds")
    metrics = read_json(metrics_path)
    model, value, notes = select_model(metrics, p)
    files, skipped = collected or collect_files(metrics_path, profiles, recs)
    sums = checksums(files)
    version = version_id(sums, model)
    champion = store.get_json(p["champion_file"])
    promoted, reason = decide(value, version, champion, p)
    decision = {
        "promoted": promoted, "reason": reason, "version": version, "model": model,
        "metric": p["primary"], "slice": p["slice"], "value": value, "tolerance": p["tolerance"],
        "champion": champion, "target": str(store), "decided_at": when, "notes": notes + skipped,
        "files": sums, "uploaded": [], "pseudonymized": p["pseudonymize"],
    }
    info = lock_info(lock_file)
    card = model_card(version=version, model=model, p=p, value=value, metrics=metrics, sums=sums,
                      info=info, decision=decision, when=when)
    if not promoted:
        store.put_json(f"decisions/{version}.json", _record(decision))
        decision["model_card"] = card
        return decision
    decision["uploaded"] = upload_version(store, version, files, sums, card, {
        "model": model, "metric": p["primary"], "slice": p["slice"], "value": value,
        "published_at": when, "data": info["data"]})
    published_at = store.get_json(f"versions/{version}/manifest.json").get("published_at", when)
    store.put_json(f"decisions/{version}.json", _record(decision))
    if not (champion and champion.get("version") == version):
        store.put_json(p["champion_file"], {
            "version": version, "model": model, "metric": p["primary"], "slice": p["slice"],
            "value": value, "published_at": published_at, "data": info["data"]})
    latest = {"version": version, "path": f"versions/{version}/", "model": model,
              "metric": p["primary"], "slice": p["slice"], "value": value,
              "published_at": published_at, "files": sums}
    if store.get_json("latest.json") != latest:
        store.put_json("latest.json", latest)  # LAST: readers switch to a complete version
    decision["model_card"] = card
    return decision


def _record(decision: dict) -> dict:
    return {k: v for k, v in decision.items() if k not in ("uploaded", "model_card")}


def render_decision(d: dict) -> str:
    champ = d["champion"] or {}
    return "\n".join([
        f"# Publish decision: {'PROMOTED' if d['promoted'] else 'NOT promoted'}", "",
        f"- Version: `{d['version']}` (model `{d['model']}`)",
        f"- {d['metric']} [{d['slice']}]: {d['value']:.6f}; champion: "
        + (f"{champ.get('value')} (`{champ.get('version')}`)" if champ else "none"),
        f"- Tolerance: {d['tolerance']:g}",
        f"- Reason: {d['reason']}",
        f"- Target: {d['target']}",
        *[f"- Note: {n}" for n in d["notes"]], ""])


def main(argv=None) -> int:
    ap = parser("publish", __doc__.split("\n\n")[0])
    ap.add_argument("--metrics", required=True, help="reports/evaluate/metrics.json (required)")
    ap.add_argument("--profiles", default=None, help="profiles dir (skipped if missing)")
    ap.add_argument("--recs", default=None, help=f"dir holding {RECS_FILE} (skipped if missing)")
    ap.add_argument("--out", required=True, help="local decision dir (decision.json, model_card.md)")
    ap.add_argument("--lock", default="dvc.lock", help="dvc.lock for data version + params (optional)")
    args = ap.parse_args(argv)

    def body():
        metrics = Path(args.metrics)
        if not metrics.is_file():
            raise FileNotFoundError(f"--metrics {metrics}: not found (run the evaluate stage first)")
        try:
            params = load_params("publish", args.params)
        except KeyError:
            print(f"publish: note: {args.params} has no 'publish' section: using defaults",
                  file=sys.stderr)
            params = {}
        d = run(metrics, Path(args.profiles) if args.profiles else None,
                Path(args.recs) if args.recs else None, params,
                lock_file=Path(args.lock) if args.lock else None)
        card = d.pop("model_card")
        with atomic_path(args.out, is_dir=True) as tmp:
            (tmp / "decision.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
            (tmp / "decision.md").write_text(render_decision(d), encoding="utf-8")
            (tmp / "model_card.md").write_text(card, encoding="utf-8")
        state = "PROMOTED" if d["promoted"] else "NOT promoted"
        print(f"publish: {state} version {d['version']} ({d['model']} {d['metric']}[{d['slice']}]="
              f"{d['value']:.4f}) -> {d['target']}: {d['reason']}", file=sys.stderr)
        for n in d["notes"]:
            print(f"publish: note: {n}", file=sys.stderr)
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
