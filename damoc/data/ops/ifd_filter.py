"""IFD (Cherry): IFD = CE(answer | instruction) / CE(answer). IFD > 1: the instruction does not
help predict the answer, so the pair is not a useful instruction sample: drop it."""

from __future__ import annotations

import pandas as pd

from damoc.data.ops import Params, RowOp, alive_mask, mark, register


class IfdParams(Params):
    max_ifd: float = 1.0


@register
class IfdFilter(RowOp):
    name = "ifd_filter"
    Params = IfdParams
    needs_lm = True

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        mark(df, alive_mask(df) & (df["ifd"] > self.p.max_ifd).to_numpy(), f"ifd>{self.p.max_ifd:g}")
        return df
