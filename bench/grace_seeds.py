"""How few steps still rank as full fine-tuning would: DaMoC at fixed grace periods and at `auto`,
over training seeds, against the full fine-tuning reference trained with the same seed.

The zoo stays as built (its own seed); `--seeds` changes what a user's rerun would change: the
order of the batches, the adapters' initialisation, dropout. The domain that matters most is
lookup_qa, where zero-shot loss picks the wrong winner and fine-tuning reverses the top two: there
a grace period too short to see the reversal would rank like zero-shot loss. Per domain, seed and
grace period: the pick, top-1, Kendall tau, the grace period used and the training FLOPs ratio.
Writes bench/results/grace-seeds.{md,json}. Never run by the test suite.

    .venv/bin/python -m bench.grace_seeds --domains lookup_qa general_qa --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any

from bench.harness import opening
from bench.selection import (
    agreement, costs, damoc_spec, final_scores, grace_arg, ratio, recipe_args, reference_spec, run, zero_shot,
)
from damoc.report.compare import compare_runs, load_ranking
from damoc.rundir import read_json


def one(zoo: Path, domain: str, rows: int, seed: int, grace: int | str, names: list[str], work: Path, a,
        runtime) -> dict:
    a = argparse.Namespace(**{**vars(a), "seed": seed, "grace": grace})
    spec = damoc_spec(zoo, domain, work / f"{domain}-s{seed}" / f"damoc-{grace}", names, a)
    d_run = run(spec, runtime)
    r_run = run(reference_spec(spec, work / f"{domain}-s{seed}" / "full", rows), runtime)
    cmp, truth = compare_runs(d_run, r_run), final_scores(r_run)
    ranking, finetune = load_ranking(d_run), read_json(d_run / "finetune" / "results.json") or {}
    used = (finetune.get("grace_auto") or {}).get("grace_period", grace)
    zs, _ = zero_shot(d_run)
    return {"domain": domain, "seed": seed, "grace": grace, "grace_used": used, "pick": cmp["choice_a"],
            "top1_hit": cmp["top1_hit"], "kendall_tau": cmp["kendall_tau"],
            "decided_at": ranking.get("decided_at"), "truth": sorted(truth, key=truth.get),
            "flops_ratio": ratio(costs(r_run)["flops"], costs(d_run)["flops"]), "zero_shot": agreement(zs, truth)}


def table(records: list[dict[str, Any]]) -> str:
    head = ("| domain | seed | full fine-tuning ranks | zero-shot pick (tau) | grace | steps used | decided at | "
            "DaMoC pick | top-1 | tau | training FLOPs ratio |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['domain']} | {r['seed']} | {' > '.join(r['truth'])} | {r['zero_shot']['pick']} "
             f"({r['zero_shot']['kendall_tau']:+.2f}) | {r['grace']} | {r['grace_used']} | {r['decided_at']} | "
             f"{r['pick']} | {'yes' if r['top1_hit'] else 'no'} | {r['kendall_tau']:+.2f} | {r['flops_ratio']:.1f}x |"
             for r in records]
    return "\n".join([head, *lines])


def main() -> None:
    def configure(ap):
        recipe_args(ap, "runs/bench-seeds")
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        ap.add_argument("--graces", type=grace_arg, nargs="+", default=[8, "auto"])

    a = opening(__doc__, configure)

    from damoc.runtime import connect
    from damoc.zoo.build import build_zoo

    zoo, work, out = Path(a.zoo).resolve(), Path(a.work).resolve(), Path(a.out)
    records: list[dict[str, Any]] = []
    with connect(None) as rt:
        info = build_zoo(zoo, a.preset, a.seed)
        names = [c["name"] for c in info["candidates"]]
        shared = types.SimpleNamespace(address=rt.address)  # every run joins this cluster
        for domain in a.domains:
            for seed in a.seeds:
                records += [one(zoo, domain, info["data"][domain]["train"], seed, g, names, work, a, shared)
                            for g in a.graces]
    settings = (f"zoo `{a.zoo}` (preset {a.preset}, built with seed {a.seed}); the DaMoC recipe of selection.md "
                f"({a.epochs:g} epochs, keep_ratio {a.keep_ratio}, compress {a.compress_ratio}, prune {a.prune_ratio}, "
                f"rf 2, stopped once decided; auto: target saving {a.target_saving:g}x); each seed's DaMoC runs are "
                "scored against the full fine-tuning reference trained with that seed.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "grace-seeds.json").write_text(json.dumps(records, indent=1, default=str))
    text = "\n\n".join(["# Grace period and seeds (bench/grace_seeds.py)", settings, table(records)]) + "\n"
    (out / "grace-seeds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
