"""A small multi-domain demo corpus made on the spot from text every Python installation carries.

Five clearly different domains (interpreter documentation, standard-library code, docstrings,
arithmetic, templated instructions), each written as an alpaca dataset and a plain-text (`_pt`)
twin, plus per-domain held-out validation sets and a target set drawn from one domain. Nothing is
downloaded; the same seed and Python version give the same bytes.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import sysconfig
import textwrap
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from store.errors import FlexfeedError

DOMAINS = ("pydoc", "stdlib_code", "docstrings", "arithmetic", "instructions")
MAX_CHARS = 600  # bounds each row's text so a 128-256 token cutoff keeps most of it
MIN_CHARS = 80  # shorter pieces carry too little text to learn or score
CODE_PER_FILE = 3  # functions taken from one stdlib file, so many files contribute
INFO_FILE = "dataset_info.json"
# Modules whose contents are the same on every operating system (os, shutil, subprocess are not).
DOC_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.utils", "enum", "fnmatch", "fractions", "functools",
    "gzip", "heapq", "html", "ipaddress", "itertools", "json", "logging", "math", "numbers", "operator", "pprint",
    "queue", "random", "re", "sched", "shlex", "statistics", "string", "tarfile", "textwrap", "tokenize",
    "unittest", "urllib.parse", "uuid", "zipfile",
)


def _row(instruction: str, input_text: str, output: str, text: str) -> dict:
    return {"instruction": instruction, "input": input_text, "output": output, "text": text}


def _split_passage(text: str, instruction: str, at_lines: bool) -> dict:
    # the prompt is roughly the first 40% (cut at a line or word boundary), the answer the rest
    cut = int(len(text) * 0.4)
    sep = "\n" if at_lines else " "
    pos = text.rfind(sep, 0, cut)
    pos = pos if pos > 0 else text.find(sep, cut)
    if pos <= 0:
        pos = cut
    return _row(instruction, text[:pos].rstrip(), text[pos:].lstrip(sep).strip(), text)


def _chunks(text: str) -> Iterator[str]:
    """Paragraph-aligned pieces of at most MAX_CHARS characters (long paragraphs cut at words)."""
    piece = ""
    for para in re.split(r"\n\s*\n", text):
        para = re.sub(r"[ \t]+", " ", para.strip())
        while len(para) > MAX_CHARS:
            cut = para.rfind(" ", 0, MAX_CHARS)
            cut = cut if cut > MIN_CHARS else MAX_CHARS
            yield from ([piece] if piece else [])
            piece = ""
            yield para[:cut]
            para = para[cut:].lstrip()
        if piece and len(piece) + 2 + len(para) > MAX_CHARS:
            yield piece
            piece = ""
        piece = f"{piece}\n\n{para}" if piece else para
    if piece:
        yield piece


def pydoc_rows(need: int, rng: random.Random) -> list[dict]:
    """Passages of the interpreter's documentation topics."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FlexfeedError("this Python has no pydoc_data (documentation topics)",
                            "use a full Python installation, or build the corpus with another Python") from None
    passages = [c for name in sorted(topics) for c in _chunks(topics[name]) if len(c) >= MIN_CHARS]
    rng.shuffle(passages)
    return [_split_passage(p, "Continue the documentation:", at_lines=False) for p in passages[:need]]


def _functions(path: Path) -> Iterator[str]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return  # a file this Python cannot read or parse is simply not used
    lines = source.splitlines(keepends=True)  # sliced by line numbers: get_source_segment re-splits per call
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            piece = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            if len(piece) > MAX_CHARS:  # keep whole leading lines up to the bound
                piece = piece[: piece.rfind("\n", 0, MAX_CHARS)]
            if len(piece) >= MIN_CHARS and piece.count("\n") >= 2:
                yield piece.rstrip()


def stdlib_code_rows(need: int, rng: random.Random) -> list[dict]:
    """Function-sized pieces of standard-library source, a few per file, files in a seeded order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    pieces: list[str] = []
    for path in files:
        pieces += islice(_functions(path), CODE_PER_FILE)
        if len(pieces) >= need:
            break
    return [_split_passage(p, "Continue the Python code:", at_lines=True) for p in pieces[:need]]


def _documented(modname: str) -> Iterator[tuple[str, str]]:
    """Docstrings read from the module's source (not imported: other libraries may patch the stdlib)."""
    spec = importlib.util.find_spec(modname)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    nodes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in sorted((n for n in tree.body if isinstance(n, nodes)), key=lambda n: n.name):
        if node.name.startswith("_"):
            continue
        yield f"{modname}.{node.name}", ast.get_docstring(node) or ""
        if isinstance(node, ast.ClassDef):
            methods = (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
            for member in sorted(methods, key=lambda n: n.name):
                if not member.name.startswith("_"):
                    yield f"{modname}.{node.name}.{member.name}", ast.get_docstring(member) or ""


def docstring_rows(need: int, rng: random.Random) -> list[dict]:
    """Docstrings of public functions, classes and methods of a fixed list of stdlib modules."""
    found = [(name, doc) for mod in DOC_MODULES for name, doc in _documented(mod) if len(doc) >= MIN_CHARS]
    rng.shuffle(found)
    rows = []
    for name, doc in found[:need]:
        doc = next(_chunks(doc))  # the first paragraphs, bounded
        rows.append(_row(f"Describe the Python object `{name}`.", "", doc, f"{name}: {doc}"))
    return rows


def _qa(question: str, answer: str) -> dict:
    return _row(question, "", answer, f"{question}\n{answer}")


def _arithmetic(rng: random.Random) -> dict:
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
    kind = rng.randrange(5)
    if kind == 0:
        return _qa(f"What is {a} + {b}?", str(a + b))
    if kind == 1:
        return _qa(f"What is {a} - {b}?", str(a - b))
    if kind == 2:
        return _qa(f"What is {a} * {c}?", str(a * c))
    if kind == 3:
        return _qa(f"What is {a} divided by {c}, rounded down, and what is the remainder?",
                   f"{a // c} remainder {a % c}")
    return _qa(f"Compute ({a} + {b}) * {c}.", str((a + b) * c))


def _instruction(rng: random.Random, words: list[str]) -> dict:
    kind = rng.randrange(6)
    if kind == 0:
        w = rng.choice(words)
        return _qa(f"Reverse the word {w}.", w[::-1])
    if kind == 1:
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
        return _qa(f"Sort these numbers: {', '.join(map(str, nums))}.", ", ".join(map(str, sorted(nums))))
    if kind == 2:
        picked = rng.sample(words, rng.randint(3, 5))
        return _qa(f"Put these words in alphabetical order: {' '.join(picked)}.", " ".join(sorted(picked)))
    if kind == 3:
        w = rng.choice(words)
        return _qa(f"How many vowels are in the word {w}?", str(sum(ch in "aeiou" for ch in w)))
    if kind == 4:
        w = rng.choice(words)
        return _qa(f"Write the word {w} in capital letters.", w.upper())
    nums = [rng.randint(0, 999) for _ in range(rng.randint(3, 6))]
    return _qa(f"Which is the largest of {', '.join(map(str, nums))}?", str(max(nums)))


def _unique(make: Callable[[], dict], need: int) -> list[dict]:
    # repeated questions would leak training rows into validation and target sets
    seen: set[str] = set()
    rows = []
    for _ in range(need * 50):
        row = make()
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
            if len(rows) == need:
                break
    return rows


def arithmetic_rows(need: int, rng: random.Random) -> list[dict]:
    """Seeded arithmetic questions with their answers."""
    return _unique(lambda: _arithmetic(rng), need)


def instruction_rows(need: int, rng: random.Random) -> list[dict]:
    """Seeded templated instructions (reverse, sort, count, ...) with their answers."""
    from pydoc_data.topics import topics

    # the word list comes from the documentation topics, so no list of words ships with the code
    words = sorted({w.lower() for text in topics.values() for w in re.findall(r"\b[A-Za-z]{4,10}\b", text)})
    return _unique(lambda: _instruction(rng, words), need)


GENERATORS: dict[str, Callable[[int, random.Random], list[dict]]] = {
    "pydoc": pydoc_rows, "stdlib_code": stdlib_code_rows, "docstrings": docstring_rows,
    "arithmetic": arithmetic_rows, "instructions": instruction_rows,
}


def _write(path: Path, rows: list[dict], pt: bool, as_lines: bool) -> None:
    rows = [{"text": r["text"]} if pt else {k: r[k] for k in ("instruction", "input", "output")} for r in rows]
    if as_lines:
        path.write_text("".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows),
                        encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=True, sort_keys=True, indent=1) + "\n", encoding="utf-8")


def _entries(info: dict, out: Path, name: str, rows: list[dict], as_lines: bool) -> None:
    ext = "jsonl" if as_lines else "json"
    for pt in (False, True):
        full = f"{name}_pt" if pt else name
        _write(out / f"{full}.{ext}", rows, pt, as_lines)
        info[full] = {"file_name": f"{full}.{ext}", "formatting": "alpaca"}
        if pt:
            info[full]["columns"] = {"prompt": "text"}


def build_corpus(out_dir: str | Path, rows_per_domain: int = 200, target_rows: int = 40, seed: int = 0,
                 target_domain: str = "arithmetic", val_rows: int = 20) -> dict:
    """Write the demo corpus (dataset_info.json and data files) to out_dir; returns its dataset names."""
    for what, value in (("rows_per_domain", rows_per_domain), ("target_rows", target_rows), ("val_rows", val_rows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FlexfeedError(f"{what} must be a positive integer, got {value!r}", f"e.g. {what}=20")
    if target_domain not in GENERATORS:
        raise FlexfeedError(f"unknown target_domain {target_domain!r}", f"choose one of {', '.join(DOMAINS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict] = {}
    for name, make in GENERATORS.items():
        need = rows_per_domain + val_rows + (target_rows if name == target_domain else 0)
        rows = make(need, random.Random(f"flexfeed-demo/{seed}/{name}"))
        if len(rows) < need:
            raise FlexfeedError(f"domain {name!r} yields only {len(rows)} rows of the {need} asked for",
                                f"lower rows_per_domain (at most {len(rows) - (need - rows_per_domain)} here)")
        # disjoint slices of one de-duplicated, shuffled pool: train, then validation, then target
        _entries(info, out, name, rows[:rows_per_domain], as_lines=True)
        _entries(info, out, f"{name}_val", rows[rows_per_domain:rows_per_domain + val_rows], as_lines=False)
        if name == target_domain:
            _entries(info, out, "target", rows[rows_per_domain + val_rows:need], as_lines=False)
    (out / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {"datasets": list(DOMAINS), "target": "target", "val": [f"{n}_val" for n in DOMAINS],
            "target_domain": target_domain, "dir": str(out)}


def corpus_texts(out_dir: str | Path) -> list[str]:
    """Every row of the corpus as one string (all columns joined), to train a tokenizer on."""
    out = Path(out_dir)
    try:
        info = json.loads((out / INFO_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlexfeedError(f"no {INFO_FILE} in {out}", "build the corpus first (build_corpus)") from None
    texts = []
    for entry in info.values():
        path = out / entry["file_name"]
        raw = path.read_text(encoding="utf-8")
        rows = json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in raw.splitlines() if line]
        texts += ["\n".join(v for v in row.values() if v) for row in rows]
    return texts
