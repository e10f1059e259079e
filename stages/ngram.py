"""Hashed n-gram counts of each row's text (signal `ngram`): DSIR's features, computed without a model.

The text is lowercased and split into words and runs of punctuation (`\\w+|[^\\w\\s]+`, nltk's WordPunct rule, as
DSIR's default tokenizer); every n-gram of 1 to `max_n` words is hashed into one of `num_buckets` buckets, and
the row's vector counts the n-grams per bucket. Words are hashed with blake2b (the same on every machine and
Python process, unlike `hash()`); an n-gram's hash mixes its words' hashes (splitmix64), so a shard is hashed
with numpy once its words are. Unigrams and longer n-grams share the buckets, as in DSIR.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from stages.base import SignalDesc, Stage
from stages.values import bounded, check_fields

WORD = re.compile(r"\w+|[^\w\s]+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(kw_only=True)
class NgramArgs:
    """The hashed n-gram count stage (section `ngram:`), read by `dsir`."""

    num_buckets: int = bounded(4096, low=16, high=2**20)
    """Width of each row's count vector: n-grams are hashed into this many buckets (DSIR uses 10000; fewer buckets mean more collisions and a smaller store, 2 bytes per bucket and row)."""
    max_n: int = bounded(2, low=1, high=5)
    """Longest n-gram counted: 2 counts words and word pairs (DSIR's unigrams and bigrams)."""
    lowercase: bool = True
    """Lowercase the text before splitting it into words (DSIR)."""

    def __post_init__(self):
        check_fields(self)


def words_of(text: str, lowercase: bool = True) -> list[str]:
    """The row's words and punctuation runs, in order."""
    return WORD.findall(text.lower() if lowercase else text)


def word_hash(word: str) -> int:
    """A 64-bit hash of one word, the same on every machine."""
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output (uint64, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(word_hashes: np.ndarray, max_n: int) -> np.ndarray:
    """The hashes of every n-gram (1 <= n <= max_n) of a row, given its words' hashes in order."""
    current = np.asarray(word_hashes, dtype=np.uint64)
    parts = [current]
    with np.errstate(over="ignore"):
        for n in range(2, max_n + 1):
            if current.size < 2:
                break
            # the n-gram starting at i: the (n-1)-gram at i, then the word at i + n - 1
            current = mix64(current[:-1] * _GOLDEN + word_hashes[n - 1:].astype(np.uint64) + np.uint64(n))
            parts.append(current)
    return np.concatenate(parts)


class NgramCounter:
    """Count vectors of texts; word hashes are cached across the rows of a shard."""

    def __init__(self, args: NgramArgs):
        self.args = args
        self._cache: dict[str, int] = {}

    def hashes(self, text: str) -> np.ndarray:
        cache = self._cache
        out = []
        for word in words_of(text, self.args.lowercase):
            h = cache.get(word)
            if h is None:
                h = cache[word] = word_hash(word)
            out.append(h)
        return np.array(out, dtype=np.uint64)

    def counts(self, texts: list[str]) -> np.ndarray:
        """(rows, num_buckets) n-gram counts."""
        width = self.args.num_buckets
        out = np.zeros((len(texts), width), dtype=np.float32)
        with np.errstate(over="ignore"):
            for i, text in enumerate(texts):
                keys = ngram_hashes(self.hashes(text), self.args.max_n)
                if keys.size:
                    out[i] = np.bincount((keys % np.uint64(width)).astype(np.int64), minlength=width)
        return out


class NgramStage(Stage):
    """Signal `ngram`: hashed n-gram counts of each row's text (float16: counts exact up to 2048 per bucket)."""

    code_version = "ngram-1"

    def __init__(self, args: NgramArgs):
        self.args = args

    def signal(self) -> SignalDesc:
        """Keyed by the counting rule (buckets, n, case, word split and hash), never by a model."""
        spec = {"kind": "ngram", "num_buckets": self.args.num_buckets, "max_n": self.args.max_n,
                "lowercase": self.args.lowercase, "words": WORD.pattern, "hash": "blake2b64+splitmix64",
                "code": self.code_version}
        return SignalDesc("ngram", spec, "float16", self.args.num_buckets)

    def compute(self, rows: dict[str, list]) -> np.ndarray:
        return NgramCounter(self.args).counts(list(rows["text"]))
