"""Data-stage throughput and memory: the Ray Data plan vs a plain single-process loop.

Both run the same operators on the same rows (by default the CPU chain rules ->
minhash_dedup -> top_k on a length score; --with-lm adds the reference-LM scorer and
IFD, which needs a model folder). Prints rows/s of each and their ratio, then the peak
resident memory of the whole process tree (driver + Ray workers) at two corpus sizes and
their ratio. Never run by the test suite.

    .venv/bin/python bench/data_throughput.py --rows 20000 --memory-rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from datagen import write_corpus  # noqa: E402

from damoc.data.normalize import BadRow, normalize_record  # noqa: E402
from damoc.data.ops.rules import Rules  # noqa: E402
from damoc.data.select import band_keys, estimated_jaccard, lsh_shape, minhash, minhash_params, shingles, top_k  # noqa: E402
from damoc.spec import Fields, spec_from_data  # noqa: E402

CHAIN = [{"name": "rules"}, {"name": "minhash_dedup", "params": {"threshold": 0.8}},
         {"name": "top_k", "params": {"score": "chars"}}]


class PeakRSS:
    """Peak summed RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, every: float = 0.2):
        self.peak, self.every, self._stop = 0, every, threading.Event()

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self):
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def plain_loop(path: Path, keep_ratio: float) -> int:
    """The same operators, one process, rows in memory: the baseline."""
    import pandas as pd

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
    alive.iloc[keep][["id", "instruction", "input", "output"]].to_parquet(path.with_suffix(".plain.parquet"))
    return len(rows)


def damoc_stage(path: Path, workdir: Path, keep_ratio: float, chain: list[dict], ref: str | None) -> int:
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
    out = Pipeline(spec, base_dir=workdir, runtime_factory=lambda: connect(None)).run(["data"])
    return out[0].counts["input"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000, help="rows for the throughput comparison")
    ap.add_argument("--memory-rows", type=int, nargs=2, default=[100_000, 1_000_000])
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
        n = plain_loop(path, args.keep_ratio)
        plain = n / (time.perf_counter() - t)
        t = time.perf_counter()
        n = damoc_stage(path, tmp / "a", args.keep_ratio, chain, ref)
        ours = n / (time.perf_counter() - t)
        print(f"throughput on {args.rows} rows: damoc {ours:,.0f} rows/s, plain loop {plain:,.0f} rows/s, "
              f"ratio {ours / plain:.2f}x (target >= 1.0x)")
        peaks = []
        for rows in args.memory_rows:
            p = tmp / f"mem{rows}.jsonl"
            write_corpus(p, rows)
            with PeakRSS() as mem:
                damoc_stage(p, tmp / f"m{rows}", args.keep_ratio, chain, ref)
            peaks.append(mem.peak)
            print(f"peak memory at {rows:,} rows: {mem.peak / 2**30:.2f} GiB")
            p.unlink()
        print(f"memory ratio {args.memory_rows[1]:,} vs {args.memory_rows[0]:,} rows: "
              f"{peaks[1] / peaks[0]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
