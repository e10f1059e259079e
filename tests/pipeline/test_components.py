"""`flexfeed components`: every registered component with its parameters, the signals it reads, paper and rule."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.components import component_entry
from pipeline.components_doc import components_markdown
from pipeline.strategies import FAMILY_REGISTRIES, Registry, Selector
from pipeline.strategies.reorders.curriculum import LayeredParams, SectionParams
from pipeline.strategies.selectors.less import LessParams

DOC = Path(__file__).resolve().parents[2] / "docs" / "components.md"

# components the anchors ship, by family (a hand list: the catalog may hold more, never fewer)
SHIPPED = {
    "select": {"random", "loss", "delta_loss", "less", "near", "tsds", "cluster", "nice"},
    "mix": {"static", "random", "doremi", "odm"},
    "reorder": {"shuffle", "sorting", "folding", "zigzag", "segment", "stair", "saw"},
    "weight": {"loss", "adapt"},
}


@pytest.fixture(scope="module")
def catalog() -> dict:
    """The JSON `flexfeed components --json` prints, parsed."""
    result = CliRunner().invoke(main, ["components", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stdout == json.dumps(json.loads(result.stdout), indent=1, sort_keys=True) + "\n", "keys not sorted"
    return json.loads(result.stdout)


def entry(catalog: dict, family: str, name: str) -> dict:
    """One component's entry."""
    (found,) = [e for e in catalog[family] if e["name"] == name]
    return found


def test_lists_every_registered_component_in_json_and_text(catalog):
    text = CliRunner().invoke(main, ["components"]).output
    for family, registry in FAMILY_REGISTRIES.items():
        names = [e["name"] for e in catalog[family]]
        assert names == sorted(registry.names()), family
        assert SHIPPED[family] <= set(names), family
        assert set(catalog["plan"]["families"][family]) == set(names)
        assert f"{family}:" in text and all(f"  {n}" in text for n in names)
    assert entry(catalog, "select", "near")["aliases"] == ["knn"]
    assert entry(catalog, "mix", "odm")["aliases"] == ["exp3"]
    assert [k["name"] for k in catalog["plan"]["stage_keys"]][:4] == ["family", "component", "component_args", "mode"]


def test_every_registered_component_has_a_rule(catalog):
    missing = [f"{family} {e['name']}" for family in FAMILY_REGISTRIES for e in catalog[family] if not e["rule"]]
    assert not missing, f"components without a `rule` class attribute: {missing}"


def test_param_defaults_are_those_of_a_default_built_params_dataclass(catalog):
    for family, registry in FAMILY_REGISTRIES.items():
        for e in catalog[family]:
            params_cls = registry.resolve(e["name"]).Params
            if any(p["required"] for p in e["params"]):
                continue
            built = params_cls()
            expected = {f.name: getattr(built, f.name) for f in dataclasses.fields(built)}
            got = {p["name"]: p["default"] for p in e["params"]}
            assert got == json.loads(json.dumps(expected)), f"{family} {e['name']}"
    less = entry(catalog, "select", "less")["params"]
    assert less == [{"name": "task_reduce", "type": "str", "required": False, "default": LessParams().task_reduce,
                     "doc": "How per-task scores combine: `max` (LESS: a row helps if it helps some task) or `mean`."}]
    layers = {name: {p["name"]: p for p in entry(catalog, "reorder", name)["params"]}["layers"]
              for name in ("zigzag", "stair")}
    assert layers["zigzag"]["default"] == LayeredParams().layers == 3
    assert layers["stair"]["default"] == SectionParams().layers == 2
    # a field a subclass redeclares without a docstring keeps the one of the class it extends
    assert layers["stair"]["doc"] == layers["zigzag"]["doc"] != ""
    assert all(p["doc"] for p in entry(catalog, "reorder", "saw")["params"])


def need(name, split="train", refresh=True, live=False, rows="all") -> dict:
    return {"name": name, "split": split, "refresh": refresh, "live": live, "rows": rows}


def test_signals_read_by_default_and_the_params_they_depend_on(catalog):
    expected = {
        ("select", "less"): ([need("grads"), need("grads_sgd", "target")], []),
        ("select", "nice"): ([need("grads"), need("grads_nice", "target")], []),
        ("select", "near"): ([need("embed", refresh=False), need("embed", "target", refresh=False)], []),
        ("select", "loss"): ([need("loss", live=True)], []),
        ("select", "cluster"): ([need("embed", refresh=False), need("grads", rows="probe"), need("grads_sgd", "target")],
                                ["score"]),
        ("select", "random"): ([], []),
        ("mix", "doremi"): ([need("ref_loss", refresh=False)], []),
        ("reorder", "sorting"): ([need("loss", refresh=False)], ["score", "live"]),
        ("reorder", "shuffle"): ([], []),
        ("weight", "adapt"): ([need("embed"), need("embed", "target")], []),
    }
    for (family, name), (signals, vary) in expected.items():
        e = entry(catalog, family, name)
        assert (e["signals"], e["signals_vary_with"]) == (signals, vary), f"{family} {name}"


@dataclasses.dataclass(kw_only=True)
class _NeedsAPath:
    path: str
    """Where the scores are."""
    top: int = 3


def test_a_component_with_a_required_parameter_is_listed():
    registry = Registry("select", Selector)

    @registry.register("from_file", "ff")
    class FromFile(Selector):
        """Rows listed in a file."""

        Params = _NeedsAPath
        rule = "the file's rows"

    e = component_entry(registry, "from_file")
    assert e["aliases"] == ["ff"] and e["summary"] == "Rows listed in a file." and e["rule"] == "the file's rows"
    assert e["params"] == [
        {"name": "path", "type": "str", "required": True, "default": None, "doc": "Where the scores are."},
        {"name": "top", "type": "int", "required": False, "default": 3, "doc": ""}]
    assert e["signals"] is None and e["signals_vary_with"] == ["path"]


def test_docs_components_md_is_current():
    assert DOC.read_text() == components_markdown(), (
        "docs/components.md is stale: run `python -m pipeline.components_doc > docs/components.md`")
