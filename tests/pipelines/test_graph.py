"""The stage graph is the single source of truth: dvc.yaml and modules agree with it."""

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
        assert direct or via_const, s.name
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
