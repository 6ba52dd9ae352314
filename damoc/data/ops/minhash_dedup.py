"""MinHash near-duplicate removal. Signatures and LSH band keys are computed per batch in the streaming
pass (`prepare`); the selection reads only the integer band keys and row order, pairs rows sharing a key,
verifies candidates by their signatures (estimated Jaccard >= threshold), and in each group of
near-duplicates keeps the earliest row and drops the others, naming the row they copy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, alive_mask, dropped, register
from damoc.data.select import band_keys, lsh_shape, minhash, minhash_params, shingles
from damoc.data.work import binary_matrix



class DedupParams(Params):
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 3


@register
class MinHashDedup(Selector):
    name = "minhash_dedup"
    Params = DedupParams

    @property
    def prepared_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mh_sig", *self.columns)

    @property
    def columns(self) -> tuple[str, ...]:
        """The LSH band keys (uint32): 1M rows x 16 bands is 64 MB in the driver."""
        return tuple(f"mh_k{i}" for i in range(self.shape[0]))

    @property
    def shape(self) -> tuple[int, int]:
        return lsh_shape(self.p.threshold, self.p.num_perm)

    def signatures(self, df: pd.DataFrame) -> pd.DataFrame:
        """MinHash signature (uint32 bytes) and LSH band keys of each row, as columns."""
        p = self.p
        a, b = minhash_params(p.num_perm, seed=1)
        bands, rows = self.shape
        text = df["instruction"] + "\n" + df["input"] + "\n" + df["output"]
        sigs = [minhash(shingles(t, p.ngram), a, b) for t in text]
        # A band's column holds only that band's keys: the low 32 bits (the hash) say it all.
        keys = (np.array([band_keys(sg, bands, rows) for sg in sigs], dtype=np.int64).reshape(len(sigs), bands)
                & 0xFFFFFFFF).astype(np.uint32)
        out = pd.DataFrame({"mh_sig": [sg.tobytes() for sg in sigs]}, index=df.index)
        for i in range(bands):
            out[f"mh_k{i}"] = keys[:, i]
        return out

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        alive = alive_mask(df)
        sig = self.signatures(df[alive])
        df["mh_sig"] = pd.Series([None] * len(df), dtype=object, index=df.index)
        df.loc[alive, "mh_sig"] = sig["mh_sig"]
        for c in sig.columns[1:]:
            df[c] = np.zeros(len(df), dtype=np.uint32)
            df.loc[alive, c] = sig[c].to_numpy()
        return df

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> pd.Series:
        # Rows are named by their integer `order` (unique, and the tie-break): rows sharing a band key
        # are candidates, paired with the earliest row of their bucket, then verified by signature.
        order = alive["order"].to_numpy(np.int64)
        found_a, found_b = [], []
        for k in self.columns:
            keys = alive[k].to_numpy()
            sort = np.lexsort((order, keys))  # by key, earliest row first within a key
            keys, orders = keys[sort], order[sort]
            starts = np.r_[True, keys[1:] != keys[:-1]]
            first = orders[np.flatnonzero(starts)[np.cumsum(starts) - 1]]  # each row's bucket's earliest row
            hit = orders != first
            found_a.append(first[hit])
            found_b.append(orders[hit])
        pairs = np.unique(np.stack([np.concatenate(found_a), np.concatenate(found_b)], axis=1), axis=0)
        if len(pairs) == 0:
            return dropped([], [])
        # Verify every candidate pair by its signatures, vectorised over one matrix of the rows involved.
        involved = np.unique(pairs)
        found = ctx.work.fetch_table(involved, ["mh_sig"]).sort_by("order")
        sigs = binary_matrix(found["mh_sig"], np.uint32)
        ia, ib = np.searchsorted(involved, pairs[:, 0]), np.searchsorted(involved, pairs[:, 1])
        keep = np.zeros(len(pairs), dtype=bool)
        for s in range(0, len(pairs), 100_000):  # bounded: 100k pairs x num_perm booleans at a time
            keep[s:s + 100_000] = (sigs[ia[s:s + 100_000]] == sigs[ib[s:s + 100_000]]).mean(1) >= self.p.threshold
        parent = {int(o): int(o) for o in np.unique(pairs[keep])}

        def root(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in pairs[keep].tolist():
            rx, ry = root(x), root(y)
            if rx != ry:  # the earliest row (lowest order) of a group is its root
                parent[max(rx, ry)] = min(rx, ry)
        copies = sorted(o for o in parent if root(o) != o)
        roots = {o: root(o) for o in copies}
        names = ctx.work.fetch_table(sorted(set(roots.values())), ["id"])
        id_of = dict(zip(names["order"].to_pylist(), names["id"].to_pylist()))
        return dropped(copies, [f"near_duplicate_of:{id_of[roots[o]]}" for o in copies])
