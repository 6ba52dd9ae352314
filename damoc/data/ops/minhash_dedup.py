"""MinHash near-duplicate removal. Signatures and LSH band keys are computed per batch in the streaming
pass (`prepare`); the selection reads only the integer band keys and row order, pairs rows sharing a key,
verifies candidates by their signatures (estimated Jaccard >= threshold), and in each group of
near-duplicates keeps the earliest row and drops the others, naming the row they copy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from damoc.data.ops import Params, SelectContext, Selector, alive_mask, register
from damoc.data.select import band_keys, estimated_jaccard, lsh_shape, minhash, minhash_params, shingles



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
        """The LSH band keys (int64): 1M rows x 16 bands is 128 MB in the driver."""
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
        keys = np.array([band_keys(sg, bands, rows) for sg in sigs], dtype=np.int64).reshape(len(sigs), bands)
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
            df[c] = np.zeros(len(df), dtype=np.int64)
            df.loc[alive, c] = sig[c].to_numpy()
        return df

    def select(self, alive: pd.DataFrame, budget, ctx: SelectContext) -> dict[int, str]:
        # Rows are named by their integer `order` (unique, and the tie-break): rows sharing a band key
        # are candidates, paired with the earliest row of their bucket, then verified by signature.
        order = alive["order"].to_numpy()
        found_a, found_b = [], []
        for k in self.columns:
            band = pd.DataFrame({k: alive[k].to_numpy(), "order": order}).sort_values([k, "order"])
            first = band.groupby(k, sort=False)["order"].transform("first").to_numpy()
            hit = band["order"].to_numpy() != first
            found_a.append(first[hit])
            found_b.append(band["order"].to_numpy()[hit])
        cand_a, cand_b = np.concatenate(found_a), np.concatenate(found_b)
        if len(cand_a) == 0:
            return {}
        involved = set(cand_a.tolist()) | set(cand_b.tolist())
        found = ctx.work.fetch(sorted(involved), ["id", "mh_sig"])
        sig_of = {o: np.frombuffer(s, dtype=np.uint32) for o, s in zip(found["order"].tolist(), found["mh_sig"])}
        id_of = dict(zip(found["order"].tolist(), found["id"]))
        parent = {o: o for o in involved}

        def root(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y in set(zip(cand_a.tolist(), cand_b.tolist())):
            if estimated_jaccard(sig_of[x], sig_of[y]) >= self.p.threshold:
                rx, ry = root(x), root(y)
                if rx != ry:  # the earliest row (lowest order) of a group is its root
                    parent[max(rx, ry)] = min(rx, ry)
        return {o: f"near_duplicate_of:{id_of[root(o)]}" for o in involved if root(o) != o}
