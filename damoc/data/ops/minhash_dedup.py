"""MinHash near-duplicate removal: LSH bands find candidate pairs (band by band, narrow
columns only), the signatures verify them (estimated Jaccard >= threshold), and in each group of near-duplicates
the earliest row stays while the others are dropped, naming the row they copy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import BATCH_ROWS, Params, SelectContext, Selector, collect, keep_where, register
from damoc.data.select import band_keys, estimated_jaccard, lsh_shape, minhash, minhash_params, shingles

BANDS_PER_PASS = 4


class DedupParams(Params):
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 3


@register
class MinHashDedup(Selector):
    name = "minhash_dedup"
    Params = DedupParams

    def select(self, alive, budget, ctx: SelectContext) -> dict[str, str]:
        p = self.p
        a, b = minhash_params(p.num_perm, seed=1)
        bands, rows = lsh_shape(p.threshold, p.num_perm)

        def sign(df: pd.DataFrame) -> pd.DataFrame:
            text = df["instruction"] + "\n" + df["input"] + "\n" + df["output"]
            sigs = [minhash(shingles(t, p.ngram), a, b) for t in text]
            return pd.DataFrame({"id": df["id"], "order": df["order"], "sig": sigs})

        def keys(df: pd.DataFrame) -> pd.DataFrame:
            k = np.array([band_keys(np.asarray(sg, dtype=np.uint32), bands, rows) for sg in df["sig"]], dtype=np.int64)
            out = pd.DataFrame({"id": df["id"], "order": df["order"]})
            for i in range(bands):
                out[f"k{i}"] = k[:, i] if len(k) else np.zeros(0, dtype=np.int64)
            return out

        sigs = alive.select_columns(["id", "order", "instruction", "input", "output"]) \
            .map_batches(sign, batch_format="pandas", batch_size=BATCH_ROWS)
        sigs = ctx.spill(sigs)
        keyed = ctx.spill(sigs.map_batches(keys, batch_format="pandas", batch_size=BATCH_ROWS))
        # A few bands per pass: only (keys, order, id) of those bands come to the driver (memory
        # stays narrow, passes stay few); rows sharing a key are candidates, paired with the
        # earliest row of their bucket.
        found_a, found_b = [], []
        for g in range(0, bands, BANDS_PER_PASS):
            group = [f"k{i}" for i in range(g, min(bands, g + BANDS_PER_PASS))]
            cols = collect(keyed, [*group, "order", "id"])
            for k in group:
                band = pd.DataFrame({k: cols[k], "order": cols["order"], "id": cols["id"]}).sort_values([k, "order"])
                first = band.groupby(k, sort=False)["id"].transform("first")
                hit = (band["id"] != first).to_numpy()
                found_a.append(first.to_numpy()[hit])
                found_b.append(band["id"].to_numpy()[hit])
        cand = {"a": np.concatenate(found_a), "b": np.concatenate(found_b)}
        if len(cand["a"]) == 0:
            return {}
        involved = set(cand["a"]) | set(cand["b"])
        found = collect(keep_where(sigs, lambda df: df["id"].isin(involved)), ["id", "order", "sig"])
        sig_of = {i: np.asarray(s, dtype=np.uint32) for i, s in zip(found["id"], found["sig"])}
        order_of = dict(zip(found["id"], found["order"]))
        parent = {i: i for i in involved}

        def root(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in set(zip(cand["a"], cand["b"])):
            if estimated_jaccard(sig_of[x], sig_of[y]) >= p.threshold:
                rx, ry = root(x), root(y)
                if rx != ry:  # the earliest row of a group is its root
                    keep, other = (rx, ry) if order_of[rx] <= order_of[ry] else (ry, rx)
                    parent[other] = keep
        return {i: f"near_duplicate_of:{root(i)}" for i in involved if root(i) != i}
