"""DataFlex compatibility: its run keys, its `train_type` spellings and its components YAML.

A DataFlex run config names a component (`component_name`) whose parameters live in a separate
components file (`components_cfg_file`, sections `selectors`/`mixers`/`weighters`). flexfeed reads that
entry and translates each parameter with :data:`DATAFLEX_PARAMS`: to a flexfeed component parameter, to
another config key (LESS's projection settings belong to the offline `grads:` stage here), or accepted
and ignored with a warning saying why. A parameter the table does not list passes through under the
same name only if the flexfeed component has that parameter; anything else is an error.
"""

from __future__ import annotations

from pathlib import Path

from store.errors import FlexfeedError

from .config_compat import CompatKey
from .config_values import did_you_mean, parse_yaml_text

TRAIN_TYPES = ("static", "select", "mix", "weight")

TRAIN_TYPE_ALIASES = {
    "dynamic_select": "select",
    "dynamic_mix": "mix",
    "dynamic_weight": "weight",
    "dynamic_weighting": "weight",
    "static_full": "static",
}
"""DataFlex's train_type spellings -> flexfeed's."""

SECTIONS = {"select": "selectors", "mix": "mixers", "weight": "weighters"}
"""Components-file section of each train_type."""

KEY_RENAMES = {"component_name": "component", "component_overrides": "component_args"}
"""DataFlex run keys spelled differently in flexfeed (same meaning)."""

_STORE = "the signal store keeps these results, keyed by content, so there is no cache folder"
_GRADS = {
    "gradient_type": CompatKey(target="grads.grad_type", reason="gradient features are an offline stage"),
    "proj_dim": CompatKey(target="grads.proj_dim", reason="gradient features are an offline stage"),
    "seed": CompatKey(target="grads.seed", reason="the projection seed belongs to the gradient stage"),
}

_CLUSTER = {
    "clustering_batch_size": CompatKey(target="embed.batch_size", reason="embeddings are an offline stage"),
    "clustering_max_iter": CompatKey(target="component_args.kmeans_iters", reason="k-means iterations"),
    "clustering_method": CompatKey(reason="flexfeed's cluster selector always uses k-means"),
    "representative_strategy": CompatKey(reason="flexfeed scores each cluster by `samples_per_cluster` rows drawn "
                                                "at random, then samples clusters by a softmax of the scores"),
    "embedding_model_name_or_path": CompatKey(target="embed.model_name_or_path", reason="the embed stage's model"),
    "embedding_model_dtype": CompatKey(reason="the embed stage loads the model with the run's torch_dtype"),
    "embedding_layer": CompatKey(target="embed.layer", reason="the embed stage's pooled layer"),
}

DATAFLEX_PARAMS: dict[str, dict[str, dict[str, CompatKey]]] = {
    "selectors": {
        "*": {
            "cache_dir": CompatKey(reason=_STORE),
            "save_interval": CompatKey(reason="the store commits each shard as soon as it is written"),
        },
        "less": dict(_GRADS),
        "nice": dict(_GRADS),
        "cluster_less": {**_GRADS, **_CLUSTER},
        "cluster": {**_GRADS, **_CLUSTER},
        "delta_loss": {
            "window_size": CompatKey(reason="flexfeed's delta_loss compares with the loss `window_decisions` "
                                            "decisions ago and keeps a `top_fraction`; set those instead"),
        },
        "tsds": {
            "probs_path": CompatKey(reason="flexfeed computes the TSDS probabilities from the store's embeddings"),
        },
        "near": {
            "indices_path": CompatKey(reason="flexfeed searches a FAISS index over the store's embeddings"),
        },
        "random": {"seed": CompatKey(target="flex.component_seed", reason="the component's seed")},
    },
    "mixers": {
        "*": {"cache_dir": CompatKey(reason=_STORE)},
        "random": {"seed": CompatKey(target="flex.component_seed", reason="the component's seed")},
        "doremi": {
            "reference_model_path": CompatKey(
                target="loss.model_name_or_path",
                reason="reference losses are computed offline by the loss stage with the reference model"),
        },
        "odm": {
            "initial_proportions": CompatKey(target="flex.init_mixture_proportions",
                                             reason="the mixture before the first decision"),
            "warmup_steps": CompatKey(target="flex.warmup_step",
                                      reason="steps on the initial mixture before the bandit starts"),
            "num_eval_samples": CompatKey(reason="flexfeed's odm rewards come from the training batches' losses "
                                                 "(as in the ODM paper), with no evaluation pass"),
            "eval_batch_size": CompatKey(reason="flexfeed's odm runs no evaluation pass"),
            "min_exploration_rate": CompatKey(reason="flexfeed's odm follows the paper's exploration schedule "
                                                     "eps_t = min(1/K, sqrt(ln K / (K t))) without a floor"),
        },
    },
    "weighters": {
        "*": {"cache_dir": CompatKey(reason=_STORE)},
        "adapt": {
            "refresh_interval": CompatKey(target="refresh.max_staleness",
                                          reason="embeddings older than this many steps are recomputed"),
            "anchor_batch_size": CompatKey(target="embed.batch_size", reason="embeddings are an offline stage"),
            "clip": CompatKey(reason="flexfeed's adapt has no weight cap (weights are rescaled to mean 1)"),
        },
    },
}
"""Per (components-file section, component) DataFlex parameter -> flexfeed target or ignore reason."""


def normalise_train_type(value, where: str) -> str:
    """flexfeed's train_type for any accepted spelling."""
    if not isinstance(value, str):
        raise FlexfeedError(f"{where} must be a string, got {value!r}", f"choose one of: {', '.join(TRAIN_TYPES)}")
    value = TRAIN_TYPE_ALIASES.get(value, value)
    if value not in TRAIN_TYPES:
        raise FlexfeedError(f"{where}: unknown train_type {value!r}",
                            did_you_mean(value, list(TRAIN_TYPES) + list(TRAIN_TYPE_ALIASES)))
    return value


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


def read_components_file(path: Path) -> dict:
    """The parsed components YAML (sections selectors/mixers/weighters)."""
    data = parse_yaml_text(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise FlexfeedError(f"components file {str(path)!r} is not a mapping",
                            "it must have sections selectors:, mixers:, weighters:")
    unknown = [k for k in data if k not in SECTIONS.values()]
    if unknown:
        raise FlexfeedError(f"components file {str(path)!r}: unknown section {unknown[0]!r}",
                            did_you_mean(str(unknown[0]), SECTIONS.values()))
    return data


def component_entry(components: dict, train_type: str, name: str, path: Path, output_dir: str | None) -> dict:
    """The `params` of `name` in the file's section for `train_type`, with ${output_dir} substituted."""
    section = SECTIONS[train_type]
    entries = components.get(section) or {}
    if name not in entries:
        raise FlexfeedError(f"components file {str(path)!r} has no {section}.{name} entry",
                            did_you_mean(name, entries) if entries else f"add a {section}: section with {name}:")
    entry = entries[name] or {}
    if not isinstance(entry, dict):
        raise FlexfeedError(f"{str(path)!r}, {section}.{name} must be a mapping", "write name: and params: under it")
    params = entry.get("params", {}) if ("params" in entry or "name" in entry) else entry
    if not isinstance(params or {}, dict):
        raise FlexfeedError(f"{str(path)!r}, {section}.{name}.params must be a mapping", "write key: value lines")
    return {k: _substitute(v, output_dir) for k, v in (params or {}).items()}


def _substitute(value, output_dir: str | None):
    if isinstance(value, str) and "${output_dir}" in value and output_dir is not None:
        return value.replace("${output_dir}", output_dir)
    if isinstance(value, dict):
        return {k: _substitute(v, output_dir) for k, v in value.items()}
    return value


def translate_params(train_type: str, name: str, params: dict, known: set[str] | None,
                     where: str) -> tuple[dict, dict, list[str]]:
    """DataFlex params -> (component_args, {"group.key": value} for other keys, warnings).

    `known` is the flexfeed component's parameter names (None when the component cannot be resolved;
    then unlisted parameters pass through and are checked when the component is built).
    """
    section = SECTIONS[train_type]
    table = {**DATAFLEX_PARAMS.get(section, {}).get("*", {}), **DATAFLEX_PARAMS.get(section, {}).get(name, {})}
    component_args: dict = {}
    elsewhere: dict = {}
    warnings: list[str] = []
    for key, value in params.items():
        rule = table.get(key)
        if rule is not None and rule.target is None:
            if value is None:
                continue
            warnings.append(f"{where}: DataFlex parameter {key!r} ignored: {rule.reason}")
        elif rule is not None:
            group, _, field_name = rule.target.partition(".")
            value = rule.convert(value, f"{where}, {key!r}") if rule.convert else value
            if group == "component_args":
                component_args[field_name] = value
            else:
                elsewhere[rule.target] = value
        elif known is None or key in known:
            component_args[key] = value
        else:
            choices = sorted(known) + sorted(table)
            raise FlexfeedError(f"{where}: DataFlex parameter {key!r} of {section[:-1]} {name!r} has no flexfeed "
                                "equivalent", did_you_mean(key, choices) if choices else "remove it")
    return component_args, elsewhere, warnings
