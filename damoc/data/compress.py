"""Token compression (Selective Context / LLMLingua family): keep the prompt tokens that carry
the most self-information -log p(x_t | x_<t) under the reference LM, up to `ratio`, in their
order. Forced tokens (digits, newlines, '?', ':' and any the spec adds) are never dropped,
and the answer is left alone unless the spec says otherwise. Text is rebuilt from the
original characters: a kept token brings the whitespace before it."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

from damoc.data.lm import PROMPT_SEP, LMScorer, prompt_of

DEFAULT_FORCED = ("\n", "?", ":")


def is_forced(piece: str, forced: tuple[str, ...]) -> bool:
    return any(c.isdigit() for c in piece) or any(f in piece for f in forced)


def keep_mask(info: list[float], pieces: list[str], ratio: float, forced: tuple[str, ...]) -> np.ndarray:
    """Which tokens stay: every forced token, then the most informative, up to ceil(ratio*n)."""
    n = len(info)
    keep = np.array([is_forced(p, forced) for p in pieces], dtype=bool)
    budget = math.ceil(ratio * n) - int(keep.sum())
    if budget > 0:
        free = np.flatnonzero(~keep)
        ranked = free[np.lexsort((free, -np.asarray(info, dtype=np.float64)[free]))]
        keep[ranked[:budget]] = True
    return keep


def covers(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Each token's span widened back to the previous token's end (its leading whitespace)."""
    out, prev = [], 0
    for _, end in spans:
        out.append((prev, max(prev, end)))
        prev = max(prev, end)
    if out:
        out[-1] = (out[-1][0], length)  # trailing text rides with the last token
    return out


def rebuild(text: str, cov: list[tuple[int, int]], keep: np.ndarray, lo: int, hi: int) -> str:
    return "".join(text[max(a, lo):min(b, hi)] for (a, b), k in zip(cov, keep) if k and a < hi and b > lo)


class Compressor(LMScorer):
    """Callable class for `map_batches`: compresses instruction and input of kept rows and
    records prompt tokens before and after (in the reference tokenizer's tokens)."""

    def __init__(self, model_path: str, ratio: float, forced: list[str], compress_answer: bool,
                 max_length: int = 256, trust_remote_code: bool = False):
        super().__init__(model_path, max_length=max_length, embeddings=False, trust_remote_code=trust_remote_code)
        self.ratio, self.forced, self.compress_answer = ratio, tuple(DEFAULT_FORCED) + tuple(forced), compress_answer

    def _field_tokens(self, cov, lo: int, hi: int) -> np.ndarray:
        return np.array([a < hi and b > lo for a, b in cov], dtype=bool)

    def compress_prompt(self, instruction: str, inp: str, scored=None) -> tuple[str, str, int, int]:
        text = prompt_of(instruction, inp)
        spans, info = scored if scored is not None else self.self_information(text)
        if not spans:
            return instruction, inp, 0, 0
        cov = covers(spans, len(text))
        keep = keep_mask(info, [text[a:b] for a, b in cov], self.ratio, self.forced)
        new_instr = rebuild(text, cov, keep, 0, len(instruction))
        new_inp = rebuild(text, cov, keep, len(instruction) + len(PROMPT_SEP), len(text)) if inp else ""
        return new_instr.strip(), new_inp.strip(), len(spans), int(keep.sum())

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        texts = [prompt_of(i, x) for i, x in zip(df["instruction"], df["input"])]
        scored = self.self_information_batch(texts)
        results = [self.compress_prompt(i, x, sc) for i, x, sc in zip(df["instruction"], df["input"], scored)]
        df["instruction"] = [r[0] for r in results]
        df["input"] = [r[1] for r in results]
        df["prompt_tokens_before"] = np.array([r[2] for r in results], dtype=np.int64)
        df["prompt_tokens_after"] = np.array([r[3] for r in results], dtype=np.int64)
        if self.compress_answer:
            outs = []
            for o in df["output"]:
                spans, info = self.self_information(o)
                cov = covers(spans, len(o))
                keep = keep_mask(info, [o[a:b] for a, b in cov], self.ratio, self.forced)
                outs.append(rebuild(o, cov, keep, 0, len(o)).strip() or o)
            df["output"] = outs
        return df


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def count_prompt_tokens(df: pd.DataFrame, model_path: str) -> pd.DataFrame:
    """Prompt tokens per row when compression is off (before == after). A plain task, not an
    actor pool: the tokenizer is cached per worker process, so no process is started for it."""
    tok = _tokenizer(model_path)
    prompts = [prompt_of(i, x) for i, x in zip(df["instruction"], df["input"])]
    n = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    df["prompt_tokens_before"] = df["prompt_tokens_after"] = np.array(n, dtype=np.int64)
    return df
