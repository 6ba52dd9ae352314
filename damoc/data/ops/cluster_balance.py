"""Cluster-balanced sampling: k-means on (a sample of) the embeddings, then an equal share of
the budget per cluster, the best rows by score (or the earliest) within each."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import BATCH_ROWS, Params, SelectContext, Selector, collect, embeddings, register
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

    def select(self, alive, budget, ctx: SelectContext) -> dict[str, str]:
        p = self.p
        n = ctx.n_alive
        if budget is None or budget >= n:
            return {}
        sample = alive.select_columns(["embedding"])
        if n > p.sample:
            sample = sample.random_sample(p.sample / n, seed=ctx.seed)
        emb = embeddings(collect(sample, ["embedding"])["embedding"])
        centers, _ = kmeans(emb, p.clusters, seed=ctx.seed)

        def label(df: pd.DataFrame) -> pd.DataFrame:
            out = df[["id", "order"] + ([p.score] if p.score else [])].copy()
            out["cluster"] = assign(embeddings(df["embedding"]), centers)
            return out

        cols = collect(alive.map_batches(label, batch_format="pandas", batch_size=BATCH_ROWS),
                       ["id", "order", "cluster"] + ([p.score] if p.score else []))
        labels = cols["cluster"]
        quota = balanced_quota(np.bincount(labels, minlength=len(centers)), budget)
        keep = np.zeros(len(labels), dtype=bool)
        for j, q in enumerate(quota):
            members = np.flatnonzero(labels == j)
            s = cols[p.score][members].astype(np.float64) if p.score else np.zeros(len(members))
            keep[members[top_k(s, cols["order"][members], int(q))]] = True
        return {i: "cluster_balance:over_share" for i in cols["id"][~keep]}
