"""Keep the `keep_ratio` budget of rows with the highest score (default: IFD, high first)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, dropped, register
from damoc.data.select import top_k


class TopKParams(Params):
    score: str = "ifd"
    higher_is_better: bool = True


@register
class TopK(Selector):
    name = "top_k"
    Params = TopKParams
    budgeted = True

    @property
    def needs_lm(self) -> bool:  # type: ignore[override]
        return self.p.score in ("ifd", "ppl", "ce_cond", "ce_alone")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.p.score,)

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> pd.Series:
        if budget is None or budget >= len(alive):
            return dropped([], [])
        s = alive[self.p.score].to_numpy(np.float64)
        order = alive["order"].to_numpy()
        kept = np.zeros(len(s), dtype=bool)
        kept[top_k(s if self.p.higher_is_better else -s, order, budget)] = True
        return dropped(order[~kept], f"top_k:below_budget({self.p.score})")
