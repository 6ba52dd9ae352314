"""Data-stage throughput and memory: the Ray Data plan vs a plain single-process loop.

Both run the same operators on the same rows (by default the CPU chain rules ->
minhash_dedup -> top_k on a length score, then prompt-token counts of the kept rows;
--with-lm MODEL_DIR adds the reference-LM scorer and IFD). Prints rows/s of each and their
ratio, then the peak memory of the whole process tree (driver + Ray workers; PSS, so pages
shared through the object store count once) at two corpus sizes and their ratio. Never run
by the test suite.

    .venv/bin/python -m bench.data_throughput --rows 100000 --memory-rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench.harness import test_helper
from damoc.data.normalize import BadRow, normalize_record
from damoc.data.ops.rules import Rules
from damoc.data.select import band_keys, estimated_jaccard, lsh_shape, minhash, minhash_params, shingles, top_k
from damoc.spec import Fields, spec_from_data

write_corpus = test_helper("datagen").write_corpus

CHAIN = [{"name": "rules"}, {"name": "minhash_dedup", "params": {"threshold": 0.8}},
         {"name": "top_k", "params": {"score": "chars"}}]


class PeakMemory:
    """Peak memory of this process and all its descendants (Ray workers included), summed two ways:
    PSS (each shared page - the object store's, a library's - divided among the processes that map
    it: the tree's real footprint) and RSS (shared pages counted once per process: an overcount)."""

    def __init__(self, every: float = 0.5):
        self.peak = self.peak_rss = 0
        self.every, self._stop = every, threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            pss = rss = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                    pss, rss = pss + info.pss, rss + info.rss
                except psutil.Error:
                    pass
            self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)
            time.sleep(self.every)

    def __enter__(self):
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def plain_loop(path: Path, keep_ratio: float, ref: str, with_lm: bool) -> int:
    """The same operators, one process, rows in memory: the baseline."""
    import pandas as pd

    from damoc.data.lm import LMScorer
    from damoc.data.ops.ifd_filter import IfdFilter
    from damoc.data.stream import TokenCounter

    rows, fields = [], Fields()
    with open(path, "rb") as fh:
        for i, line in enumerate(fh):
            try:
                rows.append({"id": str(i), "order": i, **normalize_record(json.loads(line.decode()), fields)})
            except (UnicodeDecodeError, json.JSONDecodeError, BadRow):
                continue
    df = pd.DataFrame(rows)
    df["reason"], df["drop"], df["split"] = None, None, "train"
    df = Rules().apply(df)
    if with_lm:
        scorer, alive = LMScorer(model_path=ref, embeddings=False), df["drop"].isna().to_numpy()
        for c in ("ce_cond", "ce_alone", "ifd", "ppl"):
            df[c] = np.float32("nan")
        idx = np.flatnonzero(alive)
        for s in range(0, len(idx), 256):
            rows = df.index[idx[s:s + 256]]
            out = scorer({c: df.loc[rows, c].to_numpy() for c in ("instruction", "input", "output")})
            for c in ("ce_cond", "ce_alone", "ifd", "ppl"):
                df.loc[rows, c] = out[c]
        df = IfdFilter().apply(df)
    alive = df[df["drop"].isna()]
    a, b = minhash_params(128, seed=1)
    bands, r = lsh_shape(0.8, 128)
    seen: dict[int, tuple[str, np.ndarray]] = {}
    dup: set[str] = set()
    for rid, ins, inp, out in zip(alive["id"], alive["instruction"], alive["input"], alive["output"]):
        sig = minhash(shingles(f"{ins}\n{inp}\n{out}"), a, b)
        for key in band_keys(sig, bands, r):
            first = seen.setdefault(key, (rid, sig))
            if first[0] != rid and estimated_jaccard(first[1], sig) >= 0.8:
                dup.add(rid)
                break
    alive = alive[~alive["id"].isin(dup)]
    keep = top_k(alive["chars"].to_numpy(float), alive["order"].to_numpy(), round(keep_ratio * len(df)))
    kept = alive.iloc[keep][["id", "instruction", "input", "output"]].copy()
    kept["prompt_tokens_before"] = kept["prompt_tokens_after"] = TokenCounter(ref)(kept["instruction"].tolist(), kept["input"].tolist())
    kept.to_parquet(path.with_suffix(".plain.parquet"))
    return len(rows)


def damoc_stage(path: Path, workdir: Path, keep_ratio: float, chain: list[dict], ref: str | None) -> tuple[int, float]:
    """Rows read and the stage's own seconds (the manifest's: cluster start-up excluded)."""
    from damoc.pipeline import Pipeline
    from damoc.runtime import connect

    import damoc.data.stage  # noqa: F401

    data = {"train": {"path": str(path)}, "eval": {"split_ratio": 0.01},
            "filter": {"keep_ratio": keep_ratio, "operators": chain}, "compress": {"enabled": False},
            "batch_size": 256}
    if ref:
        data["reference_model"] = ref
    spec = spec_from_data({"name": "bench", "output_dir": str(workdir / "run"), "data": data,
                           "candidates": [{"name": "ref", "path": ref or str(workdir)}]}, check_files=False)
    Pipeline(spec, base_dir=workdir, runtime_factory=lambda: connect(None)).run(["data"])
    m = json.loads((workdir / "run" / "data" / "manifest.json").read_text())
    return m["input"], m["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows for the throughput comparison")
    ap.add_argument("--memory-rows", type=int, nargs="*", default=[100_000, 1_000_000],
                    help="two corpus sizes for the memory comparison (none: skip it)")
    ap.add_argument("--keep-ratio", type=float, default=0.2)
    ap.add_argument("--with-lm", metavar="MODEL_DIR", help="add the reference-LM scorer and IFD filter")
    args = ap.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    chain = CHAIN if not args.with_lm else [CHAIN[0], {"name": "ifd_filter"}, *CHAIN[1:]]
    ref = args.with_lm
    with tempfile.TemporaryDirectory(prefix="damoc-bench-") as tmp:
        tmp = Path(tmp)
        # A stand-in reference folder for the CPU chain (it only counts prompt tokens).
        if not ref:
            from transformers import AutoTokenizer  # noqa: F401

            from damoc.zoo.corpus import stdlib_source
            from damoc.zoo.tiny import build_tiny_model, train_tokenizer

            tok = train_tokenizer(stdlib_source(200_000), 512)
            ref = str(build_tiny_model("llama", tmp / "ref", tok, hidden=32, layers=2))
        path = tmp / "corpus.jsonl"
        write_corpus(path, args.rows)
        t = time.perf_counter()
        n = plain_loop(path, args.keep_ratio, ref, bool(args.with_lm))
        plain = n / (time.perf_counter() - t)
        t = time.perf_counter()
        n, stage_s = damoc_stage(path, tmp / "a", args.keep_ratio, chain, ref)
        ours, ours_stage = n / (time.perf_counter() - t), n / stage_s
        print(f"throughput on {args.rows:,} rows ({' -> '.join(c['name'] for c in chain)}): "
              f"plain loop {plain:,.0f} rows/s; damoc {ours:,.0f} rows/s with cluster start-up "
              f"(ratio {ours / plain:.2f}x), {ours_stage:,.0f} rows/s stage only (ratio {ours_stage / plain:.2f}x); "
              f"target >= 1.0x")
        peaks = []
        for rows in args.memory_rows[:2]:
            p = tmp / f"mem{rows}.jsonl"
            write_corpus(p, rows)
            with PeakMemory() as mem:
                damoc_stage(p, tmp / f"m{rows}", args.keep_ratio, chain, ref)
            peaks.append(mem.peak)
            print(f"peak memory at {rows:,} rows: {mem.peak / 2**30:.2f} GiB PSS "
                  f"({mem.peak_rss / 2**30:.2f} GiB summed RSS)")
            p.unlink()
        if len(peaks) == 2:
            print(f"memory ratio {args.memory_rows[1]:,} vs {args.memory_rows[0]:,} rows: "
                  f"{peaks[1] / peaks[0]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
