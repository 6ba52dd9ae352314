"""Rule heuristics: length bounds, repetition, special-character ratio."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from damoc.data.ops import Params, RowOp, alive_mask, mark, register

_WORD = re.compile(r"\w+")
_PLAIN = re.compile(r"[^\W_]|\s")  # letters, digits, whitespace: what is not a special character


def repetition_ratio(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 = none repeat)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def special_ratio(text: str) -> float:
    """Fraction of characters that are neither letters, digits nor whitespace."""
    return 0.0 if not text else len(_PLAIN.sub("", text)) / len(text)


class RulesParams(Params):
    min_output_chars: int = 1
    max_chars: int = 20_000  # instruction + input + output
    max_repetition: float = 0.6
    max_special_ratio: float = 0.5


@register
class Rules(RowOp):
    name = "rules"
    Params = RulesParams

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        text = df["instruction"] + "\n" + df["input"] + "\n" + df["output"]
        df["chars"] = text.str.len().astype(np.int64)
        df["repetition"] = [repetition_ratio(t) for t in df["output"]]
        df["special_ratio"] = [special_ratio(t) for t in text]
        alive = alive_mask(df)
        p = self.p
        mark(df, alive & (df["output"].str.strip().str.len() < p.min_output_chars).to_numpy(), "rules:too_short")
        mark(df, alive & (df["chars"] > p.max_chars).to_numpy(), "rules:too_long")
        mark(df, alive & (df["repetition"] > p.max_repetition).to_numpy(), "rules:repetitive")
        mark(df, alive & (df["special_ratio"] > p.max_special_ratio).to_numpy(), "rules:special_chars")
        return df
