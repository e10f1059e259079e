"""DataFlex 1.1.0's own components.yaml (the file its package installs) loads, and every selector, mixer
and weighter entry of it is either translated into a flexfeed component that builds, or refused with one
line naming what is missing. Its reorders and pipelines: tests/pipeline/test_dataflex_plans.py.

Which entries flexfeed lacks is written out here (issue: new components), not read from the registry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config.compat import SECTIONS, component_entry, read_components_file, translate_params
from pipeline.strategies.registry import registry_for
from store.errors import FlexfeedError

FILE = Path(__file__).parent / "data" / "dataflex_1_1_0_components.yaml"
FAMILY = {section: train_type for train_type, section in SECTIONS.items()}
NOT_SHIPPED = {("selectors", "custom"), ("weighters", "custom")}


def _entries():
    data = read_components_file(FILE)
    assert set(data) == {"selectors", "mixers", "weighters", "reorders", "pipelines"}
    for section in ("selectors", "mixers", "weighters"):
        for name in data[section]:
            yield pytest.param(section, name, id=f"{section}.{name}")


@pytest.mark.parametrize(("section", "name"), list(_entries()))
def test_every_component_entry_translates_or_is_refused_by_name(section, name):
    train_type = FAMILY[section]
    params = component_entry(read_components_file(FILE), train_type, name, FILE, "out")
    if (section, name) in NOT_SHIPPED:
        with pytest.raises(FlexfeedError, match=f"unknown {train_type} component {name!r}"):
            registry_for(train_type).resolve(name)
        return
    cls = registry_for(train_type).resolve(name)
    known = {f.name for f in dataclasses.fields(cls.Params)}
    args, elsewhere, warnings = translate_params(train_type, name, params, known, f"{section}.{name}")
    registry_for(train_type).build(name, args)
    for line in warnings:  # each a single line naming the parameter it is about
        assert len(line.splitlines()) == 1 and "DataFlex parameter '" in line
