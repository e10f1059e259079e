"""The run config: one flat LLaMA-Factory-style YAML, validated into typed argument groups on load.

Flat keys go to the group that has a field of that name (model, data, store, flexfeed's own keys, then
Hugging Face TrainingArguments); `embed:`, `loss:`, `grads:`, `index:`, `runner:` and `refresh:` are
nested sections. DataFlex configs load unchanged (see pipeline.dataflex). docs/config.md is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Sequence
from pathlib import Path

from stages.args import DataArgs, ModelArgs
from stages.values import FieldError
from store.errors import FlexfeedError

from . import dataflex
from .config_compat import LLAMAFACTORY_KEYS
from .config_groups import (
    FLAT_GROUPS,
    MAX_STEPS,
    SECTION_GROUPS,
    SPECIAL_KEYS,
    FlexArgs,
    RefreshArgs,
    RunConfig,
    accepted_keys,
    check_training,
    flat_keys,
    training_fields,
)
from .config_values import check_range, coerce, did_you_mean, parse_override, parse_yaml_text

__all__ = ["FLAT_GROUPS", "SECTION_GROUPS", "FlexArgs", "RefreshArgs", "RunConfig", "accepted_keys", "flat_keys",
           "load_config", "to_training_arguments", "training_fields"]

log = logging.getLogger("flexfeed.config")

def load_config(path, overrides: Sequence[str] = (), *, training: bool = True,
                validate_component: bool = True) -> RunConfig:
    """Read, translate and validate a run config; `overrides` are `key=value` strings (dotted for sections).

    `training=False` drops the output_dir requirement (offline stages); `validate_component=False` skips
    building the component's parameters (for a component that is not installed here).
    """
    path = Path(path)
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
    from_cli = _apply_overrides(raw, overrides)
    return _Builder(path, raw, from_cli, training, validate_component).build()


def _apply_overrides(raw: dict, overrides: Sequence[str]) -> set[str]:
    touched = set()
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) > 1 and parts[0] not in (*SECTION_GROUPS, "component_args", "component_overrides"):
            raise FlexfeedError(f"override {text!r}: {parts[0]!r} is not a section",
                                f"dotted keys are for {', '.join(SECTION_GROUPS)} and component_args")
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


class _Builder:
    """One load: routes keys to groups, applies DataFlex/LLaMA-Factory translations, validates."""

    def __init__(self, path: Path, raw: dict, from_cli: set[str], training: bool, validate_component: bool):
        self.path, self.raw, self.from_cli = path, raw, from_cli
        self.need_training, self.validate_component = training, validate_component
        self.values: dict[str, dict] = {g: {} for g in [*FLAT_GROUPS, *SECTION_GROUPS, "training"]}
        self.warnings: list[str] = []

    def where(self, key: str) -> str:
        origin = "command-line override" if key.split(".")[0] in self.from_cli else str(self.path)
        return f"{origin}, key {key!r}"

    def fail(self, message: str, hint: str | None = None):
        raise FlexfeedError(f"{self.path}: {message}", hint)

    def build(self) -> RunConfig:
        self._route()
        self._static_mix()  # before the components file: DataFlex's static mixing ignores that entry
        self._components_file()
        self._train_step()
        groups = {name: self._make(name, cls) for name, cls in {**FLAT_GROUPS, **SECTION_GROUPS}.items()}
        training = self._training()
        self._required(groups["model"], groups["data"], training)
        if self.validate_component and groups["flex"].train_type != "static":
            groups["flex"].component_args = self._component_params(groups["flex"])
        for text in self.warnings:
            log.warning(text)
        return RunConfig(**groups, training=training, path=self.path, warnings=self.warnings)

    # ---------------------------------------------------------------- routing
    def _route(self) -> None:
        flat = flat_keys()
        section_fields = {f.name: s for s, cls in SECTION_GROUPS.items() for f in dataclasses.fields(cls)}
        for key, value in self.raw.items():
            if not isinstance(key, str):
                self.fail(f"key {key!r} is not a string", "keys are names like learning_rate")
            target = dataflex.KEY_RENAMES.get(key, key)
            if target != key and target in self.raw and key != "component_overrides":
                self.fail(f"both {key!r} and {target!r} are set", f"keep one ({key!r} is DataFlex's name)")
            if key == "component_overrides":
                self._merge_args(value, self.where(key))
            elif key in SECTION_GROUPS:
                self._section(key, value)
            elif target == "component_args":
                self._merge_args(value, self.where(key))
            elif target in flat:
                self.values[flat[target]][target] = value
            elif key in SPECIAL_KEYS:
                continue
            elif key in LLAMAFACTORY_KEYS:
                self._compat(key, value)
            elif key in section_fields:
                section = section_fields[key]
                raise FlexfeedError(f"{self.where(key)}: {key!r} belongs to the {section}: section",
                                    f"write it under `{section}:` (or override {section}.{key}=...)")
            else:
                raise FlexfeedError(f"{self.where(key)}: unknown key", did_you_mean(key, accepted_keys()))

    def _section(self, name: str, value) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise FlexfeedError(f"{self.where(name)} must be a mapping, got {value!r}",
                                f"write `{name}:` then indented key: value lines")
        fields = {f.name for f in dataclasses.fields(SECTION_GROUPS[name])}
        for key, item in value.items():
            if key not in fields:
                raise FlexfeedError(f"{self.where(f'{name}.{key}')}: unknown key",
                                    did_you_mean(str(key), fields))
            self.values[name][key] = item

    def _merge_args(self, value, where: str) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            raise FlexfeedError(f"{where} must be a mapping, got {value!r}", "write key: value lines under it")
        self.values["flex"].setdefault("component_args", {}).update(value)

    def _compat(self, key: str, value) -> None:
        rule = LLAMAFACTORY_KEYS[key]
        if rule.target is None:
            if value not in (None, False):
                self.warnings.append(f"{self.where(key)} ignored: {rule.reason}")
            return
        group, _, name = rule.target.partition(".")
        converted = rule.convert(value, self.where(key)) if rule.convert else value
        if name in self.values[group] and self.values[group][name] != converted:
            self.fail(f"{key!r} and {name!r} are both set", f"keep one: {key} is {rule.reason}")
        self.values[group][name] = converted

    # ---------------------------------------------------------------- DataFlex
    def _train_type(self) -> str:
        value = self.values["flex"].get("train_type", "static")
        return dataflex.normalise_train_type(value, self.where("train_type"))

    def _components_file(self) -> None:
        value = self.raw.get("components_cfg_file")
        train_type = self._train_type()
        if value is None or train_type == "static":
            return
        component = self.values["flex"].get("component")
        if train_type == "mix" and self.values["flex"].get("static_mix") is True:
            component = component or "static"
        if not isinstance(value, str) or not isinstance(component, str):
            return  # a wrong type or a missing component is reported when the groups are built
        file = dataflex.find_file(value, self.path, self.where("components_cfg_file"))
        params = dataflex.component_entry(dataflex.read_components_file(file), train_type, component, file,
                                          self.values["training"].get("output_dir"))
        known = self._param_names(train_type, component)
        args, elsewhere, warnings = dataflex.translate_params(
            train_type, component, params, known, f"{file}, {dataflex.SECTIONS[train_type]}.{component}")
        self.warnings += warnings
        explicit = self.values["flex"].get("component_args", {})
        self.values["flex"]["component_args"] = {**args, **explicit}
        for target, item in elsewhere.items():  # the run config's own keys win over the components file
            group, _, name = target.partition(".")
            self.values[group].setdefault(name, item)

    def _param_names(self, train_type: str, component: str) -> set[str] | None:
        from .strategies.registry import registry_for

        try:
            cls = registry_for(train_type).resolve(component)
        except FlexfeedError as exc:
            if self.validate_component:
                raise FlexfeedError(f"{self.where('component_name' if 'component_name' in self.raw else 'component')}: {exc.message}", exc.hint) from None
            return None
        return {f.name for f in dataclasses.fields(cls.Params)}

    def _train_step(self) -> None:
        value = self.raw.get("train_step")
        if value is None or value == 0:  # DataFlex's 0 means "not set"
            return
        value = coerce(value, int, self.where("train_step"))
        check_range(value, self.where("train_step"), low=1, high=MAX_STEPS)
        current = self.values["training"].get("max_steps")
        if current not in (None, -1, value):
            self.fail(f"train_step ({value}) and max_steps ({current}) disagree",
                      "keep one: train_step is DataFlex's name for max_steps")
        self.values["training"]["max_steps"] = value

    def _static_mix(self) -> None:
        """DataFlex's fixed mixing: component `static`, proportions from the sample rule."""
        flex = self.values["flex"]
        if self._train_type() != "mix" or flex.get("static_mix") is not True:
            return
        component = flex.setdefault("component", "static")
        if component != "static":
            self.fail(f"static_mix: true keeps the proportions fixed, so component {component!r} would never run",
                      "drop static_mix, or set component: static")
        args = flex.setdefault("component_args", {})
        if "proportions" not in args:
            rule = flex.get("mixture_sample_rule", "mixture")
            props = flex.get("init_mixture_proportions")
            args["proportions"] = props if rule == "mixture" and props is not None else (
                "uniform" if rule == "mixture" else rule)

    # ---------------------------------------------------------------- groups
    def _make(self, group: str, cls: type):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in self.values[group].items():
            label = key if group in FLAT_GROUPS else f"{group}.{key}"
            if group == "flex" and key == "train_type":  # DataFlex's spellings first, then the Literal's check
                value = dataflex.normalise_train_type(value, self.where(label))
            kwargs[key] = coerce(value, hints[key], self.where(label))
        try:
            return cls(**kwargs)
        except FieldError as exc:  # the group refused one of its fields: name the file (or override) and key
            raise exc.at(self.where(exc.field if group in FLAT_GROUPS else f"{group}.{exc.field}")) from None
        except FlexfeedError as exc:
            raise FlexfeedError(f"{self.path}: {exc.message}", exc.hint) from None
        except (TypeError, ValueError) as exc:
            self.fail(f"bad {group} settings: {exc}", "see docs/config.md")

    def _training(self) -> dict:
        fields = training_fields()
        hints = _training_hints()
        out = {}
        for key, value in self.values["training"].items():
            out[key] = coerce(value, hints.get(key, fields[key].type), self.where(key))
        try:
            check_training(out)
        except FieldError as exc:
            raise exc.at(self.where(exc.field)) from None
        ds = out.get("deepspeed")
        if isinstance(ds, str):
            file = dataflex.find_file(ds, self.path, self.where("deepspeed"))
            try:
                json.loads(file.read_text())
            except ValueError as exc:
                self.fail(f"deepspeed config {str(file)!r} is not valid JSON: {exc}", "fix the JSON file")
            out["deepspeed"] = str(file)
        return out

    def _required(self, model: ModelArgs, data: DataArgs, training: dict) -> None:
        missing = [k for k, ok in (("model_name_or_path", model.model_name_or_path), ("dataset", data.dataset)) if not ok]
        if self.need_training and not training.get("output_dir"):
            missing.append("output_dir")
        if missing:
            self.fail(f"missing required key {missing[0]!r}", f"add `{missing[0]}: ...` to the config")

    def _component_params(self, flex: FlexArgs) -> dict:
        from .strategies.registry import build_params, registry_for

        registry = registry_for(flex.train_type)
        try:
            cls = registry.resolve(flex.component)
        except FlexfeedError as exc:
            raise FlexfeedError(f"{self.where('component_name' if 'component_name' in self.raw else 'component')}: {exc.message}", exc.hint) from None
        try:
            build_params(cls.Params, flex.component_args, f"{registry.family} component {flex.component!r}")
        except FlexfeedError as exc:
            raise FlexfeedError(f"{self.where('component_args')}: {exc.message}", exc.hint) from None
        return dict(flex.component_args)


def _training_hints() -> dict:
    from transformers import TrainingArguments

    try:
        return typing.get_type_hints(TrainingArguments)
    except Exception:  # noqa: BLE001 - an unresolvable hint only loses the type check
        return {}


def to_training_arguments(cfg: RunConfig, **changes):
    """A transformers.TrainingArguments from the config's training keys (plus `changes`)."""
    from transformers import TrainingArguments

    kwargs = {**cfg.training, **changes}
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        where = f"{cfg.path}: " if cfg.path else ""
        raise FlexfeedError(f"{where}TrainingArguments refused the training keys: {exc}",
                            "fix the key named in the message") from None
