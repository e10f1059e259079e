"""Reading data files (json, jsonl, csv, parquet, arrow) into rows, with errors that name file and row.

Rows are numbered from 1 in file order. JSON arrays are decoded item by item so a broken item is
reported by its row number, not only by a character offset.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from store.errors import FlexfeedError

EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow")
CSV_MAX_CELL_CHARS = 2**30  # the csv module's default (128 KiB) refuses long documents
_JSON_HINT = "a .json file holds a list of objects [{...}, {...}], a .jsonl file one object per line"


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_error(path: Path, row: int, exc: json.JSONDecodeError) -> FlexfeedError:
    return FlexfeedError(
        f"{path}, row {row}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
        "fix or remove that row (truncated or unquoted text?); " + _JSON_HINT,
    )


def _too_deep(path: Path, row: int) -> FlexfeedError:
    return FlexfeedError(f"{path}, row {row}: JSON nested too deeply", "rows are flat objects of text columns")


def _check_object(path: Path, row: int, obj) -> dict:
    if not isinstance(obj, dict):
        raise FlexfeedError(f"{path}, row {row}: expected an object {{...}}, got {type(obj).__name__}",
                            "each row must be a JSON object mapping column names to values")
    return obj


def _read_json_array(path: Path, text: str, start: int) -> list[dict]:
    decoder = json.JSONDecoder()
    rows: list[dict] = []
    i = _skip_ws(text, start + 1)
    if i < len(text) and text[i] == "]":
        return rows
    while True:
        row = len(rows) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise _json_error(path, row, exc) from None
        except RecursionError:
            raise _too_deep(path, row) from None
        rows.append(_check_object(path, row, obj))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            if _skip_ws(text, i + 1) != len(text):
                raise FlexfeedError(f"{path}: unexpected text after the closing ']'", _JSON_HINT)
            return rows
        where = "end of file" if i >= len(text) else repr(text[i])
        raise FlexfeedError(f"{path}, row {row}: expected ',' or ']' after the row, found {where}",
                            "the file looks truncated or a comma is missing; " + _JSON_HINT)


def _read_json_lines(path: Path, text: str) -> list[dict]:
    rows: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = len(rows) + 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if row == 1 and lineno == 1 and line.strip() == "{":
                raise FlexfeedError(f"{path}: a pretty-printed JSON object is not a list of rows",
                                    _JSON_HINT) from None
            exc.lineno = lineno
            raise _json_error(path, row, exc) from None
        except RecursionError:
            raise _too_deep(path, row) from None
        rows.append(_check_object(path, row, obj))
    return rows


def read_json(path: Path) -> list[dict]:
    """Rows of a JSON array file or a JSON-lines file (either extension)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FlexfeedError(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None
    start = _skip_ws(text, 0)
    if start < len(text) and text[start] == "[":
        return _read_json_array(path, text, start)
    return _read_json_lines(path, text)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file with a header; every cell is text, empty cells are None."""
    # the stdlib reader keeps every cell a string, so "42" in an answer column stays text
    csv.field_size_limit(max(csv.field_size_limit(), CSV_MAX_CELL_CHARS))  # long documents are rows too
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                return []
            for row_no, row in enumerate(reader, start=1):
                if None in row:
                    raise FlexfeedError(f"{path}, row {row_no}: more cells than header columns",
                                        "quote cells that contain commas")
                rows.append({k: (v if v != "" else None) for k, v in row.items()})
    except UnicodeDecodeError as exc:
        raise FlexfeedError(f"{path}: not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from None
    except csv.Error as exc:
        raise FlexfeedError(f"{path}, row {len(rows) + 1}: malformed CSV: {exc}",
                            "check the quoting of that row") from None
    return rows


def _read_table(path: Path):
    # pyarrow takes a while to import: only parquet and arrow files need it (json and csv do not)
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path)
    # datasets writes the IPC stream format; other tools write the IPC file format
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def read_table(path: Path) -> list[dict]:
    """Rows of a parquet or arrow (IPC stream or file) table."""
    try:
        return _read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise FlexfeedError(f"{path}: cannot read as {path.suffix[1:]}: {exc}",
                            "check the file is complete and has the right extension") from None


def read_file(path: Path) -> list[dict]:
    """Rows of one data file, chosen by its extension."""
    if path.suffix in (".json", ".jsonl"):
        return read_json(path)
    if path.suffix == ".csv":
        return read_csv(path)
    if path.suffix in (".parquet", ".arrow"):
        return read_table(path)
    raise FlexfeedError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}",
                        f"convert it to one of {', '.join(EXTENSIONS)}")


def _read_saved_dataset(path: Path, split: str) -> list[tuple[Path, list[dict]]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise FlexfeedError(f"{path}: no split {split!r}", f"set split to one of {', '.join(loaded)}")
        loaded = loaded[split]
    return [(path, loaded.to_list())]


def read_source(path: Path, split: str = "train") -> list[tuple[Path, list[dict]]]:
    """(file, rows) for a data file, a folder of data files, or a `save_to_disk` folder."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _read_saved_dataset(path, split)
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FlexfeedError(f"{path}: the folder holds no data files", f"add {', '.join(EXTENSIONS)} files")
        kinds = {p.suffix for p in files}
        if len(kinds) > 1:
            raise FlexfeedError(f"{path}: the folder mixes file types {', '.join(sorted(kinds))}",
                                "keep one file type per dataset folder")
    else:
        raise FlexfeedError(f"data file {path} does not exist",
                            "check file_name in dataset_info.json (relative to dataset_dir)")
    if split != "train":
        raise FlexfeedError(f"{path}: split {split!r} requested, but a plain data file has only 'train'",
                            "remove 'split' or use a datasets save_to_disk folder with that split")
    return [(f, read_file(f)) for f in files]
