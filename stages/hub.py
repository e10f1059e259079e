"""Hub ids as LLaMA-Factory reads them: a model id becomes a local snapshot folder, a hub dataset becomes rows.

A model id is resolved with `huggingface_hub.snapshot_download` (or ModelScope's, with USE_MODELSCOPE_HUB
set), so every later step works on a folder. The environment (HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE) is
read when a name is resolved, not when huggingface_hub was imported. A snapshot folder of the hub cache,
`models--org--name/snapshots/<commit>/`, is identified by repo id and commit instead of its files' bytes.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from store.errors import FlexfeedError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
# a model's own files; the hub also holds original/ (Meta's consolidated weights) and other formats
MODEL_FILES = ["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
PT_WEIGHTS = ["*.bin"]
SKIPPED_FILES = ["original/*", "consolidated*", "training_args.bin"]
_RESOLVED: dict[tuple, Path] = {}  # a process resolves a name once, so the weights it loads match its key


@dataclass(frozen=True)
class HubAccess:
    """How to reach the hubs (LLaMA-Factory's cache_dir, hf_hub_token, ms_hub_token)."""

    cache_dir: str | None = None
    hf_token: str | None = None
    ms_token: str | None = None


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE", "Y")


def _env_true(name: str) -> bool:
    return _is_true(os.environ.get(name))


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (TRANSFORMERS_OFFLINE when it is unset, as huggingface_hub reads them)."""
    return _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def use_modelscope() -> bool:
    """USE_MODELSCOPE_HUB as set now: model ids and ms_hub_url datasets come from ModelScope (LLaMA-Factory's switch)."""
    return _env_true("USE_MODELSCOPE_HUB")


def modelscope_installed() -> bool:
    """Whether the modelscope package can be imported."""
    return importlib.util.find_spec("modelscope") is not None


def hub_cache(cache_dir: str | None = None) -> Path:
    """The hub cache folder: ``cache_dir``, else HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as `org/name` or `name` on a hub (not an absolute, home or dotted path)."""
    return bool(REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.startswith(".")


def snapshot_identity(folder: str | os.PathLike) -> str | None:
    """`hf:org/name@<commit>` for a snapshot folder of the hub cache, else None (a folder of one's own)."""
    path = Path(folder).expanduser().resolve()
    snapshots, repo = path.parent, path.parent.parent
    if not COMMIT.match(path.name) or snapshots.name != "snapshots" or not repo.name.startswith("models--"):
        return None
    return f"hf:{'/'.join(repo.name.split('--')[1:])}@{path.name}"


def resolve_model(name: str, *, revision: str = "main", access: HubAccess = HubAccess(), what: str = "model") -> Path:
    """A local folder for ``name``: itself when it is a folder, else its hub snapshot (cache first when offline)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if not is_repo_id(name):
        raise FlexfeedError(f"{what} directory {name!r} does not exist",
                            "give a local checkpoint folder or a hub id such as org/name")
    hub = "ms" if use_modelscope() else "hf"
    key = (hub, name, revision, str(hub_cache(access.cache_dir)))
    if key not in _RESOLVED:
        _RESOLVED[key] = _modelscope_model(name, revision, access) if hub == "ms" else \
            _hf_model(name, revision, access, what)
    return _RESOLVED[key]


def forget_resolved() -> None:
    """Resolve every hub id afresh (after the cache changed under this process)."""
    _RESOLVED.clear()


def _hf_model(name: str, revision: str, access: HubAccess, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache(access.cache_dir)
    is_offline = offline()

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(name, revision=revision, cache_dir=str(cache), token=access.hf_token,
                                      local_files_only=is_offline, allow_patterns=patterns,
                                      ignore_patterns=SKIPPED_FILES))

    where = f"{what} {name!r} (revision {revision!r})"
    try:
        folder = download(MODEL_FILES)
        if not is_offline and not any(folder.rglob("*.safetensors")):
            folder = download(PT_WEIGHTS)  # an older repo with pytorch_model*.bin only
    except GatedRepoError:
        raise FlexfeedError(f"{where} is a gated repository on the Hugging Face hub",
                            "accept its licence on the model page, then set hf_hub_token or HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FlexfeedError(f"{where}: the Hugging Face hub has no such revision",
                            "set model_revision to a branch, tag or commit of the repository") from None
    except RepositoryNotFoundError:
        raise FlexfeedError(f"{where} is neither a local folder nor a repository on the Hugging Face hub",
                            "check the id; a private repository needs hf_hub_token or HF_TOKEN") from None
    except IncompleteSnapshotError as exc:
        raise FlexfeedError(f"{where}: the cached snapshot in {cache} is incomplete ({exc.__class__.__name__})",
                            f"finish the download (hf download {name} --revision {revision}) with network access"
                            ) from None
    except LocalEntryNotFoundError:
        reason = "HF_HUB_OFFLINE is set" if is_offline else "the hub could not be reached"
        raise FlexfeedError(
            f"{where} is not a local folder and the Hugging Face cache {cache} has no snapshot of it ({reason})",
            f"download it (hf download {name} --revision {revision}), unset HF_HUB_OFFLINE, "
            "or set the path of a local model folder") from None
    except (HfHubHTTPError, ValueError) as exc:
        raise FlexfeedError(f"{where}: cannot fetch it from the Hugging Face hub: {_one_line(exc)}",
                            "check the id, the network and hf_hub_token, or give a local folder") from None
    return folder


def _modelscope_model(name: str, revision: str, access: HubAccess) -> Path:
    if not modelscope_installed():
        raise FlexfeedError(f"USE_MODELSCOPE_HUB is set, so {name!r} is a ModelScope id, but modelscope is not "
                            "installed", "pip install modelscope, or unset USE_MODELSCOPE_HUB to use the "
                            "Hugging Face hub")
    from modelscope import snapshot_download

    # ModelScope's default branch is master (as LLaMA-Factory translates it)
    try:
        return Path(snapshot_download(name, revision="master" if revision == "main" else revision,
                                      cache_dir=access.cache_dir, token=access.ms_token))
    except Exception as exc:  # noqa: BLE001 - modelscope raises plain exceptions of many kinds
        raise FlexfeedError(f"model {name!r} (revision {revision!r}): ModelScope could not provide it: "
                            f"{_one_line(exc)}", "check the id and ms_hub_token, or give a local folder") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def load_hub_dataset(repo: str, *, kind: str, subset: str | None, folder: str | None, split: str,
                     access: HubAccess, where: str):
    """A hub dataset's split as a `datasets.Dataset` (LLaMA-Factory's load_dataset call), or one FlexfeedError."""
    if kind == "ms":
        return _modelscope_dataset(repo, subset=subset, folder=folder, split=split, access=access, where=where)
    import datasets

    source = repo
    if offline():
        # offline, `datasets` only finds what it prepared itself; a repo fetched with `hf download` sits in
        # the hub cache, so load its snapshot folder (same files, same configs from its README)
        source = str(_cached_dataset_snapshot(repo, access) or repo)
    try:
        return datasets.load_dataset(source, name=subset, data_dir=folder, split=split, cache_dir=access.cache_dir,
                                     token=access.hf_token)
    except ConnectionError:
        raise FlexfeedError(
            f"{where} has no file_name, and its hf_hub_url {repo!r} is in neither the Hugging Face hub cache {hub_cache(access.cache_dir)} "
            "nor the datasets cache, and " + ("HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"),
            f"download it (hf download {repo} --repo-type dataset), unset HF_HUB_OFFLINE, "
            "or download the data and set file_name") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise FlexfeedError(f"{where}: cannot load {repo!r} (subset {subset!r}, split {split!r}, folder "
                            f"{folder!r}) from the Hugging Face hub: {_one_line(exc)}",
                            "check hf_hub_url, subset, split and folder against the dataset's page") from None


def _cached_dataset_snapshot(repo: str, access: HubAccess) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", cache_dir=str(hub_cache(access.cache_dir)),
                                      local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _modelscope_dataset(repo: str, *, subset, folder, split, access: HubAccess, where: str):
    if not modelscope_installed():
        raise FlexfeedError(f"{where}: ms_hub_url {repo!r} needs the modelscope package, which is not installed",
                            "pip install modelscope, or give an hf_hub_url or a file_name instead")
    from modelscope import MsDataset

    try:
        data = MsDataset.load(repo, subset_name=subset, data_dir=folder, split=split, cache_dir=access.cache_dir,
                              token=access.ms_token)
    except Exception as exc:  # noqa: BLE001 - modelscope raises plain exceptions of many kinds
        raise FlexfeedError(f"{where}: ModelScope could not load {repo!r}: {_one_line(exc)}",
                            "check ms_hub_url, subset, split and ms_hub_token") from None
    return data.to_hf_dataset() if hasattr(data, "to_hf_dataset") else data
