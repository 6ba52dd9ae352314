"""k-center greedy coreset on embeddings: repeatedly add the row farthest from those chosen.
Per block first (an oversampled share of the budget), then over the blocks' survivors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, collect, embeddings, register
from damoc.data.select import k_center


class KCenterParams(Params):
    oversample: float = 2.0
    block_rows: int = 4096


@register
class KCenter(Selector):
    name = "k_center"
    Params = KCenterParams
    needs_embedding = True
    budgeted = True

    def select(self, alive, budget, ctx: SelectContext) -> dict[str, str]:
        ids = collect(alive, ["id"])["id"]
        if budget is None or budget >= len(ids):
            return {}
        share = self.p.oversample * budget / max(1, len(ids))

        def pre(df: pd.DataFrame) -> pd.DataFrame:
            q = math.ceil(share * len(df))
            idx = k_center(embeddings(df["embedding"]), q, df["order"].to_numpy())
            return df.iloc[np.sort(idx)][["id", "order", "embedding"]]

        surv = collect(alive.select_columns(["id", "order", "embedding"])
                       .map_batches(pre, batch_format="pandas", batch_size=self.p.block_rows),
                       ["id", "order", "embedding"])
        chosen = k_center(embeddings(surv["embedding"]), budget, surv["order"])
        keep = set(surv["id"][chosen])
        return {i: "k_center:not_selected" for i in ids if i not in keep}
