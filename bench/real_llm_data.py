"""The data stage with a real LLM as judge and rewriter: SmolLM2-135M-Instruct (from
`damoc zoo build --preset real`) scores every row of the API-QA domain (LLM judge), the kept rows
are rewritten for up to `--rounds` rounds, then compressed at word level. Runs the real data and
report stages and prints, from the run's own files: rewrite acceptance per round and why proposals
were refused, prompt tokens before/after, the judge's score distribution and its rank agreement
with IFD, and a few before/after rows. Writes bench/results/real_llm_data.{md,json}. Never run by
the test suite.

    .venv/bin/python -m bench.real_llm_data --zoo zoo/real
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "results"


def spec(zoo: Path, model: Path, out: Path, train: Path, a) -> dict:
    cands = [{"name": p.name, "path": str(p)} for p in sorted((zoo / "models").iterdir()) if p.name != model.name][:1]
    return {"name": "real-llm-data", "output_dir": str(out), "seed": 0,
            "data": {"train": {"path": str(train)},
                     "eval": {"path": str(zoo / "data" / "api_qa" / "eval.jsonl")},
                     "filter": {"keep_ratio": a.keep, "operators": [
                         {"name": "rules"}, {"name": "ifd_filter"},
                         {"name": "llm_judge", "params": {"model": str(model)}},
                         {"name": "top_k", "params": {"score": "judge"}}]},
                     "rewrite": {"enabled": True, "model": str(model), "rounds": a.rounds},
                     "compress": {"enabled": True, "ratio": a.ratio}},
            "candidates": cands, "model": {"enabled": False}}


def judge_figures(run: Path) -> dict:
    from damoc.report.agreement import spearman

    parts = [pq.read_table(run / "data" / f, columns=["id", "judge", "ifd"]).to_pandas()
             for f in ("train.parquet", "dropped.parquet")
             if "judge" in pq.ParquetFile(run / "data" / f).schema_arrow.names]
    import pandas as pd

    df = pd.concat(parts).dropna(subset=["judge"])
    both = df.dropna(subset=["ifd"])
    hist, edges = np.histogram(df["judge"], bins=8, range=(1, 5))
    return {"rows": len(df), "percentiles": dict(zip(("p10", "p50", "p90"), np.percentile(df["judge"], [10, 50, 90]).round(3).tolist())),
            "histogram": {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(h) for i, h in enumerate(hist)},
            "spearman_vs_ifd": spearman(dict(zip(both["id"], both["judge"])), dict(zip(both["id"], both["ifd"])))}


def reason_kind(reason: str) -> str:
    """A refusal without its particulars ("answer lost ['MD5']" -> "answer lost a key token")."""
    if reason.startswith("answer lost"):
        return "answer lost a key token"
    if reason.startswith("length "):
        return "length out of bounds"
    return reason


def write(res: dict) -> str:
    m, r, j = res["manifest"], res["manifest"].get("rewrite") or {}, res["judge"]
    lines = ["# The data stage with a real LLM (SmolLM2-135M-Instruct as judge and rewriter)", "",
             f"API-QA domain, {m['input']} rows; stage {res['seconds']:.0f} s on this machine "
             f"(judge {res['op_seconds'].get('llm_judge', 0):.0f} s, rewrite and compression "
             f"{sum(v for k, v in res['op_seconds'].items() if 'rewrite' in k):.0f} s). "
             f"Kept {m['kept']} (keep_ratio {m['keep_ratio']}); prompt tokens {m['tokens_before']:,d} → {m['tokens_after']:,d} "
             f"({m['tokens_after'] / max(1, m['tokens_before']):.0%}).", "",
             "## Rewrite, per round", "", "| round | proposed | accepted | refused (why) |", "|---|---|---|---|"]
    for rd in r.get("rounds", []):
        kinds: dict[str, int] = {}
        for reason, n in rd.get("refused", {}).items():
            kinds[reason_kind(reason)] = kinds.get(reason_kind(reason), 0) + n
        why = ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {rd['round']} | {rd['proposed']} | {rd['accepted']} | {why} |")
    lines += ["", "## Judge", "",
              f"{j['rows']} rows scored; expected score p10 {j['percentiles']['p10']}, median {j['percentiles']['p50']}, "
              f"p90 {j['percentiles']['p90']}; Spearman with IFD {j['spearman_vs_ifd']:+.2f}.", "",
              "| score | " + " | ".join(j["histogram"]) + " |", "|---|" + "---|" * len(j["histogram"]),
              "| rows | " + " | ".join(str(v) for v in j["histogram"].values()) + " |", "",
              "## Before / after", ""]
    for kind in ("rewrite", "compress"):
        for e in (res["examples"].get(kind) or [])[:3]:
            lines.append(f"- {kind}: {json.dumps(e['before'], ensure_ascii=False)[:300]}")
            lines.append(f"  → {json.dumps(e['after'], ensure_ascii=False)[:300]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("zoo/real"))
    ap.add_argument("--model", type=Path, help="judge and rewriter (default: the zoo's SmolLM2)")
    ap.add_argument("--keep", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--cpus", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None, help="the first N training rows only (default: all)")
    ap.add_argument("--rewrite-md", action="store_true", help="only rewrite the .md from the saved .json")
    a = ap.parse_args()
    if a.rewrite_md:
        (OUT / "real_llm_data.md").write_text(write(json.loads((OUT / "real_llm_data.json").read_text())) + "\n")
        return
    from damoc.pipeline import Pipeline
    from damoc.runtime import connect
    from damoc.spec import spec_from_data

    import damoc.data.stage  # noqa: F401 - register the stages
    import damoc.report.stage  # noqa: F401
    import damoc.train.stage  # noqa: F401

    model = (a.model or a.zoo / "models" / "smollm2-135m-instruct").resolve()
    with tempfile.TemporaryDirectory(prefix="damoc-real-data-") as tmp:
        run_dir, train = Path(tmp) / "run", a.zoo.resolve() / "data" / "api_qa" / "train.jsonl"
        if a.rows:
            lines = train.read_text(encoding="utf-8").splitlines(keepends=True)[: a.rows]
            train = Path(tmp) / "train.jsonl"
            train.write_text("".join(lines), encoding="utf-8")
        pipeline = Pipeline(spec_from_data(spec(a.zoo.resolve(), model, run_dir, train, a)), base_dir=Path.cwd(),
                            runtime_factory=lambda: connect(None, num_cpus=a.cpus))
        t0 = time.monotonic()
        pipeline.run(["data"])
        seconds = time.monotonic() - t0
        manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
        res = {"seconds": seconds, "manifest": {k: v for k, v in manifest.items() if k != "examples"},
               "op_seconds": {o["name"]: o.get("seconds") or 0 for o in manifest["operators"]},
               "examples": {"rewrite": (manifest.get("rewrite") or {}).get("examples") or [],
                            "compress": (manifest.get("examples") or {}).get("compress") or []},
               "judge": judge_figures(run_dir)}
    OUT.mkdir(exist_ok=True)
    (OUT / "real_llm_data.json").write_text(json.dumps(res, indent=2, default=str))
    md = write(res)
    (OUT / "real_llm_data.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
