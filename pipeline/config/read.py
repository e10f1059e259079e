"""Reading what a config is made of: its YAML file (strict), `key=value` overrides, files it names.

Only the text is read here; pipeline.config.load routes the keys and stages.values checks the values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from store.errors import FlexfeedError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml_text(text: str, where: str):
    """Parse YAML text; a syntax error becomes a FlexfeedError naming the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FlexfeedError(f"malformed YAML in {where}{line}: {problem}",
                            "fix the syntax there (indentation, a missing ':' or quote)") from None
    except RecursionError:
        raise FlexfeedError(f"YAML in {where} is nested too deeply", "a run config is flat key: value lines") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar or flow collection)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FlexfeedError(f"bad override {text!r}", "write key=value, e.g. learning_rate=1.0e-4 or grads.proj_dim=512")
    value = parse_yaml_text(raw, f"override {text!r}") if raw.strip() else None
    return key.split("."), value


def read_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML config file, or a FlexfeedError saying why there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FlexfeedError(f"cannot read config {str(path)!r}: {exc.strerror}", "check the path") from None
    except UnicodeDecodeError as exc:
        raise FlexfeedError(f"config {str(path)!r} is not UTF-8 text (byte {exc.start})",
                            "save the YAML file as UTF-8") from None
    raw = parse_yaml_text(text, str(path))
    if raw is None:
        raise FlexfeedError(f"config {str(path)!r} is empty", "write at least model_name_or_path, dataset, output_dir")
    if not isinstance(raw, dict):
        raise FlexfeedError(f"config {str(path)!r} is a {type(raw).__name__}, not a mapping",
                            "write one `key: value` per line at the top level")
    return raw


def find_file(value: str, config_path: Path, where: str) -> Path:
    """A file named in a config: relative to the config's folder first, then to the working directory."""
    raw = Path(value).expanduser()
    candidates = [raw] if raw.is_absolute() else [config_path.parent / raw, Path.cwd() / raw]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = " or ".join(repr(str(c)) for c in candidates)
    raise FlexfeedError(f"{where}: file {value!r} not found (tried {tried})",
                        "write a path relative to the config file or an absolute path")


def apply_overrides(raw: dict, overrides: Sequence[str], sections: Iterable[str]) -> set[str]:
    """Write `key=value` overrides into the raw config (dotted keys reach into `sections` and component_args).

    Returns the top-level keys they touched, so errors can say "command-line override" for those.
    """
    sections = tuple(sections)
    touched = set()
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) > 1 and parts[0] not in (*sections, "component_args", "component_overrides"):
            raise FlexfeedError(f"override {text!r}: {parts[0]!r} is not a section",
                                f"dotted keys are for {', '.join(sections)} and component_args")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FlexfeedError(f"override {text!r}: {'.'.join(parts[:i + 1])!r} is not a section",
                                    "dotted keys are for sections (grads.proj_dim=512, component_args.x=1)")
            node = child
        node[parts[-1]] = value
        touched.add(parts[0])
    return touched
