"""The argument groups of a run: flexfeed's own (FlexArgs, RefreshArgs), the tables of groups, RunConfig.

Groups are plain keyword-only dataclasses, one per concern, each refusing a bad value of its own fields in
`__post_init__` (ranges declared with `bounded`, choices typed `Literal`). The stage groups (model, data,
store, embed, loss, grads, index, runner; hidden and ngram in their stages' modules) live in stages because
stages take them and may not import pipeline. The key tables are built from the dataclasses at call time, so a
field added to a group is a config key at once.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stages.args import DataArgs, EmbedArgs, GradsArgs, IndexArgs, LossArgs, ModelArgs, RunnerArgs, StoreArgs
from stages.hidden import HiddenArgs
from stages.ngram import NgramArgs
from stages.templates import template_special_tokens
from stages.values import Range, bounded, check_fields, did_you_mean
from store.errors import FlexfeedError

from .compat import FAMILY_ALIASES, KEY_RENAMES, LLAMAFACTORY_KEYS, SPECIAL_KEYS, TRAIN_TYPE_ALIASES
from .eval_checks import check_evaluation

MAX_STEPS = 10**9
"""Largest step count accepted anywhere (a bigger one is a typo, not a plan)."""
TrainType = Literal["static", "select", "mix", "reorder", "weight", "plan"]
"""What the online trainer does: train plainly, select, mix, reorder or weight the data, or a composed `plan`."""
TRAIN_TYPES: tuple[str, ...] = typing.get_args(TrainType)
Family = Literal["select", "mix", "reorder", "weight"]
FAMILIES: tuple[str, ...] = typing.get_args(Family)
"""The strategy families, in the data plan's order (weight stages are loss-space and may sit anywhere)."""


def normalise_train_type(value, where: str) -> str:
    """flexfeed's train_type for any accepted spelling (DataFlex's `dynamic_*` ones included)."""
    if not isinstance(value, str):
        raise FlexfeedError(f"{where} must be a string, got {value!r}", f"choose one of: {', '.join(TRAIN_TYPES)}")
    value = TRAIN_TYPE_ALIASES.get(value, value)
    if value not in TRAIN_TYPES:
        raise FlexfeedError(f"{where}: unknown train_type {value!r}",
                            did_you_mean(value, [*TRAIN_TYPES, *TRAIN_TYPE_ALIASES]))
    return value


@dataclass(kw_only=True)
class PlanStageArgs:
    """One stage of a composed data plan (an item of `plan:`)."""

    family: Family
    """`select`, `mix`, `reorder` or `weight` (DataFlex's selector, mixer, reorder, weighter accepted)."""
    component: str
    """A registered component of that family, or `package.module:Class`."""
    component_args: dict = field(default_factory=dict)
    """The component's parameters (DataFlex's `params` accepted), checked against its Params at load."""
    mode: Literal["draw", "filter"] = "draw"
    """select only: `draw` takes the window's budget; `filter` keeps `keep_ratio` of the pool for later stages."""
    keep_ratio: float = bounded(0.5, low=0, low_open=True, high=1)
    """select in mode filter: the share of the pool kept when the stage fires."""
    warmup_step: int | None = bounded(None, low=0, high=MAX_STEPS)
    """No decision (and, for weight, no weights) before this step; default the run's warmup_step."""
    every: int | None = bounded(None, low=1, high=MAX_STEPS)
    """Steps between two firings of this stage (at decision windows); default the run's update_step (with select_fraction: once)."""
    select_fraction: float | None = bounded(None, low=0, low_open=True, high=1)
    """select in mode draw: select this share of the pool once and train on it in passes (the run's select_fraction)."""
    allow_repeats: bool | None = None
    """select in mode draw: whether a decision may retake rows served earlier in the pass (the run's allow_repeats)."""
    enabled: bool = True
    """false leaves the stage out of the plan."""

    def __post_init__(self):
        self.family = FAMILY_ALIASES.get(self.family, self.family)
        check_fields(self)
        if self.family != "select" and self.mode != "draw":
            raise FlexfeedError(f"mode {self.mode!r} is for select stages, not {self.family}",
                                "drop mode from this stage")
        check_selection_keys(self.select_fraction, self.allow_repeats,
                             "this stage" if self.family == "select" and self.mode == "draw" else None,
                             f"a {self.family} stage" if self.family != "select" else "a select stage in mode filter",
                             "keep_ratio says how much a filter keeps" if self.family == "select" else "drop it")


def check_selection_keys(select_fraction, allow_repeats, draw: str | None, other: str, fix: str) -> None:
    """Refuse select_fraction / allow_repeats where no select draws (`draw` None), or both at once."""
    given = [k for k, v in (("select_fraction", select_fraction), ("allow_repeats", allow_repeats)) if v is not None]
    if given and draw is None:
        raise FlexfeedError(f"{given[0]} is read by a select stage in mode draw, not by {other}", fix)
    if len(given) == 2:
        raise FlexfeedError(f"{draw}: select_fraction and allow_repeats are both set",
                            "select_fraction serves each selected row once per pass; drop allow_repeats")


def parse_plan(items, where: str) -> list[PlanStageArgs]:
    """`plan:` items -> stage args, refusing unknown keys with a hint naming the stage."""
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise FlexfeedError(f"{where} must be a list of stages (mappings)",
                            "e.g. plan: [{family: select, component: loss, mode: filter, keep_ratio: 0.5}, ...]")
    names = {f.name for f in dataclasses.fields(PlanStageArgs)}
    out = []
    for i, item in enumerate(items):
        item = dict(item)
        if "params" in item and "component_args" not in item:
            item["component_args"] = item.pop("params")
        unknown = [k for k in item if k not in names]
        if unknown:
            raise FlexfeedError(f"{where}[{i}]: unknown stage key {unknown[0]!r}", did_you_mean(str(unknown[0]), names))
        for key in ("family", "component"):
            if key not in item:
                raise FlexfeedError(f"{where}[{i}] has no {key!r}", "give every stage a family and a component")
        out.append(PlanStageArgs(**item))
    return out


@dataclass(kw_only=True)
class FlexArgs:
    """What the online trainer decides (select, mix or weight), with which component, and when."""

    train_type: TrainType = "static"
    """`static` (plain training), `select`, `mix` or `weight`; DataFlex's `dynamic_*` spellings are accepted."""
    component: str | None = None
    """Registered component name (e.g. `less`, `doremi`, `loss`) or `package.module:Class`; needed unless static."""
    component_args: dict = field(default_factory=dict)
    """The component's parameters, checked against its Params at load (unknown ones are errors)."""
    component_seed: int | None = None
    """Seed of the component's decisions; default the training `seed`."""
    warmup_step: int = bounded(0, low=0, high=MAX_STEPS)
    """Steps trained before the first decision (on uniformly drawn rows / the initial mixture)."""
    update_step: int = bounded(100, low=1, high=MAX_STEPS)
    """Steps between two decisions."""
    update_times: int | None = bounded(None, low=1, high=MAX_STEPS)
    """Number of decisions; None (or DataFlex's -1) decides until the end of training."""
    static_mix: bool = False
    """`mix` only: keep the initial proportions fixed (DataFlex's static mixing; implies component `static`)."""
    mixture_sample_rule: Literal["mixture", "stratified", "uniform"] = "mixture"
    """Initial mixture: `mixture` (init_mixture_proportions), `stratified` (by dataset size) or `uniform`."""
    init_mixture_proportions: list[float] | None = None
    """One weight per dataset, in `dataset` order, for the mixture rule; normalised to sum to 1."""
    mixer_eval_dataset: list[str] = field(default_factory=list)
    """Datasets a mixer measures the model on, never trained on (comma-separated string accepted), each named `<dataset>_eval` after the training dataset it measures (`dynamic_moe`'s expert loads); a training dataset without one has rows held out by the mixer."""
    select_fraction: float | None = bounded(None, low=0, low_open=True, high=1)
    """`select` only: select this share of the train rows (rounded, at least one) at the first decision and train on them for the rest of the run, each row once per pass, reshuffled per pass (LESS: a top fraction selected once); None selects each window's rows at each decision."""
    allow_repeats: bool | None = None
    """`select` only, per-window selection: true lets each decision choose among every row (fixed scores then retake the same top rows every window); false takes the best rows not yet served in the current pass over the train set (DataFlex's consume_once); default the selector's own (false for less, near, nice, icons, coincide and dsir; true for the others)."""
    plot_loss: bool = False
    """Write training_loss.png (and training_eval_loss.png when the run evaluates) into output_dir at the end, as LLaMA-Factory does."""
    plan: list = field(default_factory=list)
    """train_type plan: the stages, each {family, component, component_args, mode, keep_ratio, warmup_step, every, enabled}."""

    def __post_init__(self):
        self.train_type = normalise_train_type(self.train_type, "train_type")
        if self.plan and not all(isinstance(s, PlanStageArgs) for s in self.plan):
            self.plan = parse_plan(self.plan, "plan")
        if self.train_type == "plan":
            if not any(s.enabled for s in self.plan):
                raise FlexfeedError("train_type plan needs at least one enabled stage under plan:",
                                    "e.g. plan: [{family: select, component: loss, mode: filter, keep_ratio: 0.5}, "
                                    "{family: mix, component: odm}]")
        elif self.plan:
            raise FlexfeedError(f"plan: is read with train_type plan, not {self.train_type!r}",
                                "set train_type: plan (DataFlex: dynamic_lego), or drop plan:")
        elif self.train_type != "static" and not self.component:
            raise FlexfeedError(f"train_type {self.train_type!r} needs a component",
                                f"set component (or DataFlex's component_name), e.g. {_EXAMPLES[self.train_type]}")
        if self.update_times == -1:
            self.update_times = None
        check_fields(self)
        check_selection_keys(self.select_fraction, self.allow_repeats,
                             "train_type select" if self.train_type == "select" else None,
                             f"train_type {self.train_type}",
                             "in a plan, set them on the select stage" if self.train_type == "plan" else "drop it")
        props = self.init_mixture_proportions
        if props is not None and (not props or any(p < 0 for p in props) or sum(props) <= 0):
            raise FlexfeedError(f"init_mixture_proportions must be non-negative with a positive sum, got {props}",
                                "give one weight per dataset, e.g. [0.7, 0.3]")
        if props is not None:
            self.init_mixture_proportions = [p / sum(props) for p in props]


_EXAMPLES = {"select": "component: less", "mix": "component: doremi", "reorder": "component: saw",
             "weight": "component: loss"}


@dataclass(kw_only=True)
class RefreshArgs:
    """Which signals are recomputed as the model changes (section `refresh:`)."""

    enabled: bool = True
    """Recompute stale shards of the signals the component reads before each decision."""
    max_staleness: int | None = bounded(None, low=0, high=MAX_STEPS)
    """A shard computed more than this many steps ago is stale; None never refreshes."""
    signals: list[str] | None = None
    """Signal names to refresh; None means those the component declares as refreshable."""
    store: str | None = None
    """A writable store root for the run's refreshed copies (one store per dataset fingerprint under it), when `store` is shared or read-only: offline signals are still read from `store`, nothing is written there."""

    def __post_init__(self):
        check_fields(self)


@dataclass(kw_only=True)
class EvalArgs:
    """Early stopping on the evaluation set (LLaMA-Factory's early_stopping_steps, DataFlex's min delta)."""

    early_stopping_steps: int | None = bounded(None, low=1, high=MAX_STEPS)
    """Stop after this many evaluations in a row that do not improve metric_for_best_model (default eval_loss): transformers' EarlyStoppingCallback patience; needs eval_strategy steps or epoch."""
    early_stopping_min_delta: float | None = bounded(None, low=0, high=10**9)
    """An evaluation improves only when it beats the best by more than this (the callback's threshold); default 0; needs early_stopping_steps."""

    def __post_init__(self):
        check_fields(self)
        if self.early_stopping_min_delta is not None and self.early_stopping_steps is None:
            raise FlexfeedError("early_stopping_min_delta is read with early_stopping_steps",
                                "set early_stopping_steps (the patience, in evaluations), or drop the min delta")


FLAT_GROUPS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "store": StoreArgs, "flex": FlexArgs,
                                "evaluation": EvalArgs}
"""Groups whose fields are written as top-level keys, in lookup order (TrainingArguments come last)."""
SECTION_GROUPS: dict[str, type] = {"embed": EmbedArgs, "loss": LossArgs, "grads": GradsArgs, "index": IndexArgs,
                                   "runner": RunnerArgs, "refresh": RefreshArgs, "hidden": HiddenArgs,
                                   "ngram": NgramArgs}
"""Groups written as a nested mapping under their name."""

TRAINING_RANGES: dict[str, Range] = {
    "learning_rate": Range(low=0, low_open=True, high=10),
    "per_device_train_batch_size": Range(low=1, high=10**6),
    "per_device_eval_batch_size": Range(low=1, high=10**6),
    "gradient_accumulation_steps": Range(low=1, high=10**6),
    "num_train_epochs": Range(low=0, high=10**6),
    "max_steps": Range(low=1, high=MAX_STEPS, allow=(-1,)),
    "seed": Range(low=0, high=2**32 - 1),
    "weight_decay": Range(low=0, high=10),
    "max_grad_norm": Range(low=0),
}
"""Sane ranges of transformers.TrainingArguments fields (flexfeed does not own that class, so they are
listed here by field name); any other `*_steps` field must be >= 0 and <= MAX_STEPS."""


def check_training(training: dict) -> None:
    """Refuse a TrainingArguments value outside its sane range (a FieldError naming the key)."""
    for key, value in training.items():
        limits = TRAINING_RANGES.get(key) or (Range(low=0, high=MAX_STEPS) if key.endswith("_steps") else None)
        if limits is not None:
            limits.check(value, key)


@dataclass(kw_only=True)
class RunConfig:
    """A validated run: the argument groups plus where the config came from."""

    model: ModelArgs
    """Model and fine-tuning method."""
    data: DataArgs
    """Datasets (each one a domain) and tokenization."""
    store: StoreArgs
    """The signal store."""
    runner: RunnerArgs
    """Where offline stages run (Dask)."""
    embed: EmbedArgs
    """Embedding stage."""
    loss: LossArgs
    """Per-sample loss stage (e.g. DoReMi's reference losses)."""
    grads: GradsArgs
    """Gradient-feature stage (LESS)."""
    index: IndexArgs
    """FAISS index stage."""
    training: dict
    """Validated keyword arguments of transformers.TrainingArguments (deepspeed path resolved)."""
    flex: FlexArgs
    """What the online trainer decides, and when."""
    refresh: RefreshArgs
    """Which signals are recomputed as the model changes."""
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    """Early stopping on the evaluation set (what is evaluated is the data group's; when, the training keys')."""
    hidden: HiddenArgs = field(default_factory=HiddenArgs)
    """Hidden-layer feature stage (coincide)."""
    ngram: NgramArgs = field(default_factory=NgramArgs)
    """Hashed n-gram count stage (dsir)."""
    path: Path | None = None
    """The config file (None for a config built in code)."""
    warnings: list[str] = field(default_factory=list)
    """Keys accepted but ignored, with why (each also logged once)."""

    def __post_init__(self):
        # the tokenizer of the data and the model of every stage and of training must agree on the
        # template's special tokens, and the model's identity must name them: ModelArgs carries them
        extra = [t for t in template_special_tokens(self.data.template) if t not in self.model.new_special_tokens]
        if extra:
            self.model.new_special_tokens = [*self.model.new_special_tokens, *extra]
        check_evaluation(self)  # evaluation spans data, training keys and early stopping: refused here, at load


def training_fields() -> dict[str, dataclasses.Field]:
    """transformers.TrainingArguments' init fields: the accepted training keys."""
    from transformers import TrainingArguments  # deferred: transformers is heavy and a config may not train

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def training_hints() -> dict:
    """transformers.TrainingArguments' resolved field annotations (empty when they cannot be resolved)."""
    from transformers import TrainingArguments  # deferred: transformers is heavy and a config may not train

    try:
        return typing.get_type_hints(TrainingArguments)
    except Exception:  # noqa: BLE001 - an unresolvable hint only loses the type check
        return {}


def flat_keys() -> dict[str, str]:
    """Top-level key -> group name, built from the dataclasses at call time."""
    table: dict[str, str] = {}
    for group, cls in FLAT_GROUPS.items():
        for f in dataclasses.fields(cls):
            table.setdefault(f.name, group)
    for name in training_fields():
        table.setdefault(name, "training")
    return table


def accepted_keys() -> list[str]:
    """Every key a config may use, dotted for sections (for did-you-mean hints and the docs)."""
    keys = set(flat_keys()) | set(SECTION_GROUPS) | set(SPECIAL_KEYS) | set(LLAMAFACTORY_KEYS)
    keys |= set(KEY_RENAMES)
    for section, cls in SECTION_GROUPS.items():
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    return sorted(keys)
