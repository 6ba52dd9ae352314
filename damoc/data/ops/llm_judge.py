"""LLM-judge quality score: the judge model's next-token distribution over the digits 1..5
after a rating prompt, read as an expected score (sum of d * p(d), renormalised over digits).
The prompt is a file users can edit ({instruction}, {input}, {output} are filled in)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from damoc.data.ops import Params, RowOp, alive_mask, mark, register, report

DEFAULT_PROMPT = Path(__file__).resolve().parents[1] / "prompts" / "judge.txt"
DIGITS = "12345"


class JudgeParams(Params):
    model: str  # local folder or hub id of the judge model
    prompt_file: str | None = None
    min_score: float | None = None  # drop rows scored below this (none by default)
    max_length: int = 512
    trust_remote_code: bool = False
    chat: bool | None = None  # the prompt as a user turn of the judge's chat template; None: when it has one


def expected_digit(logits: np.ndarray, digit_ids: list[int]) -> np.ndarray:
    """Expected score over the digit tokens' softmax (renormalised over the five digits)."""
    z = logits[:, digit_ids].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p @ np.arange(1, len(digit_ids) + 1, dtype=np.float64)


class JudgeScorer:
    """Callable class for `map_batches` on an actor pool: the judge is loaded once per actor."""

    def __init__(self, params: dict, tally=None):
        from damoc.lm.load import load_causal_lm

        self.p, self.tally = JudgeParams(**params), tally
        self.template = Path(self.p.prompt_file or DEFAULT_PROMPT).read_text(encoding="utf-8")
        self.tok, self.model = load_causal_lm(self.p.model, trust_remote_code=self.p.trust_remote_code)
        self.digit_ids = []
        for d in DIGITS:
            ids = self.tok(d, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"judge tokenizer splits the digit {d!r} into {len(ids)} tokens")
            self.digit_ids.append(ids[0])
        self.tok.padding_side = "left"  # the next token is read at the last position
        self.chat = self.p.chat if self.p.chat is not None else bool(getattr(self.tok, "chat_template", None))

    def render(self, text: str) -> str:
        """The filled prompt, as a user turn of the chat template for an instruct judge."""
        if not self.chat:
            return text
        return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)

    def scores(self, prompts: list[str]) -> np.ndarray:
        import torch

        enc = self.tok([self.render(p) for p in prompts], return_tensors="pt", padding=True, truncation=True,
                       max_length=self.p.max_length, add_special_tokens=not self.chat)
        with torch.no_grad():
            logits = self.model(**enc).logits[:, -1].float().numpy()
        return expected_digit(logits, self.digit_ids)

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        alive = alive_mask(df)
        df["judge"] = np.nan
        if alive.any():
            sub = df[alive]
            prompts = [self.template.format(instruction=i, input=x, output=o)
                       for i, x, o in zip(sub["instruction"], sub["input"], sub["output"])]
            df.loc[alive, "judge"] = self.scores(prompts)
        if self.p.min_score is not None:
            mark(df, alive & (df["judge"] < self.p.min_score).to_numpy(), f"judge<{self.p.min_score:g}")
        if self.tally is not None:
            report(self.tally, "llm_judge", time.perf_counter() - t0, int(alive.sum()), int(alive_mask(df).sum()))
        return df


@register
class LlmJudge(RowOp):
    """Runs on its own actor pool (see the stage); `apply` is not used in-process."""

    name = "llm_judge"
    Params = JudgeParams
    actor_class = JudgeScorer

    def actor_kwargs(self, resolve, tally) -> dict:
        params = self.p.model_dump()
        params["model"] = resolve(params["model"])
        if params.get("prompt_file"):
            params["prompt_file"] = resolve(params["prompt_file"])
        return {"params": params, "tally": tally}

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:  # pragma: no cover - actor path only
        raise RuntimeError("llm_judge runs on an actor pool")


