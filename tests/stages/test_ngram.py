"""The `ngram` stage: hashed word and word-pair counts checked against a pure-Python count, its key, its args."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from stages.ngram import NgramArgs, NgramStage
from store.errors import FlexfeedError

MASK = 2**64 - 1


def _hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _reference_counts(words: list[str], max_n: int, buckets: int) -> np.ndarray:
    """Python integers: an n-gram's hash folds its words' hashes in, one word at a time."""
    keys = []
    for start in range(len(words)):
        h = _hash(words[start])
        keys.append(h)
        for n in range(2, max_n + 1):
            if start + n > len(words):
                break
            h = _mix((h * 0x9E3779B97F4A7C15 + _hash(words[start + n - 1]) + n) & MASK)
            keys.append(h)
    out = np.zeros(buckets)
    for key, count in Counter(k % buckets for k in keys).items():
        out[key] = count
    return out


def test_counts_words_and_word_pairs_by_hashed_bucket():
    text = "The cat. the CAT sat!"
    # by hand: lowercased words and punctuation runs: the, cat, ., the, cat, sat, !  (7 words, 6 pairs)
    words = ["the", "cat", ".", "the", "cat", "sat", "!"]
    stage = NgramStage(NgramArgs(num_buckets=1 << 20))
    counts = stage.compute({"text": [text, ""]})
    assert counts.shape == (2, 1 << 20)
    assert counts[0].sum() == 13 and counts[1].sum() == 0
    np.testing.assert_array_equal(counts[0], _reference_counts(words, 2, 1 << 20))
    # "the cat" twice: its bucket (with 2^20 buckets, no collision among 13 n-grams here) holds 2
    assert sorted(counts[0][counts[0] > 0].tolist()) == [1] * 7 + [2] * 3


@pytest.mark.parametrize("max_n,buckets", [(1, 64), (3, 97)])
def test_collisions_and_longer_ngrams_match_the_reference(max_n, buckets):
    text = "a b a b c, d; a b c d e f a b"
    counts = NgramStage(NgramArgs(num_buckets=buckets, max_n=max_n)).compute({"text": [text]})
    words = ["a", "b", "a", "b", "c", ",", "d", ";", "a", "b", "c", "d", "e", "f", "a", "b"]
    np.testing.assert_array_equal(counts[0], _reference_counts(words, max_n, buckets))
    assert counts[0].sum() == sum(max(len(words) - n + 1, 0) for n in range(1, max_n + 1))


def test_case_kept_when_asked_and_the_key_names_the_rule():
    lower = NgramStage(NgramArgs(num_buckets=1 << 16, max_n=1)).compute({"text": ["Word word"]})
    kept = NgramStage(NgramArgs(num_buckets=1 << 16, max_n=1, lowercase=False)).compute({"text": ["Word word"]})
    assert lower[0].max() == 2 and kept[0].max() == 1
    specs = [NgramStage(NgramArgs(**kw)).signal() for kw in ({}, {"num_buckets": 1024}, {"max_n": 3})]
    assert len({str(sorted(s.spec.items())) for s in specs}) == 3
    assert specs[0].name == "ngram" and specs[0].dim == 4096 and specs[0].dtype == "float16"
    assert all("model" not in s.spec for s in specs)


def test_args_are_range_checked():
    for bad in ({"num_buckets": 8}, {"max_n": 0}, {"max_n": 9}):
        with pytest.raises(FlexfeedError):
            NgramArgs(**bad)
