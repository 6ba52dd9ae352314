"""RUN/report/ranking.json from the finetune stage's results and the earlier stages' costs.

Order: the candidate left standing once ASHA had stopped the others (status `decided`), or those
that trained to the end, by their final score; then those ASHA stopped,
deepest first (a trial stopped later survived more comparisons), by their last score; failed
candidates are listed with their reason and no rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from damoc.report.confidence import confidence
from damoc import records


def _score(e: dict[str, Any]) -> float | None:
    s = e.get("score")
    return None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s)


def zero_shot(entry: dict[str, Any], metric: str) -> float | None:
    """The candidate's figure before any training (its learning curve's step 0)."""
    first = next((p for p in entry.get("curve", []) if p.get("step") == 0), None)
    return None if first is None else first.get(metric)


def rank_candidates(entries: list[dict[str, Any]], mode: str, metric: str = "eval_loss") -> list[dict[str, Any]]:
    sign = 1.0 if mode == "min" else -1.0
    scored = [e for e in entries if e["status"] != "failed" and _score(e) is not None]
    # The last one standing (decided) or those trained to the end, by score; then the stopped ones.
    top = ("finished", "decided")
    finished = sorted((e for e in scored if e["status"] in top), key=lambda e: (sign * _score(e), e["name"]))
    stopped = sorted((e for e in scored if e["status"] not in top),
                     key=lambda e: (-e["steps"], sign * _score(e), e["name"]))
    ranked = {e["name"]: i + 1 for i, e in enumerate(finished + stopped)}
    out = []
    for e in entries:
        status = e["status"] if e["name"] in ranked or e["status"] == "failed" else "failed"
        row = {"name": e["name"], "rank": ranked.get(e["name"]), "score": _score(e), "status": status,
               "stopped_early": status == "stopped_early", "steps": e.get("steps", 0),
               "worker_seconds": e.get("worker_seconds", 0.0), "train_tokens": e.get("train_tokens", 0),
               "train_flops": e.get("train_flops", 0.0), "final": e.get("final", {}),
               "source": e.get("source"), "adapter": e.get("adapter"),
               "zero_shot": zero_shot(e, metric), "note": e.get("note"), "prompt": e.get("prompt"),
               "cut_because": e.get("cut_because")}  # {step: why} where it fell below a rung's cut
        if e.get("reason") or status == "failed":
            row["reason"] = e.get("reason", "no evaluation was reported")
        out.append(row)
    return sorted(out, key=lambda r: (r["rank"] is None, r["rank"] or 0, r["name"]))


def zero_shot_ranking(run_dir: Path, finetune: dict[str, Any], ranking: dict[str, Any]) -> dict[str, Any] | None:
    """The free baseline: the candidates ranked by their answer loss before any fine-tuning (bits per
    byte on the same eval rows): of the original models where the model stage measured them, else of
    the trained models' step 0. Beside them, the compressed models' (their trials' step 0). Where it
    disagrees with the fine-tuned ranking is said."""
    from damoc.report.agreement import best, kendall_tau

    scores, compressed = {}, {}
    for e in finetune.get("candidates", []):
        z = (records.compression(run_dir / "models" / e["name"]) or {}).get("zero_shot") or {}
        step0 = zero_shot(e, "eval_loss")
        if z.get("original") is not None:
            scores[e["name"]] = z["original"]
            compressed[e["name"]] = z["compressed"] if z.get("compressed") is not None else step0
        elif step0 is not None:
            scores[e["name"]] = step0
    ranked = {c["name"]: float(c["rank"]) for c in ranking["candidates"] if c["rank"] is not None}
    if len(scores) < 2:
        return None
    order = sorted(scores, key=lambda n: (scores[n], n))
    common = [n for n in order if n in ranked]
    pick = best({n: scores[n] for n in common}, "min") if common else None
    finals = {e["name"]: e["final"]["eval_loss"] for e in finetune.get("candidates", [])
              if e["name"] in ranked and (e.get("final") or {}).get("eval_loss") is not None}
    return {"metric": "eval_loss", "scores": scores, "compressed": compressed or None, "order": order,
            "pick": pick, "agrees_on_pick": bool(common) and pick == min(ranked, key=ranked.get),
            "full_reference": is_full_reference(_spec(run_dir)),
            # every ranked candidate ends worse than its unpruned original started: compression, not the
            # domain, may be what the ranking measured
            "all_below_original": bool(compressed) and len(finals) > 1 and all(
                finals[n] > scores[n] for n in finals if n in scores),
            "kendall_tau": kendall_tau({n: scores[n] for n in common}, {n: ranked[n] for n in common})
            if len(common) > 1 else None,
            "source": "original models (model stage)" if compressed else "each trial's step 0"}


def is_full_reference(spec: dict[str, Any]) -> bool:
    """Whether a run trains every candidate unpruned, on every row, uncompressed, to its end: its
    ranking is what full fine-tuning says (the reference DaMoC is compared with)."""
    data, model, tune = spec.get("data") or {}, spec.get("model") or {}, spec.get("tune") or {}
    return ((data.get("filter") or {}).get("method") == "none" and not (data.get("compress") or {}).get("enabled")
            and model.get("enabled") is False and tune.get("scheduler") == "none")


def stage_costs(run_dir: Path, finetune: dict[str, Any]) -> dict[str, Any]:
    """Worker-seconds and FLOPs per stage and in total.

    data: the stage's wall seconds (its Ray Data plan is one job on the cluster); models: each
    candidate actor's seconds x its CPUs; finetune: each trial's seconds x its workers.
    Training FLOPs = 6 x forward params x tokens processed (the fine-tuning cost the method saves).
    """
    model_entries = (records.read(records.ModelsIndex, run_dir) or {}).get("candidates", [])
    data_marker = records.marker(run_dir, "data") or {}
    model_marker = records.marker(run_dir, "models") or {}
    spec = _spec(run_dir)
    cpus = float(((spec.get("model") or {}).get("num_cpus")) or 1)
    models_ws = sum(float(e.get("seconds", 0.0)) for e in model_entries) * cpus
    ft_ws = sum(float(e.get("worker_seconds", 0.0)) for e in finetune["candidates"])
    timelines = [(e.get("timeline") or {}, int(e.get("workers") or 1)) for e in finetune["candidates"]]
    ft_flops = sum(float(e.get("train_flops", 0.0)) for e in finetune["candidates"])
    stages = {
        "data": {"worker_seconds": round(float(data_marker.get("seconds", 0.0)), 3),
                 "wall_seconds": float(data_marker.get("seconds", 0.0))},
        "models": {"worker_seconds": round(models_ws, 3), "wall_seconds": float(model_marker.get("seconds", 0.0))},
        "finetune": {"worker_seconds": round(ft_ws, 3), "wall_seconds": float(finetune.get("seconds", 0.0)),
                     # start-up paid once per trial, and workers held idle waiting at synchronised rungs
                     "fixed_worker_seconds": round(sum(t.get("fixed", 0.0) * w for t, w in timelines), 3),
                     "idle_worker_seconds": round(sum(t.get("rung_wait", 0.0) * w for t, w in timelines), 3),
                     "train_flops": ft_flops,
                     "train_tokens": sum(int(e.get("train_tokens", 0)) for e in finetune["candidates"])},
    }
    return {"stages": stages, "worker_seconds": round(sum(s["worker_seconds"] for s in stages.values()), 3),
            "train_flops": ft_flops, "unit": "worker-seconds (seconds x workers or CPUs held)"}


def _spec(run_dir: Path) -> dict[str, Any]:
    return records.spec_data(run_dir)


def build_ranking(run_dir: Path) -> dict[str, Any]:
    finetune = records.read(records.Results, run_dir)
    if not finetune:
        raise FileNotFoundError(f"{run_dir / 'finetune' / 'results.json'} is missing: run the finetune stage first")
    ranking = {"metric": finetune["metric"], "mode": finetune["mode"],
               "candidates": rank_candidates(finetune["candidates"], finetune["mode"], finetune["metric"])}
    conf = confidence(run_dir, ranking, int(_spec(run_dir).get("seed") or 0))
    for c in ranking["candidates"]:
        c["interval"] = (conf.get("intervals") or {}).get(c["name"])
    ranking["confidence"] = {k: v for k, v in conf.items() if k != "intervals"} or None
    ranking["zero_shot"] = zero_shot_ranking(run_dir, finetune, ranking)
    return {**ranking,
            "cost": stage_costs(run_dir, finetune),
            "scheduler": finetune.get("scheduler"), "max_steps": finetune.get("max_steps"),
            "decided_at": finetune.get("decided_at"), "finish_winner": finetune.get("finish_winner", False),
            "resumed": finetune.get("resumed", 0)}
