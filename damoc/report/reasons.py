"""Drop reasons in words, with the code beside them (the manifest and dropped.parquet keep the codes)."""

from __future__ import annotations

import re

WORDS = {
    "held_out_eval": "held out for evaluation",
    "near_duplicate": "near-duplicate of an earlier row (MinHash)",
    "deita:too_similar": "too similar to a row already kept (DEITA)",
    "deita:below_budget": "beyond the keep budget, by quality (DEITA)",
    "k_center:not_selected": "not among the k-center picks",
    "cluster_balance:over_share": "beyond its cluster's share of the budget",
    "rules:too_short": "answer too short",
    "rules:too_long": "row too long",
    "rules:repetitive": "answer repeats itself",
    "rules:special_chars": "too many special characters",
}
PATTERNS = [
    (re.compile(r"^ifd>(.+)$"), "the instruction does not help (IFD > {0})"),
    (re.compile(r"^top_k:below_budget\((.+)\)$"), "beyond the keep budget, by {0}"),
    (re.compile(r"^judge<(.+)$"), "LLM judge score below {0}"),
    (re.compile(r"^perplexity>(.+)$"), "answer perplexity above {0}"),
]


def describe(code: str) -> str:
    """'ifd>1' -> 'the instruction does not help (IFD > 1) [ifd>1]'."""
    if code in WORDS:
        return f"{WORDS[code]} [{code}]"
    for pattern, words in PATTERNS:
        m = pattern.match(code)
        if m:
            return f"{words.format(*m.groups())} [{code}]"
    return code
