"""docs/config.md is generated from the code and must match it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import FLAT_GROUPS, SECTION_GROUPS, FlexArgs, accepted_keys
from pipeline.config.reference import field_docs, reference_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == reference_markdown(), (
        "docs/config.md is stale: run `python -m pipeline.config.reference > docs/config.md`")


def test_every_field_is_documented_and_listed():
    text = reference_markdown()
    for cls in [*FLAT_GROUPS.values(), *SECTION_GROUPS.values()]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    for key in accepted_keys():
        assert f"`{key}`" in text, key


def test_field_docs_reads_the_docstring_under_each_field():
    docs = field_docs(FlexArgs)
    assert docs["update_step"] == "Steps between two decisions."
    assert set(docs) == {f.name for f in dataclasses.fields(FlexArgs)}
