"""k-center greedy coreset on embeddings: repeatedly add the row farthest from those chosen.
Per block first (an oversampled share of the budget, on the cluster), then over the blocks'
survivors in the driver."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, dropped, embeddings, register
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

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> pd.Series:
        if budget is None or budget >= len(alive):
            return dropped([], [])
        share = self.p.oversample * budget / max(1, len(alive))

        def pre(df: pd.DataFrame) -> pd.DataFrame:
            idx = k_center(embeddings(df["embedding"]), math.ceil(share * len(df)), df["order"].to_numpy())
            return df.iloc[np.sort(idx)][["order", "embedding"]]

        surv = ctx.work.map_blocks(["embedding"], alive["order"], pre, self.p.block_rows)
        chosen = k_center(embeddings(surv["embedding"]), budget, surv["order"].to_numpy())
        orders = alive["order"].to_numpy()
        return dropped(orders[~np.isin(orders, surv["order"].to_numpy()[chosen])], "k_center:not_selected")
