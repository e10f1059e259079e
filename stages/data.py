"""Loading datasets into tokenized rows (input_ids, labels, text, domain) with a content fingerprint.

Every dataset named in a run is a domain; its id is its position in the list of names. Tokens of
masked segments get label -100 (IGNORE_INDEX), trained ones their own id.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass
from itertools import chain

import datasets
import numpy as np

from stages.args import DataArgs
from stages.batching import IGNORE_INDEX
from stages.conversations import RowRef, alpaca_conversation, pt_text, sharegpt_conversation
from stages.dataset_info import DatasetSpec, parse_entry, read_info
from stages.formats import read_source
from stages.hub import HubAccess, load_hub_dataset
from stages.templates import Segment, named_template, render, resolve_template
from store.errors import FlexfeedError
from store.hashing import HASH_HEX_CHARS, canonical_json

STAGES = ("pt", "sft")
FINGERPRINT_VERSION = "tokenized-rows/1"  # bump if the fingerprint's byte layout changes
NUM_SAMPLES_SEED = 0  # num_samples draws a seeded, hence reproducible, subset
TOKENIZE_CHUNK = 4096  # texts per batched tokenizer call (bounds peak memory)
FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "text": datasets.Value("string"),
    "domain": datasets.Value("int32"),
})


@dataclass
class TokenizedData:
    """Tokenized rows of one or more datasets (domains) and their content fingerprint."""

    dataset: datasets.Dataset
    domain_names: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, start: int, stop: int) -> dict[str, list]:
        """Columns of rows [start, stop) as lists."""
        return self.dataset[start:stop]

    def domain_ids(self) -> np.ndarray:
        """(N,) integer domain id of each row."""
        return np.asarray(self.dataset.with_format("numpy")["domain"], dtype=np.int64)


def _names(names) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out = [n.strip() for item in names or [] for n in str(item).split(",") if n.strip()]
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise FlexfeedError(f"dataset {dup[0]!r} is listed twice", "name each dataset (domain) once")
    return out


def _check_args(args: DataArgs, names: list[str]) -> None:
    if not names:
        raise FlexfeedError("no dataset given", "set dataset: name1,name2 (names from dataset_info.json)")
    if args.stage not in STAGES:
        raise FlexfeedError(f"unsupported stage {args.stage!r}", "stage is 'pt' or 'sft'")
    if not isinstance(args.cutoff_len, int) or args.cutoff_len < 1:
        raise FlexfeedError(f"cutoff_len must be a positive integer, got {args.cutoff_len!r}", "e.g. cutoff_len: 1024")
    if args.max_samples is not None and (not isinstance(args.max_samples, int) or args.max_samples < 1):
        raise FlexfeedError(f"max_samples must be a positive integer, got {args.max_samples!r}",
                            "remove it to keep every row")


def _source_rows(spec: DatasetSpec, hub: HubAccess) -> list[tuple[RowRef, dict]]:
    """Each raw row of the dataset with where it came from: local files, or a hub dataset's split."""
    if spec.hub is None:
        return [(RowRef(path, i + 1, spec.name), row)
                for path, file_rows in read_source(spec.path, spec.split) for i, row in enumerate(file_rows)]
    loaded = load_hub_dataset(spec.hub_url, kind=spec.hub, subset=spec.subset, folder=spec.folder,
                              split=spec.split, access=hub, where=spec.where)
    # the rows' content, not the hub id, enters the fingerprint; the id only names rows in messages
    label = f"{spec.hub_url} ({spec.split})"
    return [(RowRef(label, i + 1, spec.name), row) for i, row in enumerate(loaded)]


def _pick_rows(spec: DatasetSpec, max_samples: int | None, hub: HubAccess) -> list[tuple[RowRef, dict]]:
    rows = _source_rows(spec, hub)
    if not rows:
        raise FlexfeedError(f"dataset {spec.name!r} ({spec.source}) has no rows", "add rows or remove the dataset")
    if spec.num_samples is not None:
        # like LLaMA-Factory: a random subset, repeated rows when more are asked for than exist
        rng = np.random.default_rng(NUM_SAMPLES_SEED)
        order = rng.permutation(len(rows))[: spec.num_samples].tolist()
        if spec.num_samples > len(rows):
            order += rng.choice(len(rows), spec.num_samples - len(rows)).tolist()
        rows = [rows[i] for i in order]
    return rows[:max_samples] if max_samples is not None else rows


def _segments(row: dict, ref: RowRef, spec: DatasetSpec, stage: str, template: str, tokenizer) -> list[Segment]:
    if stage == "pt":
        return [(pt_text(row, spec, ref) + tokenizer.eos_token, True)]
    convert = alpaca_conversation if spec.formatting == "alpaca" else sharegpt_conversation
    conv = convert(row, spec, ref)
    try:
        return render(conv, template, tokenizer)
    except FlexfeedError as exc:
        raise ref.error(None, exc.message, exc.hint) from None


def _tokenize(texts: list[str], tokenizer, workers: int | None = None) -> list[list[int]]:
    if workers and workers > 1 and len(texts) > TOKENIZE_CHUNK:
        return _tokenize_in_processes(texts, tokenizer, workers)
    out: list[list[int]] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        out += tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
    return out


def _tokenize_in_processes(texts: list[str], tokenizer, workers: int) -> list[list[int]]:
    """_tokenize's ids, computed by `workers` processes (datasets' map with num_proc; order kept)."""
    table = datasets.Dataset.from_dict({"text": texts})
    ids = table.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                    batched=True, batch_size=TOKENIZE_CHUNK, num_proc=min(workers, -(-len(texts) // TOKENIZE_CHUNK)),
                    remove_columns=["text"], load_from_cache_file=False, desc="tokenizing")
    return ids["ids"]


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds a bos token by itself (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids[:1] == [bos] else []


def split_budget(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """Tokens kept of a (prompt, response) pair that must fit in ``budget`` (see docs/data.md)."""
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    if 2 * response_len < budget:
        keep_response = response_len
    elif 2 * prompt_len < budget:
        keep_response = budget - prompt_len
    else:
        keep_response = budget - budget // 2
    return budget - keep_response, keep_response


def assemble(pieces: list[list[int]], trained: list[bool], cutoff_len: int,
             efficient_eos: int | None = None) -> tuple[list[int], list[int]]:
    """input_ids and labels of alternating prompt/response pieces, truncated turn by turn to cutoff_len.

    ``efficient_eos`` (an eos id) is LLaMA-Factory's efficient_eos: the row ends with that eos (trained, and
    kept within cutoff_len), and each later prompt's first label is eos, ending the response before it.
    """
    ids: list[int] = []
    labels: list[int] = []
    if len(pieces) == 1:  # pt: one trained piece, cut at the end
        ids = pieces[0][:cutoff_len]
        return ids, list(ids) if trained[0] else [IGNORE_INDEX] * len(ids)
    reserved = 1 if efficient_eos is not None else 0
    for turn, (prompt, response) in enumerate(zip(pieces[0::2], pieces[1::2])):
        budget = cutoff_len - reserved - len(ids)
        if budget <= 0:
            break
        n_prompt, n_response = split_budget(len(prompt), len(response), budget)
        ids += prompt[:n_prompt] + response[:n_response]
        prompt_labels = [IGNORE_INDEX] * n_prompt
        if efficient_eos is not None and turn > 0 and n_prompt:
            prompt_labels[0] = efficient_eos
        labels += prompt_labels + response[:n_response]
    if efficient_eos is not None:
        ids.append(efficient_eos)
        labels.append(efficient_eos)
    return ids, labels


def fingerprint_columns(input_ids: list, labels: list, texts: list[str], domains: list[int], settings: dict) -> str:
    """Content hash of tokenized rows (token ids hashed as little-endian int32 bytes) and settings."""
    h = hashlib.sha256()
    h.update(canonical_json({"version": FINGERPRINT_VERSION, **settings}).encode())
    for column in (input_ids, labels):
        lengths = np.fromiter(map(len, column), dtype="<i8", count=len(column))
        flat = np.fromiter(chain.from_iterable(column), dtype="<i4", count=int(lengths.sum()))
        h.update(lengths.tobytes())
        h.update(flat.tobytes())
    encoded = [t.encode("utf-8") for t in texts]
    h.update(np.fromiter(map(len, encoded), dtype="<i8", count=len(encoded)).tobytes())
    h.update(b"".join(encoded))
    h.update(np.asarray(domains, dtype="<i4").tobytes())
    return h.hexdigest()[:HASH_HEX_CHARS]


def load_data(args: DataArgs, tokenizer, names: list[str] | None = None, *,
              hub: HubAccess | None = None) -> TokenizedData:
    """Read, format, tokenize and fingerprint the datasets ``names`` (default ``args.dataset``).

    ``hub`` is how hub datasets are reached (cache folder, tokens); default the environment's.
    """
    names = _names(args.dataset if names is None else names)
    _check_args(args, names)
    template = resolve_template(args.template, tokenizer) if args.stage == "sft" else None
    info = read_info(args.dataset_dir)
    specs = [parse_entry(args.dataset_dir, info, name, allow_outside=args.allow_outside_dataset_dir) for name in names]
    # flexfeed's default and pt rows get the tokenizer's own bos; chat and named templates write their own
    bos = bos_prefix(tokenizer) if template in (None, "default") else []
    named = named_template(template)
    efficient_eos = tokenizer.eos_token_id if named is not None and named.efficient_eos else None

    texts, domains, all_segments = [], [], []
    for domain, spec in enumerate(specs):
        for ref, row in _pick_rows(spec, args.max_samples, hub or HubAccess()):
            segments = _segments(row, ref, spec, args.stage, template, tokenizer)
            all_segments.append(segments)
            texts.append("".join(text for text, _ in segments))
            domains.append(domain)
    token_lists = iter(_tokenize([text for segs in all_segments for text, _ in segs], tokenizer,
                                 args.preprocessing_num_workers))
    input_ids, labels = [], []
    for segments in all_segments:
        pieces = [next(token_lists) for _ in segments]
        pieces[0] = bos + pieces[0]
        ids, labs = assemble(pieces, [trained for _, trained in segments], args.cutoff_len,
                             efficient_eos if args.stage == "sft" else None)
        input_ids.append(ids)
        labels.append(labs)

    settings = {"stage": args.stage, "template": template, "cutoff_len": args.cutoff_len,
                "max_samples": args.max_samples, "domains": names}
    fingerprint = fingerprint_columns(input_ids, labels, texts, domains, settings)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": input_ids, "labels": labels, "text": texts, "domain": domains}, features=FEATURES)
    return TokenizedData(dataset=dataset, domain_names=names, fingerprint=fingerprint)


def row_values(args: DataArgs, column: str, names: list[str] | None = None, *,
               hub: HubAccess | None = None) -> np.ndarray:
    """The number in each raw row's `column`, in the row order of ``load_data(args, ..., names)``.

    Read from the data files again rather than carried through tokenizing, so runs that do not ask for
    it keep their fingerprint and store keys. A missing or non-finite value is an error naming its row.
    """
    names = _names(args.dataset if names is None else names)
    _check_args(args, names)
    info = read_info(args.dataset_dir)
    out: list[float] = []
    for spec in (parse_entry(args.dataset_dir, info, name, allow_outside=args.allow_outside_dataset_dir) for name in names):
        for ref, row in _pick_rows(spec, args.max_samples, hub or HubAccess()):
            value = row.get(column) if isinstance(row, dict) else None
            if value is None:
                raise ref.error(column, "no value (every train row needs a score in this field)",
                                f"add {column!r} to every row of every dataset, or score from a file")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ref.error(column, f"score {value!r} is not a finite number", "write a plain number")
            out.append(float(value))
    return np.asarray(out, dtype=np.float64)
