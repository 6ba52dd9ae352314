"""Keep the `keep_ratio` budget of rows with the highest score (default: IFD, high first)."""

from __future__ import annotations

import numpy as np

from damoc.data.ops import Params, SelectContext, Selector, collect, register
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

    def select(self, alive, budget, ctx: SelectContext) -> dict[str, str]:
        cols = collect(alive, ["id", "order", self.p.score])
        if budget is None or budget >= len(cols["id"]):
            return {}
        s = cols[self.p.score].astype(np.float64)
        keep = top_k(s if self.p.higher_is_better else -s, cols["order"], budget)
        kept = np.zeros(len(s), dtype=bool)
        kept[keep] = True
        return {i: f"top_k:below_budget({self.p.score})" for i in cols["id"][~kept]}
