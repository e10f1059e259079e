"""The run config: one flat LLaMA-Factory-style YAML, validated into typed argument groups on load.

- `groups`: the dataclasses, one per concern, each checking its own fields (the stage groups live in
  stages.args, which stages take), the tables of groups and keys, RunConfig;
- `load`: load_config, from the YAML file and `key=value` overrides to a RunConfig, with the checks that
  span groups;
- `compat`: LLaMA-Factory's and DataFlex's keys and how each translates;
- `read`: the strict YAML reader, override parsing, files a config names;
- `reference`: docs/config.md, generated (`python -m pipeline.config.reference > docs/config.md`).

Value coercion, ranges, `Literal` choices and "did you mean" are stages.values, shared with the stages.
"""

from .groups import (
    FLAT_GROUPS,
    MAX_STEPS,
    SECTION_GROUPS,
    TRAIN_TYPES,
    TRAINING_RANGES,
    FlexArgs,
    RefreshArgs,
    RunConfig,
    TrainType,
    accepted_keys,
    flat_keys,
    training_fields,
)
from .load import load_config, to_training_arguments

__all__ = ["FLAT_GROUPS", "MAX_STEPS", "SECTION_GROUPS", "TRAINING_RANGES", "TRAIN_TYPES", "FlexArgs",
           "RefreshArgs", "RunConfig", "TrainType", "accepted_keys", "flat_keys", "load_config",
           "to_training_arguments", "training_fields"]
