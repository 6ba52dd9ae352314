"""DEITA-style hybrid selection: walk rows by quality score (high first) and admit a row only
if its max cosine similarity to the rows admitted so far is <= tau, until the budget is met.
Per block first (an oversampled share of the budget), then over the blocks' survivors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from damoc.data.ops import (
    Params,
    SelectContext,
    Selector,
    collect,
    embeddings,
    keep_where,
    mean_embedding,
    register,
)
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

    def select(self, alive, budget, ctx: SelectContext) -> dict[str, str]:
        p = self.p
        ids = collect(alive, ["id"])["id"]
        k = len(ids) if budget is None else min(budget, len(ids))
        share = p.oversample * k / max(1, len(ids))
        cols = ["id", "order", "embedding", "q"]

        def pre(df: pd.DataFrame) -> pd.DataFrame:
            q = quality(df, p.score)
            adm, sim = deita_admit(q, embeddings(df["embedding"]) - center, p.tau,
                                   math.ceil(share * len(df)), df["order"].to_numpy())
            out = df.iloc[np.concatenate([adm, sim])][["id", "order", "embedding"]].copy()
            out["q"] = np.concatenate([q[adm], q[sim]])
            out["similar"] = [False] * len(adm) + [True] * len(sim)
            return out

        # Mean-pooled LM states share one dominant direction (anisotropy): cosine on raw states
        # calls nearly everything similar. Centre on the corpus mean first.
        center = mean_embedding(alive)

        need = ["id", "order", "embedding"] + (["judge", "ifd"] if p.score == "judge_x_ifd" else [p.score])
        pre_ds = alive.select_columns(sorted(set(need))).map_batches(
            pre, batch_format="pandas", batch_size=p.block_rows)
        pre_ds = ctx.spill(pre_ds)
        surv = collect(keep_where(pre_ds, lambda df: ~df["similar"]), cols)
        similar = set(collect(keep_where(pre_ds, lambda df: df["similar"]), ["id"])["id"])
        emb = embeddings(surv["embedding"]) - center if len(surv["id"]) else np.zeros((0, 1))
        adm, sim = deita_admit(surv["q"], emb, p.tau, k, surv["order"])
        keep = set(surv["id"][adm])
        similar |= set(surv["id"][sim])
        return {i: ("deita:too_similar" if i in similar else "deita:below_budget")
                for i in ids if i not in keep}
