"""Selection on the alive rows: each budgeted selector runs within each reference LM's share, on that
scorer's own stats and embeddings, with the row budget split by the shares' sizes."""

from __future__ import annotations

import pandas as pd

from damoc.data.ops import SelectContext, Selector


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """A row budget over groups in proportion to their sizes (largest remainders; they add up)."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [budget * n / total for n in sizes]
    parts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (parts[i] - exact[i], i))[: budget - sum(parts)]:
        parts[i] += 1
    return parts


def by_share(sel: Selector, alive: pd.DataFrame, budget: int | None, sctx: SelectContext) -> pd.Series:
    """A selector that reads a model's stats, run within each reference LM's share on that LM's stats
    and embeddings (never compared across models), with the budget split by the shares' sizes."""
    groups = [alive[alive["scorer"].to_numpy() == k] for k in sorted(set(alive["scorer"].tolist()))]
    budgets = split_budget(budget, [len(g) for g in groups]) if budget is not None else [None] * len(groups)
    parts = [sel.select(g.reset_index(drop=True), b, sctx) for g, b in zip(groups, budgets)]
    return pd.concat(parts) if parts else pd.Series([], dtype=object)
