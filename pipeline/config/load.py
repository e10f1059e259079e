"""Loading a run config: one function, `load_config`, from YAML and overrides to a validated RunConfig.

As LLaMA-Factory's get_train_args: read the flat YAML, apply `key=value` overrides, route each key to its
group (model, data, store, flexfeed's own, then Hugging Face TrainingArguments; `embed:`, `loss:`,
`grads:`, `index:`, `runner:` and `refresh:` are nested sections), translate LLaMA-Factory and DataFlex
keys (pipeline.config.compat), build the groups (each checks its own fields), then check what spans
groups. docs/config.md is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from collections.abc import Sequence
from pathlib import Path

from stages.args import DataArgs, ModelArgs
from stages.values import FieldError, check_range, coerce, did_you_mean
from store.errors import FlexfeedError

from ..strategies.registry import build_params, registry_for
from .compat import KEY_RENAMES, LLAMAFACTORY_KEYS, SPECIAL_KEYS, read_components_file
from .dataflex_plans import translate_entry, translate_pipeline
from .groups import (
    FLAT_GROUPS,
    MAX_STEPS,
    SECTION_GROUPS,
    FlexArgs,
    RunConfig,
    accepted_keys,
    check_training,
    flat_keys,
    normalise_train_type,
    training_fields,
    training_hints,
)
from .read import apply_overrides, find_file, read_mapping

log = logging.getLogger("flexfeed.config")


def load_config(path, overrides: Sequence[str] = (), *, training: bool = True,
                validate_component: bool = True) -> RunConfig:
    """Read, translate and validate a run config; `overrides` are `key=value` strings (dotted for sections).

    `training=False` drops the output_dir requirement (offline stages); `validate_component=False` skips
    building the component's parameters (for a component that is not installed here).
    """
    path = Path(path)
    raw = read_mapping(path)
    load = _Load(path, raw, apply_overrides(raw, overrides, SECTION_GROUPS), validate_component)
    load.route()  # each key to its group; LLaMA-Factory and DataFlex spellings translated
    load.static_mix()  # before the components file: DataFlex's static mixing ignores that entry
    load.components_file()
    load.train_step()
    load.dataflex_steps()
    groups = {name: load.group(name, cls) for name, cls in {**FLAT_GROUPS, **SECTION_GROUPS}.items()}
    training_kwargs = load.training()
    load.required(groups["model"], groups["data"], training_kwargs, need_output_dir=training)
    if validate_component and groups["flex"].train_type == "plan":
        load.plan_params(groups["flex"])
    elif validate_component and groups["flex"].train_type != "static":
        groups["flex"].component_args = load.component_params(groups["flex"])
    for text in load.warnings:
        log.warning(text)
    cfg = RunConfig(**groups, training=training_kwargs, path=path, warnings=load.warnings)
    if validate_component:
        check_components(cfg)
    return cfg


def check_components(cfg: RunConfig) -> None:
    """Each configured component's own refusals of the whole config (Strategy.check_config), naming the file."""
    flex = cfg.flex
    if flex.train_type == "static":
        return
    named = ([(s.family, s.component) for s in flex.plan if s.enabled] if flex.train_type == "plan"
             else [(flex.train_type, flex.component)])
    for family, component in named:
        try:
            registry_for(family).resolve(component).check_config(cfg)
        except FlexfeedError as exc:
            raise FlexfeedError(f"{cfg.path}: {exc.message}" if cfg.path else exc.message, exc.hint) from None


class _Load:
    """The state of one load_config call: values gathered per group, warnings, where each key came from."""

    def __init__(self, path: Path, raw: dict, from_cli: set[str], validate_component: bool):
        self.path, self.raw, self.from_cli = path, raw, from_cli
        self.validate_component = validate_component
        self.values: dict[str, dict] = {g: {} for g in [*FLAT_GROUPS, *SECTION_GROUPS, "training"]}
        self.warnings: list[str] = []

    def where(self, key: str) -> str:
        """Where a key was written: the config file or a command-line override, and the key."""
        origin = "command-line override" if key.split(".")[0] in self.from_cli else str(self.path)
        return f"{origin}, key {key!r}"

    def fail(self, message: str, hint: str | None = None):
        """Refuse the config with a message naming its file."""
        raise FlexfeedError(f"{self.path}: {message}", hint)

    def route(self) -> None:
        """Gather each key under its group; a key no group, table or section knows is an error."""
        flat = flat_keys()
        section_fields = {f.name: s for s, cls in SECTION_GROUPS.items() for f in dataclasses.fields(cls)}
        for key, value in self.raw.items():
            if not isinstance(key, str):
                self.fail(f"key {key!r} is not a string", "keys are names like learning_rate")
            target = KEY_RENAMES.get(key, key)
            if target != key and target in self.raw and key != "component_overrides":
                self.fail(f"both {key!r} and {target!r} are set", f"keep one ({key!r} is DataFlex's name)")
            if key == "component_overrides":
                self.merge_args(value, self.where(key))
            elif key in SECTION_GROUPS:
                self.section(key, value)
            elif target == "component_args":
                self.merge_args(value, self.where(key))
            elif target in flat:
                self.values[flat[target]][target] = value
            elif key in SPECIAL_KEYS:
                continue
            elif key in LLAMAFACTORY_KEYS:
                self.compat(key, value)
            elif key in section_fields:
                section = section_fields[key]
                raise FlexfeedError(f"{self.where(key)}: {key!r} belongs to the {section}: section",
                                    f"write it under `{section}:` (or override {section}.{key}=...)")
            else:
                raise FlexfeedError(f"{self.where(key)}: unknown key", did_you_mean(key, accepted_keys()))

    def section(self, name: str, value) -> None:
        """Gather a nested section (`grads:` ...); its keys must be fields of its group."""
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

    def merge_args(self, value, where: str) -> None:
        """Add a mapping to component_args (later keys win)."""
        if value is None:
            return
        if not isinstance(value, dict):
            raise FlexfeedError(f"{where} must be a mapping, got {value!r}", "write key: value lines under it")
        self.values["flex"].setdefault("component_args", {}).update(value)

    def compat(self, key: str, value) -> None:
        """A LLaMA-Factory key: translated to its target, or ignored with a warning saying why."""
        rule = LLAMAFACTORY_KEYS[key]
        if rule.refuse and value not in (None, False, 0, ""):
            raise FlexfeedError(f"{self.where(key)}: {key}={value!r} is not supported: {rule.reason}",
                                f"remove {key} (or set it to false) to train as flexfeed does")
        if rule.target is None:
            if rule.refuse:
                return  # the feature is off: nothing to say
            if value not in (None, False):
                self.warnings.append(f"{self.where(key)} ignored: {rule.reason}")
            return
        group, _, name = rule.target.partition(".")
        converted = rule.translate(value, self.where(key))
        if name in self.values[group] and self.values[group][name] != converted:
            self.fail(f"{key!r} and {name!r} are both set", f"keep one: {key} is {rule.reason}")
        self.values[group][name] = converted

    # DataFlex: its components file, train_step and static mixing
    def train_type(self) -> str:
        """The train_type gathered so far, in flexfeed's spelling."""
        value = self.values["flex"].get("train_type", "static")
        return normalise_train_type(value, self.where("train_type"))

    def components_file(self) -> None:
        """Fill component_args (and other keys) from DataFlex's components file; the config's keys win.

        A pipeline (train_type plan, `component_name` naming a `pipelines:` entry) becomes the `plan:` stages.
        """
        value = self.raw.get("components_cfg_file")
        train_type = self.train_type()
        flex = self.values["flex"]
        if value is None or train_type == "static":
            return
        component = flex.get("component")
        if train_type == "mix" and flex.get("static_mix") is True:
            component = component or "static"
        if not isinstance(value, str) or not isinstance(component, str):
            return  # a wrong type or a missing component is reported when the groups are built
        file = find_file(value, self.path, self.where("components_cfg_file"))
        components = read_components_file(file)
        output_dir = self.values["training"].get("output_dir")
        if train_type == "plan":
            self.pipeline(components, file, component, output_dir)
            return
        key = "component_name" if "component_name" in self.raw else "component"
        t = translate_entry(components, train_type, component, file, output_dir, self._param_names, self.where(key))
        self.warnings += t.warnings
        flex["component"] = t.component  # a reorder preset names its pattern's component
        flex["component_args"] = {**t.args, **flex.get("component_args", {})}
        self._set_defaults(t.elsewhere)
        if t.stage.get("every", 1) != 1:  # reorder_every: a one-stage plan whose stage fires every k decisions
            flex["plan"] = [{"family": train_type, "component": flex.pop("component"),
                             "component_args": flex.pop("component_args"), "every": t.stage["every"] * self.update_step()}]
            flex["train_type"] = "plan"

    def pipeline(self, components: dict, file: Path, name: str, output_dir: str | None) -> None:
        """DataFlex's `dynamic_lego`: the pipeline `name` of the components file as the `plan:` stages."""
        flex = self.values["flex"]
        key = "component_name" if "component_name" in self.raw else "component"
        if flex.get("plan"):
            self.fail(f"both plan: and a pipeline ({key}: {name}) are set", f"keep one: drop plan: or {key}")
        if flex.get("component_args"):
            self.fail(f"component_args / component_overrides set with the pipeline {name!r}",
                      "change the stage's preset in the components file, or write the plan: stages yourself")
        plan, t = translate_pipeline(components, name, file, output_dir, self._param_names, self.update_step())
        del flex["component"]  # it named the pipeline
        flex["plan"] = plan
        self.warnings += t.warnings
        self._set_defaults(t.elsewhere)

    def _set_defaults(self, values: dict) -> None:
        """`group.key` values from the components file, where the run config has not set the key itself."""
        for target, item in values.items():
            group, _, name = target.partition(".")
            self.values[group].setdefault(name, item)

    def update_step(self) -> int:
        """The run's update_step as gathered so far (its default when unset)."""
        value = self.values["flex"].get("update_step", FlexArgs.__dataclass_fields__["update_step"].default)
        return coerce(value, int, self.where("update_step"))

    def _param_names(self, family: str, component: str, where: str) -> set[str] | None:
        """The component's parameter names; None when it is not installed here and components are not validated."""
        try:
            cls = registry_for(family).resolve(component)
        except FlexfeedError as exc:
            if not self.validate_component:
                return None  # not installed here: parameters pass through unchecked
            raise FlexfeedError(f"{where}: {exc.message}", exc.hint) from None
        return {f.name for f in dataclasses.fields(cls.Params)}

    def _component_class(self, train_type: str, component: str) -> type:
        try:
            return registry_for(train_type).resolve(component)
        except FlexfeedError as exc:
            key = "component_name" if "component_name" in self.raw else "component"
            raise FlexfeedError(f"{self.where(key)}: {exc.message}", exc.hint) from None

    def train_step(self) -> None:
        """DataFlex's train_step is max_steps (0 means unset); the two must agree."""
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

    def dataflex_steps(self) -> None:
        """DataFlex's step count for its dynamic train types when neither max_steps nor train_step is set.

        Under DataFlex, `dynamic_select` trains num_train_epochs x (warmup_step + update_step x update_times)
        steps and `dynamic_mix` (not static) warmup_step + update_step x update_times, whatever the data's
        size; flexfeed's own spellings (`select`, `mix`) train num_train_epochs passes over the data. The
        DataFlex spelling keeps DataFlex's count, with one line saying so.
        """
        spelled = self.raw.get("train_type")
        if spelled not in ("dynamic_select", "dynamic_mix") or self.values["training"].get("max_steps") not in (
                None, -1):
            return
        flex = self.values["flex"]
        times = flex.get("update_times")
        times = None if times is None else coerce(times, int, self.where("update_times"))
        if times is None or times < 1:
            return  # no fixed number of updates: DataFlex trains the data's epochs too
        if spelled == "dynamic_mix" and flex.get("static_mix") is True:
            return
        warmup = coerce(flex.get("warmup_step", 0), int, self.where("warmup_step"))
        every = self.update_step()
        cycle = warmup + every * times
        if spelled == "dynamic_select":
            epochs = coerce(self.values["training"].get("num_train_epochs", 3.0), float,
                            self.where("num_train_epochs"))
            steps = max(1, math.ceil(epochs * cycle))
            how = f"ceil({epochs:g} epochs x ({warmup} + {every} x {times}))"
        else:
            steps = max(1, cycle)
            how = f"{warmup} + {every} x {times}"
        self.values["training"]["max_steps"] = steps
        log.warning("%s: train_type %s without max_steps: training %d steps as DataFlex does "
                    "(warmup_step + update_step x update_times%s: %s); set max_steps to train another count",
                    self.path, spelled, steps, " per epoch" if spelled == "dynamic_select" else "", how)

    def static_mix(self) -> None:
        """DataFlex's fixed mixing: component `static`, proportions from the sample rule."""
        flex = self.values["flex"]
        if self.train_type() != "mix" or flex.get("static_mix") is not True:
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

    # building the groups
    def group(self, group: str, cls: type):
        """The group built from its gathered values; a refused field names the file (or override) and key."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in self.values[group].items():
            label = key if group in FLAT_GROUPS else f"{group}.{key}"
            if group == "flex" and key == "train_type":  # DataFlex's spellings first, then the Literal's check
                value = normalise_train_type(value, self.where(label))
            kwargs[key] = coerce(value, hints[key], self.where(label))
        try:
            return cls(**kwargs)
        except FieldError as exc:  # the group refused one of its fields: name the file (or override) and key
            raise exc.at(self.where(exc.field if group in FLAT_GROUPS else f"{group}.{exc.field}")) from None
        except FlexfeedError as exc:
            raise FlexfeedError(f"{self.path}: {exc.message}", exc.hint) from None
        except (TypeError, ValueError) as exc:
            self.fail(f"bad {group} settings: {exc}", "see docs/config.md")

    def training(self) -> dict:
        """The TrainingArguments keywords, type- and range-checked, the deepspeed path resolved."""
        fields = training_fields()
        hints = training_hints()
        out = {}
        for key, value in self.values["training"].items():
            if key == "resume_from_checkpoint" and isinstance(value, bool):
                out[key] = value or None  # true: the last checkpoint in output_dir (resolved when training)
                continue
            out[key] = coerce(value, hints.get(key, fields[key].type), self.where(key))
        try:
            check_training(out)
        except FieldError as exc:
            raise exc.at(self.where(exc.field)) from None
        ds = out.get("deepspeed")
        if isinstance(ds, str):
            file = find_file(ds, self.path, self.where("deepspeed"))
            try:
                json.loads(file.read_text())
            except ValueError as exc:
                self.fail(f"deepspeed config {str(file)!r} is not valid JSON: {exc}", "fix the JSON file")
            out["deepspeed"] = str(file)
        return out

    def required(self, model: ModelArgs, data: DataArgs, training: dict, *, need_output_dir: bool) -> None:
        """Refuse a config without model_name_or_path, dataset or (when training) output_dir."""
        missing = [k for k, ok in (("model_name_or_path", model.model_name_or_path), ("dataset", data.dataset)) if not ok]
        if need_output_dir and not training.get("output_dir"):
            missing.append("output_dir")
        if missing:
            self.fail(f"missing required key {missing[0]!r}", f"add `{missing[0]}: ...` to the config")

    def plan_params(self, flex: FlexArgs) -> None:
        """Every plan stage's component and parameters, checked by building its Params."""
        for i, stage in enumerate(flex.plan):
            try:
                cls = registry_for(stage.family).resolve(stage.component)
                build_params(cls.Params, stage.component_args, f"{stage.family} component {stage.component!r}")
            except FlexfeedError as exc:
                raise FlexfeedError(f"{self.where('plan')}[{i}]: {exc.message}", exc.hint) from None

    def component_params(self, flex: FlexArgs) -> dict:
        """The component's parameters, checked by building its Params (unknown ones are errors)."""
        cls = self._component_class(flex.train_type, flex.component)
        try:
            build_params(cls.Params, flex.component_args, f"{flex.train_type} component {flex.component!r}")
        except FlexfeedError as exc:
            raise FlexfeedError(f"{self.where('component_args')}: {exc.message}", exc.hint) from None
        return dict(flex.component_args)


def to_training_arguments(cfg: RunConfig, **changes):
    """A transformers.TrainingArguments from the config's training keys (plus `changes`)."""
    from transformers import TrainingArguments  # deferred: transformers is heavy and a config may not train

    kwargs = {**cfg.training, **changes}
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:
        where = f"{cfg.path}: " if cfg.path else ""
        raise FlexfeedError(f"{where}TrainingArguments refused the training keys: {exc}",
                            "fix the key named in the message") from None
