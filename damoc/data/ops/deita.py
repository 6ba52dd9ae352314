"""DEITA-style hybrid selection: walk rows by quality score (high first) and admit a row only
if its max cosine similarity to the rows admitted so far is <= tau, until the budget is met.
Per block first (an oversampled share of the budget, on the cluster), then over the blocks'
survivors in the driver."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, dropped, embeddings, register
from damoc.data.select import deita_admit


class DeitaParams(Params):
    score: str = "ifd"  # a stats column; "judge_x_ifd" multiplies the judge score by IFD
    tau: float = 0.9
    oversample: float = 2.0
    block_rows: int = 4096


def quality(df: pd.DataFrame, score: str) -> np.ndarray:
    if score == "judge_x_ifd":
        return (df["judge"] * df["ifd"]).to_numpy(np.float64)
    return df[score].to_numpy(np.float64)


@register
class Deita(Selector):
    name = "deita"
    Params = DeitaParams
    needs_lm = True
    needs_embedding = True
    budgeted = True

    @property
    def columns(self) -> tuple[str, ...]:
        return ("judge", "ifd") if self.p.score == "judge_x_ifd" else (self.p.score,)

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> pd.Series:
        p = self.p
        orders = alive["order"].to_numpy()
        k = len(orders) if budget is None else min(budget, len(orders))
        share = p.oversample * k / max(1, len(orders))
        # Mean-pooled LM states share one dominant direction (anisotropy): cosine on raw states
        # calls nearly everything similar. Centre on the mean of the rows still alive first.
        center = ctx.work.mean_embedding(orders)

        def pre(df: pd.DataFrame) -> pd.DataFrame:
            q = quality(df, p.score)
            adm, sim = deita_admit(q, embeddings(df["embedding"]) - center, p.tau,
                                   math.ceil(share * len(df)), df["order"].to_numpy())
            out = df.iloc[np.concatenate([adm, sim])][["order", "embedding"]].copy()
            out["q"] = np.concatenate([q[adm], q[sim]])
            out["similar"] = [False] * len(adm) + [True] * len(sim)
            return out

        got = ctx.work.map_blocks(["embedding", *self.columns], orders, pre, p.block_rows)
        surv = got[~got["similar"].to_numpy(bool)]
        similar = set(got.loc[got["similar"].to_numpy(bool), "order"].tolist())
        emb = embeddings(surv["embedding"]) - center if len(surv) else np.zeros((0, 1))
        adm, sim = deita_admit(surv["q"].to_numpy(np.float64), emb, p.tau, k, surv["order"].to_numpy())
        similar |= set(surv["order"].to_numpy()[sim].tolist())
        gone = orders[~np.isin(orders, surv["order"].to_numpy()[adm])]
        return dropped(gone, np.where(np.isin(gone, list(similar)), "deita:too_similar", "deita:below_budget"))
