"""Answer perplexity under the reference LM; rows above `max_ppl` are dropped (none by default)."""

from __future__ import annotations

import pandas as pd

from damoc.data.ops import Params, RowOp, alive_mask, mark, register


class PplParams(Params):
    max_ppl: float | None = None


@register
class PerplexityFilter(RowOp):
    name = "perplexity_filter"
    Params = PplParams
    needs_lm = True

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.p.max_ppl is not None:
            mark(df, alive_mask(df) & (df["ppl"] > self.p.max_ppl).to_numpy(), f"perplexity>{self.p.max_ppl:g}")
        return df
