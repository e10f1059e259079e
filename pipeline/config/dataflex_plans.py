"""DataFlex 1.1's reorder presets and pipelines (`reorders:`, `pipelines:` of a components file) in flexfeed's terms.

A reorder preset picks its ordering by `pattern` (flexfeed's reorder component of that name), takes its
scores from a `score_source` configured by `score_params`, and sets the pattern's own parameters under
`pattern_params`. REORDER_KEYS, SCORE_SOURCES and PATTERN_PARAMS say what each key becomes: a component
parameter, another config key, a factor on the stage's `every`, or accepted with a warning saying why.
Three things depend on more than one key and are settled after the tables, as DataFlex settles them:
its defaults (which depend on `kind`, and PATTERN_DEFAULTS where flexfeed's differ), `ascending: false`
flipping `polarity`, and `live` (a dynamic preset re-scores only when its scores are the model's loss).

A pipeline is a list of stages, each naming a preset of its family's section; it becomes `train_type:
plan` with one `plan:` stage per enabled entry, each preset translated as for a one-component run.
PIPELINE_KEYS and STAGE_KEYS hold DataFlex's keys that are not plan-stage fields. Unknown keys anywhere
are errors with "did you mean".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stages.values import coerce, did_you_mean
from store.errors import FlexfeedError

from ..strategies.reorders.patterns import PATTERNS, POLARITIES, POLARITY_ALIASES
from .compat import _SCORE_BATCH, _STORE, SECTIONS, CompatKey, Translation, section_entry, translate_params
from .groups import FAMILY_ALIASES, PlanStageArgs

ParamsOf = Callable[[str, str, str], "set[str] | None"]
"""(family, component, where) -> the flexfeed component's parameter names (None: not installed here)."""

KINDS = ("static", "dynamic")
_NO_SEED = ("flexfeed has no per-component seed: shuffles, jitter windows and draws are seeded from the run's "
            "training `seed`")


def _choice(name: str, choices) -> Callable:
    def convert(value, where: str):
        if value not in choices:
            raise FlexfeedError(f"{where}: unknown {name} {value!r}", did_you_mean(str(value), choices))
        return value
    return convert


def _polarity(value, where: str) -> str:
    return POLARITY_ALIASES.get(_choice("polarity", (*POLARITIES, *POLARITY_ALIASES))(value, where), value)


def _consume_once(value, where: str) -> None:
    if value is not True:
        raise FlexfeedError(f"{where}: consume_once {value!r} is not supported",
                            "remove it: flexfeed's reorder serves each row once per pass over the pool")


def _positive_int(value, where: str) -> int:
    value = coerce(value, int, where)
    if value < 1:
        raise FlexfeedError(f"{where} must be >= 1, got {value}", "re-score every k >= 1 decisions")
    return value


@dataclass(frozen=True, kw_only=True)
class ScoreSource:
    """One of DataFlex's `score_source` values: flexfeed's `score` and the source's `score_params`."""

    score: str
    """flexfeed's `score` for this source."""
    reason: str
    params: dict[str, CompatKey]
    """The source's `score_params`."""
    defaults: dict = field(default_factory=dict)
    """Component parameters DataFlex implies when the preset leaves them out."""
    required: tuple[str, ...] = ()


SCORE_SOURCES: dict[str, ScoreSource] = {
    "precomputed": ScoreSource(
        score="field", reason="a fixed number per row: the raw rows' `score_field`, or a file `score_path`",
        params={
            "score_field": CompatKey(target="component_args.score_key",
                                     reason="the raw rows' field holding the score (with score_path: the key in "
                                            "the .json/.jsonl file)"),
            "score_path": CompatKey(target="component_args.score_path", sets={"component_args.score": "file"},
                                    file=True, reason="a .npy/.json/.jsonl file, one score per train row: score: file"),
        },
        defaults={"score_key": "score"}),
    "cached_selection": ScoreSource(
        score="file", reason="a selector's cache file ({indices, metric}), read as a score file",
        params={
            "cache_path": CompatKey(target="component_args.score_path", file=True,
                                    reason="the selector's step_*.json cache"),
            "metric_key": CompatKey(target="component_args.score_key", reason="the metric read from the cache"),
            "fill_value": CompatKey(target="component_args.score_fill",
                                    reason="the score of rows the cache does not list"),
        },
        defaults={"score_key": "loss", "score_fill": 0.0}, required=("cache_path",)),
    "model_loss": ScoreSource(
        score="loss", reason="the per-row loss: the live model's when kind is dynamic, else the stored offline one",
        params={
            "batch_size": CompatKey(target="loss.batch_size", reason=_SCORE_BATCH),
            "num_workers": CompatKey(reason="the loss stage batches tokenized rows in process; it has no "
                                            "DataLoader workers"),
            "max_samples": CompatKey(reason="flexfeed scores every row of the pool when the stage fires (one forward "
                                            "pass per row, shared with every loss-reading stage); it has no subsample"),
            "seed": CompatKey(reason="the seed of DataFlex's scoring subsample; flexfeed scores every row"),
        }),
}
"""DataFlex's score sources and their `score_params`."""

PATTERN_PARAMS: dict[str, CompatKey] = {
    "layers": CompatKey(target="component_args.layers", reason="sweeps over the score range (folding, zigzag, "
                                                               "stair, saw)"),
    "folding_layer": CompatKey(target="component_args.layers", reason="the paper code's name for layers"),
    "zigzag_layer": CompatKey(target="component_args.layers", reason="the paper code's name for layers"),
    **{key: CompatKey(target=f"component_args.{key}", reason="same meaning (segment)")
       for key in ("x_pct", "y_pct", "front_is_high", "back_is_high")},
    **{key: CompatKey(target=f"component_args.{key}", reason="same meaning (stair, saw)")
       for key in ("num_sections", "folding_ratio")},
}
"""A reorder preset's `pattern_params`; a key its pattern does not have is an error."""

PATTERN_DEFAULTS: dict[str, dict] = {"folding": {"layers": 5}, "zigzag": {"layers": 5},
                                     "stair": {"folding_ratio": 0.0}, "saw": {"folding_ratio": 0.0}}
"""DataFlex's defaults where flexfeed's differ, so a preset that leaves them out means what it means there."""

KIND_DEFAULTS: dict[str, dict] = {
    "static": {"pattern": "sorting", "polarity": "higher_later", "score_source": "precomputed"},
    "dynamic": {"pattern": "sorting", "polarity": "higher_earlier", "score_source": "model_loss"},
}
"""DataFlex's defaults of a reorder preset, which depend on its kind."""

REORDER_KEYS: dict[str, CompatKey] = {
    "pattern": CompatKey(target="component", convert=_choice("pattern", PATTERNS),
                         reason="the flexfeed reorder of that name"),
    "kind": CompatKey(target="component_args.live", convert=lambda value, where: _choice("kind", KINDS)(
        value, where) == "dynamic", reason="dynamic re-scores the rows not served yet with the live model's loss "
                                          "each time the stage fires (score_source model_loss); precomputed and "
                                          "cached scores do not change, so both kinds give the same order"),
    "polarity": CompatKey(target="component_args.polarity", convert=_polarity,
                          reason="same meaning (higher_is_better, lower_is_better accepted)"),
    "ascending": CompatKey(target="component_args.polarity", reason="false flips the polarity"),
    "window_size": CompatKey(target="component_args.window_size", reason="the jitter (JIT) window, same meaning"),
    "seed": CompatKey(reason=_NO_SEED),
    "apply_at": CompatKey(convert=_choice("apply_at", ("raw", "index")),
                          reason="flexfeed keeps each raw row, in file order, as one train row, so ordering raw "
                                 "rows (raw) and row ids (index) is the same; accepted without effect"),
    "pattern_params": CompatKey(target="component_args", reason="by the pattern parameters table"),
    "score_source": CompatKey(target="component_args.score",
                              convert=lambda value, where: SCORE_SOURCES[_choice(
                                  "score_source", SCORE_SOURCES)(value, where)].score,
                              reason="by the score sources table"),
    "score_params": CompatKey(target="component_args", reason="by the score sources table"),
    "reorder_every": CompatKey(target="stage.every", convert=_positive_int,
                               reason="re-score every k decisions: the stage fires every k x its `every` steps "
                                      "(`update_step` by default)"),
    "consume_once": CompatKey(convert=_consume_once,
                              reason="flexfeed's reorder serves each row once per pass over the pool (true); false, "
                                     "which serves the head of each re-sort again, is refused"),
}
"""A reorder preset's keys."""
_SETTLED_AFTER = ("ascending", "pattern_params", "score_params")  # read by the steps after the table

PIPELINE_KEYS: dict[str, CompatKey] = {
    "cache_dir": CompatKey(reason=_STORE),
    "score_batch_size": CompatKey(target="loss.batch_size",
                                  reason="one loss refresh per decision serves every loss-reading stage; " + _SCORE_BATCH),
    "score_num_workers": CompatKey(reason="the loss stage batches tokenized rows in process; it has no DataLoader "
                                          "workers"),
    "save_plans": CompatKey(reason="every decision (each stage's pool, proportions, order) is written to "
                                   "flexfeed_decisions.jsonl"),
    "seed": CompatKey(reason=_NO_SEED),
}
"""A pipeline's keys besides `stages`."""

STAGE_KEYS: dict[str, CompatKey] = {
    "score_max_age": CompatKey(reason="the stages of a decision share one refresh; how stale a stored signal may be "
                                      "is `refresh.max_staleness`, for the whole run"),
    "allow_replacement": CompatKey(reason="flexfeed's mix draws each domain's rows as endless seeded permutations: "
                                          "an exhausted domain repeats its rows, never borrowing from another"),
}
"""DataFlex's stage keys that are not plan-stage fields (family, component, mode, keep_ratio, warmup_step, every,
enabled keep their meaning)."""
STAGE_FIELDS = tuple(f.name for f in dataclasses.fields(PlanStageArgs) if f.name != "component_args")

STAGE_TARGETS = {"flex.warmup_step": "warmup_step", "flex.update_step": "every"}
"""Run keys a component's parameters set that, in a pipeline, belong to its stage (ODM's `warmup_steps`,
joint_update_aware's `target_update_step`)."""


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FlexfeedError(f"{where} must be a mapping, got {value!r}", "write key: value lines under it")
    return value


def _refuse_unknown(params: dict, table, where: str, what: str) -> None:
    unknown = [k for k in params if k not in table]
    if unknown:
        raise FlexfeedError(f"{where}: unknown {what} key {unknown[0]!r}", did_you_mean(str(unknown[0]), table))


def translate_reorder(name: str, params: dict, where: str, source: Path, params_of: ParamsOf) -> Translation:
    """A `reorders:` preset -> the flexfeed reorder (its pattern), its parameters, run keys, stage `every` factor."""
    _refuse_unknown(params, REORDER_KEYS, where, "reorder")
    kind = params.get("kind") or name  # DataFlex: a preset without kind may be named after one
    preset = {**KIND_DEFAULTS[_choice("kind", KINDS)(kind, f"{where}, 'kind'")], **params, "kind": kind}
    out = Translation(preset["pattern"])
    for key, value in preset.items():
        if key not in _SETTLED_AFTER:
            out.apply(REORDER_KEYS[key], key, value, where, source)
    # the pattern's parameters, then DataFlex's defaults for those it leaves out
    given: dict = {}
    for key, value in _mapping(preset.get("pattern_params"), f"{where}, 'pattern_params'").items():
        rule = PATTERN_PARAMS.get(key)
        if rule is None:
            raise FlexfeedError(f"{where}: unknown pattern_params key {key!r}", did_you_mean(str(key), PATTERN_PARAMS))
        target = rule.target.partition(".")[2]
        if target in given and given[target][1] != value:
            raise FlexfeedError(f"{where}: pattern_params {given[target][0]!r} and {key!r} disagree",
                                f"keep one ({key} is another name for {target})")
        given[target] = (key, value)
        out.apply(rule, f"pattern_params.{key}", value, where, source)
    for key, value in PATTERN_DEFAULTS.get(out.component, {}).items():
        out.args.setdefault(key, value)
    # the score source's parameters (applied after `score_source`, so a score file can switch it to score: file)
    src = SCORE_SOURCES[preset["score_source"]]
    score_params = _mapping(preset.get("score_params"), f"{where}, 'score_params'")
    for key in src.required:
        if key not in score_params:
            raise FlexfeedError(f"{where}: score_source {preset['score_source']} needs score_params.{key}",
                                f"add score_params: {{{key}: ...}}")
    for key, value in src.defaults.items():
        out.args.setdefault(key, value)
    for key, value in score_params.items():
        rule = src.params.get(key)
        if rule is None:
            raise FlexfeedError(f"{where}: unknown score_params key {key!r} for score_source "
                                f"{preset['score_source']}", did_you_mean(str(key), src.params))
        out.apply(rule, f"score_params.{key}", value, where, source)
    # settled from several keys, as DataFlex does
    if preset.get("ascending", True) is False:
        out.args["polarity"] = next(p for p in POLARITIES if p != out.args["polarity"])
    out.args["live"] = bool(out.args.get("live")) and out.args["score"] == "loss"
    known = params_of("reorder", out.component, where)
    extra = [k for k in out.args if known is not None and k not in known]
    if extra:
        raise FlexfeedError(f"{where}: pattern {out.component!r} has no parameter {extra[0]!r}",
                            f"remove it from pattern_params (the {out.component} pattern takes "
                            f"{', '.join(sorted(known - {'score', 'score_path', 'score_key', 'score_fill', 'live'}))})")
    return out


def translate_entry(components: dict, family: str, preset: str, file: Path, output_dir: str | None,
                    params_of: ParamsOf, where: str) -> Translation:
    """The flexfeed component and parameters of preset `preset` of `family`'s section (`where`: who named it)."""
    section = SECTIONS[family]
    params = section_entry(components, section, preset, file, output_dir)
    here = f"{file}, {section}.{preset}"
    if family == "reorder":  # the one section whose presets name an ordering, not a component
        return translate_reorder(preset, params, here, file, params_of)
    args, elsewhere, warnings = translate_params(family, preset, params, params_of(family, preset, where), here)
    return Translation(preset, args, elsewhere, warnings=warnings)


def translate_pipeline(components: dict, name: str, file: Path, output_dir: str | None, params_of: ParamsOf,
                       update_step: int) -> tuple[list[dict], Translation]:
    """A `pipelines:` entry -> `plan:` stages (mappings), plus the run keys and warnings of the whole pipeline."""
    params = section_entry(components, "pipelines", name, file, output_dir)
    where = f"{file}, pipelines.{name}"
    out = Translation(name)
    _refuse_unknown(params, [*PIPELINE_KEYS, "stages"], where, "pipeline")
    for key, value in params.items():
        if key != "stages":
            out.apply(PIPELINE_KEYS[key], key, value, where, file)
    stages = params.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise FlexfeedError(f"{where}: stages must be a non-empty list of stages",
                            "e.g. stages: [{family: selector, component: loss, mode: filter, keep_ratio: 0.5}, ...]")
    plan = []
    for i, stage in enumerate(stages):
        item = _stage(components, stage, f"{where}.stages[{i}]", file, output_dir, params_of, update_step, out)
        if item is not None:
            plan.append(item)
    return plan, out


def _stage(components: dict, stage: dict, where: str, file: Path, output_dir: str | None, params_of: ParamsOf,
           update_step: int, out: Translation) -> dict | None:
    """One pipeline stage as a `plan:` item (None when disabled); its run keys and warnings go to `out`."""
    _refuse_unknown(stage, [*STAGE_FIELDS, *STAGE_KEYS], where, "stage")
    for key in ("family", "component"):
        if key not in stage:
            raise FlexfeedError(f"{where} has no {key!r}", "give every stage a family and a component (a preset name)")
    family = FAMILY_ALIASES.get(stage["family"], stage["family"])
    if family not in SECTIONS:
        raise FlexfeedError(f"{where}: unknown family {stage['family']!r}",
                            did_you_mean(str(stage["family"]), FAMILY_ALIASES))
    if stage.get("enabled", True) is False:  # DataFlex leaves the brick out without reading its preset
        return None
    preset, section = stage["component"], SECTIONS[family]
    entries = components.get(section) or {}
    if preset not in entries:
        raise FlexfeedError(f"{where}: component {preset!r} is not a preset of the {section}: section",
                            did_you_mean(str(preset), entries) if entries else f"add {section}.{preset} to the file")
    t = translate_entry(components, family, preset, file, output_dir, params_of, where)
    item = {k: v for k, v in stage.items() if k in STAGE_FIELDS}
    item.update(family=family, component=t.component, component_args=t.args)
    for key in [k for k in stage if k in STAGE_KEYS]:
        t.apply(STAGE_KEYS[key], key, stage[key], where)
    for target, name in STAGE_TARGETS.items():  # the stage's own key wins, as the run config's keys do
        if target in t.elsewhere:
            item.setdefault(name, t.elsewhere.pop(target))
    if t.stage.get("every", 1) != 1:
        item["every"] = (item.get("every") or update_step) * t.stage["every"]
    for target, value in t.elsewhere.items():
        if out.elsewhere.get(target, value) != value:
            raise FlexfeedError(f"{where}: its presets set {target} to {value!r}, an earlier part of the pipeline "
                                f"to {out.elsewhere[target]!r}", f"make them agree, or set {target} in the run config")
        out.elsewhere[target] = value
    out.warnings += t.warnings
    return item
