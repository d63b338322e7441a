"""Landing-zone ingest: validate new data batches and append them to the dataset.

A *landing zone* is a local folder (default ``landing/``) or an S3 prefix
(``s3://bucket/prefix``; endpoint configurable for MinIO/moto).  A *batch* is
one sub-folder of it holding ``ratings.csv`` (or ``.parquet``) and optionally
``items``/``users`` tables and media files (``images/...``, ``videos/...``) in
the data contract (:mod:`pipelines.schema`).  Folders whose name starts with
``.`` or ``_`` are ignored (write a batch under a hidden name, then rename it;
or set ``require_marker`` and drop ``_SUCCESS`` last).

For each batch, under an exclusive file lock on the dataset
(``<parent>/.<name>.ingest.lock``) so that concurrent ingests merge every
batch exactly once:

1. the batch's content hash (files + relative paths) is looked up in
   ``<dataset>/_batches.json``: an already merged batch is skipped;
2. the MERGED candidate (current dataset + batch: rows appended, duplicate
   keys replaced by the batch, media copied) is built in a temp dir next to
   the dataset and validated with the same Great Expectations suites as the
   ``validate`` stage (:func:`tasks.validate.validate`);
3. a bad batch is moved to ``quarantine/<batch>/`` with ``_quarantine.json``
   (validation findings) and ``_report.txt``; nothing is merged;
4. a good batch: ``_batches.json`` is updated inside the candidate, the
   candidate replaces the dataset directory (rename), the batch is archived
   (``<landing>/_processed/<batch>``) and, when the dataset lies inside a DVC
   repository, ``dvc add`` records it as a new DVC version (under the
   run-stage runner's repository lock).

A killed ingest (SIGKILL at any point) leaves the dataset either as it was or
completely merged: the candidate replaces it in one atomic rename.  The next
ingest first removes the temp candidate it left and, if the merge happened but
its ``dvc add`` did not, versions the dataset (:func:`recover`).

``python -m pipelines.ingest [--landing landing] [--data DIR] [--quarantine quarantine]
[--params params.yaml] [--repo .] [--no-dvc] [--json]`` prints a summary; exit
code 0 unless something broke (a quarantined batch is a recorded outcome, not
a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd

from .io import load_params, replace_dir, write_json
from .publish_s3 import S3Store, sha256_file
from .runner import file_lock
from .schema import ITEM, REQUIRED, TABLES, TS, USER, DataContractError, read_table, table_path

BATCHES_FILE = "_batches.json"
MARKER = "_SUCCESS"
PROCESSED = "_processed"
S3_QUARANTINE = "_quarantine"
KEYS = {"ratings": [USER, ITEM, TS], "items": [ITEM], "users": [USER]}
DEFAULT_LOCK_TIMEOUT = 3600.0

Validator = Callable[[Path, dict], Any]  # -> object with .passed, .findings (and .to_json())


class IngestError(RuntimeError):
    """Ingest could not complete (the dataset is left consistent)."""


@dataclass
class BatchResult:
    batch: str
    status: str  # merged | duplicate | quarantined | already-quarantined | gone
    hash: str = ""
    rows_added: dict[str, int] = field(default_factory=dict)
    message: str = ""
    quarantine_dir: str | None = None


@dataclass
class IngestReport:
    dataset: str
    landing: str
    results: list[BatchResult] = field(default_factory=list)
    dvc_md5: str | None = None  # DVC hash of the dataset (its .dvc file)
    untrained: bool = False  # the DVC-tracked dataset differs from the version in dvc.lock
    notes: list[str] = field(default_factory=list)

    @property
    def merged(self) -> list[BatchResult]:
        return [r for r in self.results if r.status == "merged"]

    @property
    def quarantined(self) -> list[BatchResult]:
        return [r for r in self.results if r.status == "quarantined"]

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_merged"] = len(self.merged)
        d["n_quarantined"] = len(self.quarantined)
        return d


# --------------------------------------------------------------------------- batches
def _batch_files(root: Path) -> list[Path]:
    """Content files: no hidden paths, no top-level ``_*`` files (marker, reports, _batches.json)."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if p.is_file() and not rel[0].startswith("_") and not any(x.startswith(".") for x in rel):
            out.append(p)
    return sorted(out)


def batch_hash(root: str | os.PathLike) -> str:
    """Content hash of a batch folder: relative paths + file contents (marker excluded)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in _batch_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _is_batch_name(name: str) -> bool:
    return bool(name) and not name.startswith((".", "_"))


class LocalLanding:
    """Batches are sub-folders of a local directory."""

    def __init__(self, root: str | os.PathLike, require_marker: bool = False):
        self.root = Path(root)
        self.require_marker = require_marker

    def __str__(self) -> str:
        return str(self.root)

    def list_batches(self) -> list[str]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and _is_batch_name(p.name) and table_path(p, "ratings") is not None:
                if self.require_marker and not (p / MARKER).exists():
                    continue
                out.append(p.name)
        return out

    @contextlib.contextmanager
    def fetch(self, batch: str) -> Iterator[Path | None]:
        p = self.root / batch
        yield p if p.is_dir() else None

    def archive(self, batch: str, digest: str) -> None:
        dest = _free_name(self.root / PROCESSED, batch, digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / batch, dest)

    def quarantine(self, batch: str, local: Path, dest: Path, digest: str) -> None:
        shutil.move(str(local), str(dest))


class S3Landing:
    """Batches are "sub-folders" of an S3 prefix; processed ones are moved under ``_processed/``."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 require_marker: bool = False, store: S3Store | None = None):
        self.store = store or S3Store.from_url(url, endpoint_url=endpoint_url, region=region)
        self.require_marker = require_marker

    def __str__(self) -> str:
        return str(self.store)

    def list_batches(self) -> list[str]:
        out = []
        for name in self.store.list_dirs(""):
            if not _is_batch_name(name):
                continue
            keys = {k.split("/", 1)[1] for k in self.store.list(name + "/") if "/" in k}
            if not ({"ratings.csv", "ratings.parquet"} & keys):
                continue
            if self.require_marker and MARKER not in keys:
                continue
            out.append(name)
        return out

    @contextlib.contextmanager
    def fetch(self, batch: str) -> Iterator[Path | None]:
        with tempfile.TemporaryDirectory(prefix="mmrec-batch-") as tmp:
            dest = Path(tmp) / batch
            files = self.store.download_dir(batch, dest)
            yield dest if files else None

    def archive(self, batch: str, digest: str) -> None:
        self.store.move_dir(batch, f"{PROCESSED}/{batch}-{digest[:12]}")

    def quarantine(self, batch: str, local: Path, dest: Path, digest: str) -> None:
        shutil.copytree(local, dest)
        self.store.move_dir(batch, f"{S3_QUARANTINE}/{batch}-{digest[:12]}")


def open_landing(spec: str, *, endpoint_url: str | None = None, region: str | None = None,
                 require_marker: bool = False):
    if str(spec).startswith("s3://"):
        return S3Landing(str(spec), endpoint_url=endpoint_url, region=region, require_marker=require_marker)
    return LocalLanding(spec, require_marker=require_marker)


def _free_name(parent: Path, name: str, digest: str) -> Path:
    dest = parent / name
    return dest if not dest.exists() else parent / f"{name}-{digest[:12]}"


# --------------------------------------------------------------------------- merge
def read_batches(dataset: Path) -> list[dict]:
    p = dataset / BATCHES_FILE
    if not p.exists():
        return []
    return list(json.loads(p.read_text(encoding="utf-8")).get("batches", []))


def _as_text(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.isna(), s.astype(str))


def merge_frames(cur: pd.DataFrame | None, new: pd.DataFrame | None, key: list[str]) -> pd.DataFrame | None:
    """Append ``new`` rows to ``cur``; rows with the same key are replaced by ``new``'s."""
    if new is None:
        return cur
    if cur is None:
        return new.reset_index(drop=True)
    cur, new = cur.copy(), new.copy()
    for c in set(cur.columns) & set(new.columns):
        if cur[c].dtype != new[c].dtype:
            try:  # strict conversion (raises on bad values, never coerces them away)
                new[c] = new[c].astype(cur[c].dtype)
            except (ValueError, TypeError):
                cur[c], new[c] = _as_text(cur[c]), _as_text(new[c])
    cols = list(cur.columns) + [c for c in new.columns if c not in cur.columns]
    out = pd.concat([cur, new], ignore_index=True)[cols]
    subset = [k for k in key if k in out.columns]
    if subset:
        out = out.drop_duplicates(subset=subset, keep="last")
    return out.reset_index(drop=True)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_batch(batch: Path) -> list[dict]:
    """Contract problems of the batch itself (before merging): unreadable / missing columns."""
    problems = []
    for table in TABLES:
        files = [batch / f"{table}{ext}" for ext in (".csv", ".parquet") if (batch / f"{table}{ext}").exists()]
        if len(files) > 1:
            problems.append({"file": str(files[0]), "rule": "one-file-per-table",
                             "detail": f"both {files[0].name} and {files[1].name}"})
            continue
        if not files:
            if table == "ratings":
                problems.append({"file": str(batch / "ratings.csv"), "rule": "table-exists",
                                 "detail": "a batch must contain ratings.csv or ratings.parquet"})
            continue
        try:
            df = read_table(files[0])
        except DataContractError as exc:
            problems.append({"file": exc.file, "rule": exc.rule, "detail": exc.detail or str(exc),
                             "rows": exc.rows})
            continue
        missing = [c for c in REQUIRED[table] if c not in df.columns]
        if missing:
            problems.append({"file": str(files[0]), "rule": "required-columns", "column": missing[0],
                             "detail": f"missing required column(s) {missing}"})
    return problems


def build_candidate(dataset: Path, batch: Path, dest: Path) -> dict[str, int]:
    """Write current dataset + batch into ``dest`` (empty dir). Returns rows added per table."""
    table_files = {}
    added = {}
    for table in TABLES:
        cur_p = table_path(dataset, table) if dataset.is_dir() else None
        new_p = table_path(batch, table)
        if cur_p is not None:
            table_files[cur_p.name] = True
        if new_p is not None:
            table_files[new_p.name] = True
        if cur_p is None and new_p is None:
            continue
        cur = read_table(cur_p) if cur_p is not None else None
        new = read_table(new_p) if new_p is not None else None
        out = merge_frames(cur, new, KEYS[table])
        target = dest / (cur_p.name if cur_p is not None else new_p.name)
        _write_table(out, target)
        added[table] = len(out) - (0 if cur is None else len(cur))
    # existing media and other files: hard links (same filesystem) - cheap and unchanged
    if dataset.is_dir():
        for p in _batch_files(dataset):
            rel = p.relative_to(dataset)
            if rel.as_posix() in table_files:
                continue
            _link_or_copy(p, dest / rel)
    for p in _batch_files(batch):
        rel = p.relative_to(batch)
        if len(rel.parts) == 1 and rel.name in table_files:
            continue
        target = dest / rel
        if target.exists():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, target)
    return added


def _swap_in(candidate: Path, dataset: Path) -> None:
    """The candidate becomes the dataset in one atomic exchange (see ``io.replace_dir``)."""
    replace_dir(candidate, dataset)


def _pending_file(dataset: Path) -> Path:
    return dataset.parent / f".{dataset.name}.ingest-pending.json"


def recover(dataset: Path, dvc_repo: Path | None, lock_timeout: float) -> list[str]:
    """Finish or undo what a killed ingest left behind (call under the ingest lock).

    * temp candidates (``.<name>.candidate-*``): deleted; the dataset was never touched
      by them (a candidate becomes the dataset only by the final rename);
    * the two-rename fallback killed in between (dataset missing, ``...candidate-*.old``
      present): the complete candidate is put in place;
    * a merge whose ``dvc add`` did not happen (``.<name>.ingest-pending.json``): the
      dataset is versioned now, so the new version is not lost to DVC.
    """
    notes = []
    parent = dataset.parent
    if not parent.is_dir():
        return notes
    if not dataset.exists():
        for old in sorted(parent.glob(f".{dataset.name}.candidate-*.old")):
            cand = old.with_name(old.name[:-len(".old")])
            if cand.is_dir():
                os.replace(cand, dataset)
                notes.append(f"recovered: {cand.name} (complete, its rename was interrupted) "
                             f"put in place as {dataset.name}")
                break
    for p in sorted(parent.glob(f".{dataset.name}.candidate-*")):
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"recovered: removed {p.name} left by an interrupted ingest")
    pending = _pending_file(dataset)
    if pending.exists():
        if dvc_repo is not None and dataset.is_dir():
            dvc_add(dvc_repo, dataset, lock_timeout)
            notes.append(f"recovered: `dvc add {dataset.name}` of a merge interrupted before it")
        pending.unlink()
    return notes


def _default_validator(path: Path, params: dict):
    from tasks.validate import validate

    return validate(path, params)


def _findings_json(result) -> dict:
    if hasattr(result, "to_json"):
        return result.to_json()
    return {"passed": bool(result.passed),
            "findings": [f.to_dict() if hasattr(f, "to_dict") else str(f) for f in result.findings]}


def _message(result) -> str:
    if hasattr(result, "message"):
        return result.message()
    return "\n".join(str(f) for f in result.findings)


def _quarantined_hashes(quarantine: Path) -> dict[str, str]:
    """hash -> quarantine folder of every batch quarantined so far (first report wins)."""
    out: dict[str, str] = {}
    if quarantine.is_dir():
        for p in sorted(quarantine.glob("*/_quarantine.json")):
            info = json.loads(p.read_text(encoding="utf-8"))
            if "duplicate_of" not in info:
                out.setdefault(info.get("hash", ""), str(p.parent))
    return out


# --------------------------------------------------------------------------- DVC
def find_repo(path: Path, repo: Path | None) -> Path | None:
    """The DVC repository holding ``path`` (None when it lies outside any)."""
    candidates = [repo] if repo is not None else [path.parent, *path.parent.parents]
    for c in candidates:
        c = Path(c).resolve()
        if (c / ".dvc").is_dir() and path.resolve().is_relative_to(c):
            return c
    return None


def dvc_add(repo: Path, dataset: Path, timeout: float) -> str | None:
    """``dvc add <dataset>`` under the runner lock; returns the new DVC md5 of the dataset."""
    import yaml

    from .runner import _with_dvc, open_dvc, repo_lock

    from dvc.exceptions import DvcException

    rel = dataset.resolve().relative_to(repo).as_posix()
    dvc_repo = open_dvc(repo)
    try:
        with repo_lock(repo, timeout, f"ingest dvc add {rel}"):
            _with_dvc(dvc_repo, lambda r: r.add([str(repo / rel)]), timeout)
    except DvcException as exc:
        hint = ""
        if "git-ignored" in str(exc):
            hint = (f" (the .dvc file must not be git-ignored: e.g. replace '/{Path(rel).parts[0]}/' "
                    f"in .gitignore by '/{Path(rel).parts[0]}/*' and '!/{Path(rel).parent}/*.dvc')")
        raise IngestError(f"dataset merged but `dvc add {rel}` failed: {exc}{hint}") from exc
    finally:
        dvc_repo.close()
    spec = yaml.safe_load((repo / f"{rel}.dvc").read_text(encoding="utf-8"))
    return spec["outs"][0].get("md5")


def tracked_md5(dataset: Path) -> str | None:
    """The dataset's version in ``<dataset>.dvc`` (None when not tracked)."""
    import yaml

    p = Path(f"{dataset}.dvc")
    if not p.exists():
        return None
    return (yaml.safe_load(p.read_text(encoding="utf-8")) or {}).get("outs", [{}])[0].get("md5")


def trained_md5(repo: Path, dataset: Path) -> str | None:
    """The dataset version the pipeline last ran on (a stage dep in dvc.lock), if any."""
    import yaml

    lock = repo / "dvc.lock"
    if not lock.exists():
        return None
    rel = dataset.resolve().relative_to(repo).as_posix()
    for st in ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}).values():
        for d in st.get("deps", []):
            if d.get("path") == rel:
                return d.get("md5")
    return None


# --------------------------------------------------------------------------- ingest
def ingest(landing, dataset: str | os.PathLike, quarantine: str | os.PathLike, params: dict | None = None,
           *, validator: Validator | None = None, repo: str | os.PathLike | None = None,
           dvc: bool = True, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> IngestReport:
    """Process every ready batch of ``landing`` (a LocalLanding/S3Landing or a path/URL)."""
    if isinstance(landing, (str, os.PathLike)):
        landing = open_landing(str(landing))
    validator = validator or _default_validator
    dataset = Path(dataset).absolute()
    quarantine = Path(quarantine).absolute()
    report = IngestReport(dataset=str(dataset), landing=str(landing))
    dvc_repo = find_repo(dataset, Path(repo) if repo is not None else None) if dvc else None
    if dvc and dvc_repo is None:
        report.notes.append(f"{dataset} is not inside a DVC repository: not versioned with DVC")
    lock = dataset.parent / f".{dataset.name}.ingest.lock"
    with file_lock(lock, lock_timeout, "ingest recovery"):
        report.notes += recover(dataset, dvc_repo, lock_timeout)
    for name in landing.list_batches():
        with file_lock(lock, lock_timeout, f"ingest {name}"), landing.fetch(name) as local:
            if local is None:
                report.results.append(BatchResult(name, "gone", message="taken by another ingest"))
                continue
            hooks: list[Callable[[], None]] = []
            if dvc_repo is not None and dataset.is_dir() and not Path(f"{dataset}.dvc").exists():
                # version the dataset as it was, before its first merge
                hooks.append(lambda: dvc_add(dvc_repo, dataset, lock_timeout))
            if dvc_repo is not None:  # a kill between the merge and its `dvc add`: see recover()
                hooks.append(lambda: write_json(_pending_file(dataset), {"batch": name}))
            report.results.append(_ingest_one(landing, name, local, dataset, quarantine, params or {},
                                               validator, (lambda: [h() for h in hooks]) if hooks else None))
            if report.results[-1].status == "merged" and dvc_repo is not None:
                report.dvc_md5 = dvc_add(dvc_repo, dataset, lock_timeout)
                _pending_file(dataset).unlink(missing_ok=True)
    if dvc_repo is not None:
        report.dvc_md5 = tracked_md5(dataset)
        report.untrained = report.dvc_md5 is not None and report.dvc_md5 != trained_md5(dvc_repo, dataset)
    return report


def _ingest_one(landing, name: str, local: Path, dataset: Path, quarantine: Path, params: dict,
                validator: Validator, before_swap: Callable[[], None] | None = None) -> BatchResult:
    digest = batch_hash(local)
    if digest in {b.get("hash") for b in read_batches(dataset)}:
        landing.archive(name, digest)
        return BatchResult(name, "duplicate", digest, message="same content already merged")
    earlier = _quarantined_hashes(quarantine).get(digest)
    if earlier is not None:  # re-delivered bad batch: move it aside too, pointing at the first report
        dest = _free_name(quarantine, name, digest)
        landing.quarantine(name, local, dest, digest)
        write_json(dest / "_quarantine.json", {"batch": name, "hash": digest, "source": str(landing),
                                               "quarantined_at": _now(), "duplicate_of": earlier})
        return BatchResult(name, "already-quarantined", digest, quarantine_dir=str(dest),
                           message=f"same content was quarantined before: {earlier}")
    dataset.parent.mkdir(parents=True, exist_ok=True)
    candidate = Path(tempfile.mkdtemp(prefix=f".{dataset.name}.candidate-", dir=dataset.parent))
    try:
        problems = check_batch(local)
        result = None
        if not problems:
            added = build_candidate(dataset, local, candidate)
            result = validator(candidate, params)
        if problems or not result.passed:
            report = ({"passed": False, "findings": problems} if problems else _findings_json(result))
            text = ("\n".join(f"ERROR: {p['file']}: rule '{p['rule']}': {p['detail']}" for p in problems)
                    if problems else _message(result))
            # name the merged candidate as what it was, not as a temp dir that is gone
            where = f"{dataset}+{name}"
            text = text.replace(str(candidate), where)
            report = json.loads(json.dumps(report, default=str).replace(str(candidate), where))
            dest = _free_name(quarantine, name, digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            landing.quarantine(name, local, dest, digest)
            write_json(dest / "_quarantine.json", {
                "batch": name, "hash": digest, "source": str(landing),
                "quarantined_at": _now(), "validation": report})
            (dest / "_report.txt").write_text(text + "\n", encoding="utf-8")
            print(f"ingest: batch '{name}' QUARANTINED -> {dest}\n{text}", file=sys.stderr)
            return BatchResult(name, "quarantined", digest, message=text.splitlines()[0] if text else "",
                               quarantine_dir=str(dest))
        entries = read_batches(dataset) + [{"batch": name, "hash": digest, "merged_at": _now(),
                                            "rows_added": added, "source": str(landing)}]
        write_json(candidate / BATCHES_FILE, {"batches": entries})
        if before_swap is not None:
            before_swap()
        _swap_in(candidate, dataset)
    finally:
        shutil.rmtree(candidate, ignore_errors=True)
    landing.archive(name, digest)
    print(f"ingest: batch '{name}' merged into {dataset} (+{added})", file=sys.stderr)
    return BatchResult(name, "merged", digest, added)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--landing", default=os.environ.get("MMREC_LANDING", "landing"),
                    help="local folder or s3://bucket/prefix (env MMREC_LANDING; default landing)")
    ap.add_argument("--data", default=None, help="dataset directory (default: data.path in params)")
    ap.add_argument("--quarantine", default=os.environ.get("MMREC_QUARANTINE", "quarantine"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repo", default=None, help="DVC repository root (default: found from --data)")
    ap.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the merged dataset")
    ap.add_argument("--require-marker", action="store_true", help=f"only batches holding {MARKER}")
    ap.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (env MMREC_S3_ENDPOINT_URL)")
    ap.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT)
    ap.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = ap.parse_args(argv)
    data = args.data or load_params("data", args.params)["path"]
    params = load_params("validate", args.params)
    landing = open_landing(args.landing, endpoint_url=args.s3_endpoint_url,
                           require_marker=args.require_marker)
    try:
        # DVC reports on stdout: keep stdout for the JSON report only
        with contextlib.redirect_stdout(sys.stderr):
            report = ingest(landing, data, args.quarantine, params, repo=args.repo,
                            dvc=not args.no_dvc, lock_timeout=args.lock_timeout)
    except IngestError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for r in report.results:
            print(f"{r.batch}: {r.status} {r.rows_added or ''} {r.message}".rstrip())
        print(f"{len(report.merged)} merged, {len(report.quarantined)} quarantined"
              + (f"; dataset DVC md5 {report.dvc_md5}" if report.dvc_md5 else "")
              + ("; not trained on yet" if report.untrained else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
