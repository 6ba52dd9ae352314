"""Evaluation metrics on generated answers: exact match and ROUGE-L.

Pure functions on text and numbers; the loop feeds them.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lower case, runs of anything but [a-z0-9] split words, no stemming
    and no stop-word removal (articles count, unlike the SQuAD normalisation exact match uses)."""
    return _ROUGE_TOKEN.sub(" ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as the rouge-score package computes it (its default tokenizer, no stemming)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def first_line(text: str) -> str:
    """A generated answer ends at the first newline (the template puts one answer per line)."""
    return text.strip().split("\n", 1)[0].strip()
