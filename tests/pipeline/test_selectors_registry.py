"""Selector registry: names and aliases, refused names and parameters, user classes by import path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.strategies import SELECTORS, Selection, Selector
from store.errors import FlexfeedError


@dataclass(kw_only=True)
class EveryOtherParams:
    """Parameters of the test selector."""

    offset: int = 0
    """First row taken."""


class EveryOtherRow(Selector):
    """A user selector: rows offset, offset+2, ... (wrapping around)."""

    Params = EveryOtherParams

    def select(self, ctx, num_samples):
        """Every other row from `offset`."""
        rows = (self.params.offset + 2 * np.arange(num_samples)) % ctx.num_rows
        return Selection(indices=rows)


def test_builtin_names_and_aliases_resolve():
    for name in ("random", "loss", "delta_loss", "less", "near", "tsds", "cluster"):
        assert SELECTORS.resolve(name).name == name
    for alias, name in (("cluster_less", "cluster"), ("uniform", "random"), ("knn", "near")):
        assert SELECTORS.resolve(alias) is SELECTORS.resolve(name)


def test_unknown_selector_name_suggests_the_closest():
    with pytest.raises(FlexfeedError, match="did you mean 'less'"):
        SELECTORS.build("lesss")
    with pytest.raises(FlexfeedError, match="did you mean 'delta_loss'"):
        SELECTORS.build("delta_los")


def test_unknown_parameter_suggests_the_closest():
    with pytest.raises(FlexfeedError, match="did you mean 'bucket_weights'"):
        SELECTORS.build("loss", {"bucket_weight": [1, 1, 1]})
    with pytest.raises(FlexfeedError, match="did you mean 'num_neighbors'"):
        SELECTORS.build("tsds", {"num_neighbours": 10})


def test_bad_parameter_values_are_refused():
    with pytest.raises(FlexfeedError, match="bucket_weights"):
        SELECTORS.build("loss", {"bucket_weights": [1, 1]})
    with pytest.raises(FlexfeedError, match="mode"):
        SELECTORS.build("delta_loss", {"mode": "biggest"})
    with pytest.raises(FlexfeedError, match="must be a number"):
        SELECTORS.build("tsds", {"temperature": "hot"})


def test_user_selector_by_import_path(monkeypatch, make_ctx):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    sel = SELECTORS.build("tests.pipeline.test_selectors_registry:EveryOtherRow", {"offset": 1})
    ctx = make_ctx(7, domain_names=["all"])
    assert list(sel.select(ctx, 5).indices) == [1, 3, 5, 0, 2]
    with pytest.raises(FlexfeedError, match="did you mean 'offset'"):
        SELECTORS.build("tests.pipeline.test_selectors_registry:EveryOtherRow", {"ofset": 1})
    with pytest.raises(FlexfeedError, match="cannot load"):
        SELECTORS.build("tests.pipeline.test_selectors_registry:NoSuchClass")
