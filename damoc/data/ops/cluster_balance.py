"""Cluster-balanced sampling: k-means on (a sample of) the embeddings, then an equal share of
the budget per cluster, the best rows by score (or the earliest) within each."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import BATCH_ROWS, Params, SelectContext, Selector, dropped, embeddings, register
from damoc.data.select import assign, balanced_quota, kmeans, top_k


class ClusterParams(Params):
    clusters: int = 8
    sample: int = 20_000
    score: str | None = None


@register
class ClusterBalance(Selector):
    name = "cluster_balance"
    Params = ClusterParams
    needs_embedding = True
    budgeted = True

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.p.score,) if self.p.score else ()

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> pd.Series:
        p, n = self.p, len(alive)
        if budget is None or budget >= n:
            return dropped([], [])
        orders = alive["order"].to_numpy()
        rng = np.random.default_rng(ctx.seed)
        sample = orders if n <= p.sample else rng.choice(orders, p.sample, replace=False)
        emb = embeddings(ctx.work.fetch(sample, ["embedding"])["embedding"])
        centers, _ = kmeans(emb, p.clusters, seed=ctx.seed)

        def label(df: pd.DataFrame) -> pd.DataFrame:
            return pd.DataFrame({"order": df["order"], "cluster": assign(embeddings(df["embedding"]), centers)})

        got = ctx.work.map_blocks(["embedding"], orders, label, BATCH_ROWS)
        cluster = alive[["order"]].merge(got, on="order", how="left")["cluster"].to_numpy()
        quota = balanced_quota(np.bincount(cluster, minlength=len(centers)), budget)
        keep = np.zeros(n, dtype=bool)
        for j, q in enumerate(quota):
            members = np.flatnonzero(cluster == j)
            s = alive[p.score].to_numpy(np.float64)[members] if p.score else np.zeros(len(members))
            keep[members[top_k(s, orders[members], int(q))]] = True
        return dropped(orders[~keep], "cluster_balance:over_share")
