"""The stage graph is the single source of truth: dvc.yaml and modules agree with it."""

import ast
import importlib
from pathlib import Path

import yaml

from pipelines import dvcgen, graph

ROOT = Path(__file__).resolve().parents[2]


def test_dvc_yaml_is_generated_from_graph():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert (ROOT / "dvc.yaml").read_text() == dvcgen.render(params), \
        "dvc.yaml is stale: run `python -m pipelines dvc-yaml`"


def test_dvc_yaml_stages_and_edges_match_graph():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in graph.STAGES]
    # edges recomputed from dvc.yaml's own deps/outs
    outs = {n: [next(iter(o)) for o in s["outs"]] for n, s in dvc.items()}
    e = set()
    for down, s in dvc.items():
        for up, o in outs.items():
            if up != down and any(graph._inside(d, x) for d in s["deps"] for x in o):
                e.add((up, down))
    assert e == graph.edges()


def test_stage_name_module_and_params_section_agree():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for s in graph.STAGES:
        mod = importlib.import_module(s.module)
        assert hasattr(mod, "main"), s.name
        assert s.name in params, f"params.yaml has no section '{s.name}'"
        assert (ROOT / "tasks" / f"{s.name}.py").exists()
        for code in s.code_deps:
            assert (ROOT / code).exists(), code


def test_every_stage_reads_only_its_own_section():
    for s in graph.STAGES:
        src = (ROOT / "tasks" / f"{s.name}.py").read_text()
        direct = f'load_params("{s.name}"' in src
        via_const = f'STAGE = "{s.name}"' in src and "load_params(STAGE" in src
        # the preprocess_* stages: tasks/_feature_stage.py loads the section it is given
        via_helper = f'STAGE = "{s.name}"' in src and "feature_stage_main(argv, stage=STAGE" in src
        assert direct or via_const or via_helper, s.name
        for other in graph.STAGES:
            if other.name != s.name:
                assert f'load_params("{other.name}"' not in src, (s.name, other.name)
                assert f'STAGE = "{other.name}"' not in src, (s.name, other.name)


def test_graph_is_acyclic_and_validate_first():
    order = graph.topological()
    assert order[0] == "validate"
    assert order.index("split") < order.index("evaluate")
    assert ("validate", "split") in graph.edges()


def test_cycle_is_detected():
    a = graph.Stage("a", {}, deps=("x",), outs=("y",))
    b = graph.Stage("b", {}, deps=("y",), outs=("x",))
    import pytest

    with pytest.raises(ValueError, match="cycle"):
        graph.topological([a, b])


# Imported by every stage, listed by none: the package docstrings / version / thread policy and
# the argument parser + error printing of tasks/_cli.py; none shapes a stage's outputs.
PLUMBING = {"pipelines/__init__.py", "tasks/__init__.py", "tasks/_cli.py"}


def _module_file(name: str) -> Path | None:
    for p in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if p.is_file():
            return p
    return None


def _repo_imports(path: Path, package: str) -> set[str]:
    """Modules of this repository that ``path`` imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # ``from pkg import module``
    return {m for m in found if m and m.split(".")[0] in ("pipelines", "tasks") and _module_file(m)}


def stage_imports(stage: graph.Stage) -> set[str]:
    """Repository files a stage's module imports, transitively (parents' ``__init__`` too)."""
    seen, todo = set(), [stage.module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        todo += sorted(_repo_imports(path, package))
        parts = mod.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]
    return {_module_file(m).relative_to(ROOT).as_posix() for m in seen}


def test_dvc_yaml_lists_every_module_a_stage_imports():
    """A change to any code a stage runs re-runs the stage (``dvc.yaml`` deps come from
    ``Stage.code_deps``): every repository module it imports, however deep, is listed or is
    inside a listed package, plumbing aside."""
    for s in graph.STAGES:
        deps = s.code_deps
        missing = sorted(f for f in stage_imports(s) - PLUMBING
                         if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"{s.name}: dvc.yaml does not list {missing} (add them to its Stage)"


def test_import_walk_sees_nested_and_relative_imports():
    """The walk behind the test above follows relative imports (fusion's ``from
    .recommenders.base``), a package's ``__init__`` (``pipelines.recommenders`` imports every
    model) and imports inside functions (build_profiles imports the encoder lazily)."""
    fuse = stage_imports(graph.by_name()["fuse"])
    assert {"tasks/fuse.py", "pipelines/fusion.py", "pipelines/recommenders/mf.py",
            "pipelines/recommenders/__init__.py", "tasks/_cli.py"} <= fuse
    assert "pipelines/recommenders/encoder.py" in stage_imports(graph.by_name()["build_profiles"])
    assert "tasks/_feature_stage.py" in stage_imports(graph.by_name()["preprocess_video"])
    assert "pipelines/privacy.py" in stage_imports(graph.by_name()["publish"])


def _input_paths(stage: graph.Stage) -> list[str]:
    """Paths the stage's command reads: its arguments' paths that are not (inside) its outs
    (``--recs hybrid=PATH`` gives PATH)."""
    paths = []
    for value in stage.args.values():
        for v in value if isinstance(value, list) else [value]:
            path = v.split("=", 1)[-1]
            if not any(graph._inside(path, o) for o in stage.outs):
                paths.append(path)
    return paths


def test_every_input_a_stage_reads_is_a_dep_and_every_dep_is_read():
    """DVC reruns a stage when a dep changes: an input missing from deps would leave a stale
    output; a dep the command never reads would rerun it for nothing."""
    for s in graph.STAGES:
        ins = _input_paths(s)
        assert ins, s.name
        unlisted = [x for x in ins if not any(graph._inside(x, d) for d in s.deps)]
        assert not unlisted, f"{s.name} reads {unlisted} without listing it in deps"
        unread = [d for d in s.deps if not any(graph._inside(x, d) or graph._inside(d, x) for x in ins)]
        assert not unread, f"{s.name} lists {unread} in deps but its command never reads it"
