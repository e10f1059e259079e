"""`dataset_info.json`: which file each dataset name points to, its format, columns and tags.

The keys follow LLaMA-Factory so an existing `dataset_info.json` works unchanged, for local files and
hub datasets (`hf_hub_url`, `ms_hub_url`; see stages.hub). Entries are checked only when a run asks
for them: a shared file may hold entries flexfeed cannot load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from stages.hub import use_modelscope
from stages.values import did_you_mean
from store.errors import FlexfeedError

INFO_FILE = "dataset_info.json"

# LLaMA-Factory's column names per format, and their defaults
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None}
SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "system_tag": "system",
}
# Accepted so LLaMA-Factory files load, but only meaningful for features flexfeed does not have
UNSUPPORTED_COLUMNS = ("chosen", "rejected", "kto_tag", "images", "videos", "audios")
UNSUPPORTED_TAGS = ("observation_tag", "function_tag")
KNOWN_KEYS = (
    "file_name", "formatting", "columns", "tags", "split", "num_samples", "ranking", "subset", "folder",
    "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name",
)
# why the other sources LLaMA-Factory knows stay refused
UNSUPPORTED_SOURCES = {
    "om_hub_url": "the Modelers (openmind) hub is not supported",
    "script_url": "loading scripts run remote code, and the datasets library no longer runs them",
    "cloud_file_name": "cloud storage files (s3://, gs://) are not read",
}


@dataclass
class DatasetSpec:
    """One dataset entry of dataset_info.json, with defaults filled in."""

    name: str
    path: Path | None
    """The local file or folder; None for a hub dataset."""
    formatting: str = "alpaca"
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    num_samples: int | None = None
    hub: str | None = None
    """`hf` or `ms` for a hub dataset (`hub_url` names it), None for a local one."""
    hub_url: str | None = None
    """The hub dataset id (hf_hub_url or ms_hub_url)."""
    subset: str | None = None
    """A hub dataset's configuration (load_dataset's `name`)."""
    folder: str | None = None
    """A hub dataset's sub-folder (load_dataset's `data_dir`)."""
    where: str = ""
    """`.../dataset_info.json: dataset 'x'`, the start of this entry's errors."""

    @property
    def source(self) -> str:
        """The file, folder or hub id the rows come from (for messages)."""
        return str(self.path) if self.path is not None else f"{self.hub_url} ({self.hub} hub)"


def read_info(dataset_dir: str | Path) -> dict:
    """The parsed dataset_info.json of ``dataset_dir`` (FlexfeedError if missing or not JSON)."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise FlexfeedError(
            f"no {INFO_FILE} in dataset_dir {str(dataset_dir)!r}",
            "set dataset_dir to the folder that holds dataset_info.json, or create it (see docs/data.md)",
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FlexfeedError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                            "fix the JSON syntax of dataset_info.json") from None
    except UnicodeDecodeError as exc:
        raise FlexfeedError(f"{path}: not UTF-8 text (byte {exc.start})", "save dataset_info.json as UTF-8") from None
    except RecursionError:
        raise FlexfeedError(f"{path}: JSON nested too deeply", "fix the JSON of dataset_info.json") from None
    if not isinstance(info, dict):
        raise FlexfeedError(f"{path}: top level must be an object mapping dataset names to entries",
                            'write {"my_data": {"file_name": "my_data.json"}}')
    return info


def _check_mapping(path: Path, name: str, key: str, value, allowed: dict, unsupported: tuple) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FlexfeedError(f"{path}: dataset {name!r}: {key!r} must be an object, got {type(value).__name__}",
                            f'write "{key}": {{...}} with keys {", ".join(allowed)}')
    for k, v in value.items():
        if k in unsupported:
            if v:
                raise FlexfeedError(f"{path}: dataset {name!r}: {key}.{k} is not supported by flexfeed",
                                    f"remove {key}.{k}; flexfeed trains on text (pt/sft) only")
            continue
        if k not in allowed:
            raise FlexfeedError(f"{path}: dataset {name!r}: unknown {key} key {k!r}",
                                did_you_mean(k, allowed))
        if v is not None and not isinstance(v, str):
            raise FlexfeedError(f"{path}: dataset {name!r}: {key}.{k} must be a string, got {v!r}",
                                f'write "{k}": "<name>"')
    return {k: v for k, v in value.items() if k in allowed}


def parse_entry(dataset_dir: str | Path, info: dict, name: str, *, allow_outside: bool = False) -> DatasetSpec:
    """Validate one entry and fill in LLaMA-Factory's defaults; ``allow_outside`` is DataArgs.allow_outside_dataset_dir."""
    info_path = Path(dataset_dir) / INFO_FILE
    if name not in info:
        hint = did_you_mean(name, info) if info else f"{info_path} lists no datasets: add an entry for {name!r}"
        raise FlexfeedError(f"dataset {name!r} is not in {info_path}", hint)
    entry = info[name]
    if not isinstance(entry, dict):
        raise FlexfeedError(f"{info_path}: dataset {name!r} must be an object", '{"file_name": "data.json"}')
    for key in entry:
        if key not in KNOWN_KEYS:
            raise FlexfeedError(f"{info_path}: dataset {name!r}: unknown key {key!r}",
                                did_you_mean(key, KNOWN_KEYS))
    for key in ("file_name", "folder", "split", "subset", "hf_hub_url", "ms_hub_url"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise FlexfeedError(f"{info_path}: dataset {name!r}: {key} must be a string, got {entry[key]!r}",
                                f'write "{key}": "<path relative to dataset_dir>"' if key in ("file_name", "folder")
                                else f'write "{key}": "<name>"')
    hub, hub_url = _hub_source(info_path, name, entry)
    if entry.get("ranking"):
        raise FlexfeedError(f"{info_path}: dataset {name!r}: ranking (preference) data is not supported",
                            "use pt or sft data; remove 'ranking'")
    if entry.get("subset") and hub is None:
        raise FlexfeedError(f"{info_path}: dataset {name!r}: subset applies to hub datasets only",
                            "point file_name at the local file or folder of the subset and remove 'subset'")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise FlexfeedError(f"{info_path}: dataset {name!r}: unknown formatting {formatting!r}",
                            "formatting is 'alpaca' (default) or 'sharegpt'")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns = dict(defaults)
    columns.update(_check_mapping(info_path, name, "columns", entry.get("columns"), defaults, UNSUPPORTED_COLUMNS))
    tags = dict(SHAREGPT_TAGS)
    if formatting == "sharegpt":
        tags.update(_check_mapping(info_path, name, "tags", entry.get("tags"), SHAREGPT_TAGS, UNSUPPORTED_TAGS))
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise FlexfeedError(f"{info_path}: dataset {name!r}: num_samples must be a positive integer",
                            f"got {num_samples!r}")
    path = None
    if hub is None:
        path = Path(dataset_dir) / entry["file_name"]
        if entry.get("folder"):
            path = path / entry["folder"]
        if not allow_outside:
            check_inside(info_path, name, entry)
    return DatasetSpec(name=name, path=path, formatting=formatting, columns=columns, tags=tags,
                       split=str(entry.get("split", "train")), num_samples=num_samples, hub=hub, hub_url=hub_url,
                       subset=entry.get("subset") if hub else None, folder=entry.get("folder") if hub else None,
                       where=f"{info_path}: dataset {name!r}")


def check_inside(info_path: Path, name: str, entry: dict) -> None:
    """Refuse a local entry whose path leaves dataset_dir (absolute, or through `..`).

    Lexical, not resolved: a symlink placed inside dataset_dir by its owner is that owner's choice; a
    shared dataset_info.json naming `../../home/x/.ssh/id_rsa` or `/etc/passwd` is not.
    """
    for key in ("file_name", "folder"):
        value = entry.get(key)
        if not value:
            continue
        parts = Path(os.path.normpath(value)).parts
        if Path(value).is_absolute() or (parts and parts[0] == ".."):
            raise FlexfeedError(
                f"{info_path}: dataset {name!r}: {key} {value!r} is outside dataset_dir {str(info_path.parent)!r}",
                "move the file into dataset_dir and name it relative to it, or set allow_outside_dataset_dir: true "
                "if this dataset_info.json is yours")


def _hub_source(info_path: Path, name: str, entry: dict) -> tuple[str | None, str | None]:
    """(`hf` or `ms`, id) of a hub entry, (None, None) of a local one; refuses an entry with neither.

    A file_name beside a hub url is read instead of the hub (LLaMA-Factory prefers the hub), so an entry
    pointed at a download keeps working offline. Between hubs, LLaMA-Factory's rule: ms_hub_url when
    USE_MODELSCOPE_HUB is set or there is no hf_hub_url.
    """
    if entry.get("file_name"):
        return None, None
    if entry.get("ms_hub_url") and (use_modelscope() or not entry.get("hf_hub_url")):
        return "ms", entry["ms_hub_url"]
    if entry.get("hf_hub_url"):
        return "hf", entry["hf_hub_url"]
    remote = [k for k in UNSUPPORTED_SOURCES if entry.get(k)]
    if remote:
        raise FlexfeedError(f"{info_path}: dataset {name!r} has no file_name, and {remote[0]} is not supported: "
                            f"{UNSUPPORTED_SOURCES[remote[0]]}",
                            "download the data and set file_name to its path, or give an hf_hub_url")
    raise FlexfeedError(f"{info_path}: dataset {name!r} has no file_name",
                        "set file_name to a file or folder in dataset_dir, or hf_hub_url to a hub dataset id")
