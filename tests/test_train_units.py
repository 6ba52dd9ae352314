"""Pure pieces of the finetune and report stages, tested exactly (no Ray cluster)."""

from __future__ import annotations

import json
import math

import pytest

from damoc.report.compare import compare_runs
from damoc.report.ranking import rank_candidates
from damoc.report.render import to_html, to_markdown
from damoc.train import metrics
from damoc.runtime import fitting
from damoc.train.driver import worker_resources
from damoc.lm.nll import bits_per_byte
from damoc.lm.prompts import gold_option, options_of, prompt_text
from damoc.lm.tokens import IGNORE, collate, encode
from damoc.schedule import asha_rungs, planned_steps, report_steps
from damoc.train.loop import Batches
from damoc.train.rungs import Rungs, poll_until, release_order, stable_keep


# ---------------------------------------------------------------- examples and metrics


def test_encode_masks_the_prompt_and_counts_answer_bytes(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ex = encode(tok, "Question: what?\nAnswer: ", "naïve", max_length=64)
    n_answer = len(tok("naïve", add_special_tokens=False)["input_ids"])
    assert ex.labels.count(IGNORE) == len(ex.ids) - n_answer - 1  # answer tokens + EOS are scored
    assert ex.labels[-1] == tok.eos_token_id and ex.answer_bytes == len("naïve".encode())
    short = encode(tok, "word " * 200, "yes", max_length=16)  # long prompts are cut from the left
    assert len(short.ids) == 16 and short.labels[-2:] == short.ids[-2:]
    batch = collate([ex, short], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ex.ids)) and int(batch["attention_mask"][1].sum()) == 16
    assert (batch["labels"][1, 16:] == IGNORE).all()


def test_templates_and_options():
    assert prompt_text("qa", "Why?", "") == "Question: Why?\nAnswer: "
    assert prompt_text("reading_comprehension", "Who?", "Ann met Bo.") == "Passage: Ann met Bo.\nQuestion: Who?\nAnswer: "
    opts = options_of("Pick one:\nA. red\nB) blue\n(C) green", None)
    assert opts == [("A", "red"), ("B", "blue"), ("C", "green")]
    assert gold_option(opts, "B") == 1 and gold_option(opts, "c. green") == 2 and gold_option(opts, "Red") == 0
    assert gold_option(opts, "purple") is None


def test_metrics_exact_values():
    assert bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)
    assert metrics.exact_match("The Paris.", "paris") == 1.0 and metrics.exact_match("Lyon", "Paris") == 0.0
    # LCS("b1 b2 b3 b4", "b1 x b3") = 2: P 2/4, R 2/3 -> F 4/7
    assert metrics.rouge_l("b1 b2 b3 b4", "b1 x b3") == pytest.approx(4 / 7)
    assert metrics.first_line("  42\nmore text") == "42"


def test_rouge_l_is_the_rouge_score_packages():
    # rouge-score, default tokenizer, no stemmer: "the" counts, LCS 4 of 5 words each way -> P = R = F = 0.8
    assert metrics.rouge_l("the cat sat on mat", "cat sat on the mat") == pytest.approx(0.8)
    assert metrics.rouge_l("Paris, France!", "paris france") == pytest.approx(1.0)
    assert metrics.exact_match("The Paris.", "paris") == 1.0  # exact match keeps SQuAD's normalisation


def test_the_schedule_is_transformers_warmup_cosine():
    import torch

    from damoc.train.args import TrainArgs
    from damoc.train.engine import build_engine

    model = torch.nn.Linear(2, 2)
    args = TrainArgs("c", "m", "t", "e", lr=1.0, warmup_ratio=0.2, max_steps=20, deepspeed=False, local=True)
    engine = build_engine(model, args, torch.float32, "cpu")
    lrs = []
    for _ in range(20):
        lrs.append(engine.lr)
        engine.optimizer.step()
        engine.scheduler.step()
    assert lrs[:4] == [0.0, 0.25, 0.5, 0.75] and lrs[4] == 1.0 and lrs[12] == pytest.approx(0.5)


def test_a_reused_trial_process_starts_deepspeed_again_after_train_destroyed_the_group():
    """Tune reuses a trial's process for the next candidate; Train's local controller ends a finished
    trial with torch's destroy_process_group, which DeepSpeed does not see."""
    import torch
    import torch.distributed as dist

    from damoc.train.args import TrainArgs
    from damoc.train.engine import build_engine
    from damoc.train.loop import local_process_group

    args = TrainArgs("c", "m", "t", "e", lr=0.1, max_steps=4, deepspeed=True, zero_stage=2, local=True)
    try:
        for trial in range(2):
            local_process_group()
            model = torch.nn.Linear(2, 1)
            engine = build_engine(model, args, torch.float32, torch.device("cpu"))  # failed on the 2nd trial
            before = model.weight.detach().clone()
            engine.backward(engine.module(torch.ones(4, 2)).sum())
            engine.step()
            assert not torch.equal(before, model.weight.detach()), trial
            dist.destroy_process_group()  # what the local controller does when a trial finishes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_deepspeed_imports_its_muon_optimizer_without_the_inductor_compiler():
    """deepspeed.initialize imports Muon, whose kernels torch.compile wraps at import: with torch's default
    backend that loads the inductor compiler into every trial process. Imported with the eager backend,
    it does not, and the default is put back. A fresh interpreter: this one may hold inductor already."""
    import subprocess
    import sys

    code = ("import sys, torch; from damoc.compat import MUON, import_muon_uncompiled; "
            "import_muon_uncompiled(); import torch.compiler as c; "
            "print(MUON in sys.modules, 'torch._inductor.compile_fx' in sys.modules, c.get_default_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines()[-1].split() == ["True", "False", "inductor"], out.stderr[-2000:]


def test_step_zero_scores_what_the_model_stage_scored(tiny_model, tokenizer_dir):
    """The compressed models' zero-shot figures in the report are their trials' step 0: the evaluation
    gives exactly the model stage's bits per byte for the same model and rows."""
    import torch

    from damoc.lm.load import load_causal_lm
    from damoc.lm.nll import rows_bits_per_byte
    from damoc.train.args import TrainArgs
    from damoc.train.evaluate import EvalSet, evaluate

    tok, model = load_causal_lm(str(tiny_model("llama", layers=2)))
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "" if i % 2 else f"row {i}", "output": str(2 * i)}
            for i in range(11)]
    args = TrainArgs("c", "m", "t", "e", max_length=64, eval_batch_size=4)
    got = evaluate(model, tok, EvalSet(tok, rows, args, 0, 1), args, torch.device("cpu"), False)["eval_loss"]
    assert got == rows_bits_per_byte(model, tok, rows, "qa", "auto", 64)


def test_batches_resume_where_they_stopped():
    from damoc.lm.tokens import Example

    exs = [Example([i], [i], 1) for i in range(10)]
    a = Batches(exs, 3, seed=1)
    seen = [[e.ids[0] for e in a.next()] for _ in range(7)]
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # one epoch: no repeats
    b = Batches(exs, 3, seed=1, position=4)
    assert [[e.ids[0] for e in b.next()] for _ in range(3)] == seen[4:]


# ---------------------------------------------------------------- scheduling


def test_a_wait_at_a_rung_asks_soon_then_less_often(monkeypatch):
    """Most waits end within a report or two (tens of ms): the first asks come 10 ms apart, then each
    pause is half as long again, up to 0.2 s."""
    import damoc.train.rungs as rungs

    pauses: list[float] = []
    monkeypatch.setattr(rungs.time, "sleep", pauses.append)
    answers = iter([False] * 12 + [True])
    poll_until(lambda: next(answers))
    assert pauses[:3] == pytest.approx([0.01, 0.015, 0.0225]) and len(pauses) == 12
    assert max(pauses) == 0.2 and pauses[-2:] == [0.2, 0.2]


def test_rungs_and_report_steps():
    assert asha_rungs(20, 2, 200) == [20, 40, 80, 160]
    assert asha_rungs(4, 3, 8) == [4]
    assert report_steps(12, 5, [4]) == {4, 5, 10, 12}


@pytest.mark.parametrize("n,rf", [(2, 2), (3, 2), (4, 2), (5, 2), (6, 3), (7, 3), (8, 2)])
def test_release_order_makes_ray_asha_keep_the_top_ceil_n_over_rf(n, rf):
    """Feed Ray's own ASHA bracket the rung results in our order: exactly the best ceil(n/rf) continue."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class T:
        def __init__(self, name):
            self.trial_id = name

    values = {f"t{i}": v for i, v in enumerate([0.31, 0.9, 0.12, 0.77, 0.5, 0.63, 0.05, 0.44][:n])}
    bracket = _Bracket(min_t=4, max_t=64, reduction_factor=rf, s=0)
    kept = {name for name in release_order(values, rf)
            if bracket.on_result(T(name), 4, values[name]) == TrialScheduler.CONTINUE}
    best = sorted(values, key=values.get, reverse=True)[: math.ceil(n / rf)]
    assert kept == set(best)


@pytest.mark.parametrize("keep", [1, 2, 3, 4, 5])
def test_release_order_makes_ray_asha_keep_any_best_prefix(keep):
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    class T:
        def __init__(self, name):
            self.trial_id = name

    values = {f"t{i}": v for i, v in enumerate([0.31, 0.9, 0.12, 0.77, 0.5, 0.63])}
    bracket = _Bracket(min_t=4, max_t=64, reduction_factor=2, s=0)
    kept = {name for name in release_order(values, 2, keep)
            if bracket.on_result(T(name), 4, values[name]) == TrialScheduler.CONTINUE}
    assert kept == set(sorted(values, key=values.get, reverse=True)[:keep])


def per_row(nll: list[float]) -> dict[int, dict[str, float]]:
    return {i: {"nll": v, "bytes": 1} for i, v in enumerate(nll)}


def evidence(previous, rows, trend=None):
    from damoc.train.rungs import Evidence

    return Evidence(previous, rows, trend)


def test_a_rung_stops_a_trial_only_when_the_ranking_is_steady():
    """Three trials, ASHA keeps 2 (values: higher is better, as the barrier ranks). c is behind on every
    eval row and was behind before: stopped. c within noise of b (its rows cross b's): kept, with the
    share of resamples that put it out. c ahead of b at the previous evaluation: kept. Without rows the
    previous ranking alone decides; confidence 0 is ASHA's cut."""
    values = {"a": -1.0, "b": -1.5, "c": -1.6}
    before = {"a": -1.1, "b": -1.6, "c": -1.7}
    a, b = per_row([1, 1, 1, 1, 1, 1]), per_row([1.5, 1.4, 1.6, 1.5, 1.5, 1.5])
    clear = {"a": a, "b": b, "c": per_row([1.6, 1.5, 1.7, 1.6, 1.6, 1.6])}

    def keep(prev, rows, confidence=0.9, base=2, vals=values):
        return stable_keep(vals, {n: evidence(prev.get(n), rows.get(n)) for n in vals}, base, confidence,
                           "eval_loss", "min", 0)

    assert keep(before, clear) == (2, {})
    close = {**clear, "c": per_row([1.9, 1.0, 1.9, 1.0, 1.9, 1.0])}
    k, why = keep(before, close)
    assert k == 3 and "paired resamples" in why["c"] and set(why) == {"c"}
    swapped = {**before, "b": -1.8}
    assert keep(swapped, clear) == (3, {"c": "it was ahead of the cut at its previous evaluation"})
    assert keep(before, {}) == (2, {})
    assert keep(swapped, close, confidence=0.0) == (2, {})
    four = {**values, "d": -2.0}
    k, why = keep({**before, "c": -1.0, "d": -2.1}, {}, base=1, vals=four)
    assert k == 3 and set(why) == {"b", "c"} and "above" in why["b"]  # c led before; b ranks above it


def test_a_trial_is_judged_where_its_trend_points_on_every_resample():
    """a leads now (1.0 bits) but is flat; b trails (1.1) falling 0.1 a step on every row, so by step 8
    it points to 0.5: on every resample b's projection beats a's, and a is stopped although it leads
    now. When b's fall is noise (half its rows rose), a is kept."""
    from damoc.paired import Trend

    values = {"a": -1.0, "b": -(1.1 - 0.1 * 6)}  # the rung scores: b's projected to step 8 from step 2
    a_now, a_before = per_row([1.0] * 6), per_row([1.0] * 6)
    b_now, b_before = per_row([1.1] * 6), per_row([1.2] * 6)
    ev = {"a": evidence(None, a_now, Trend(a_before, 1, 2, 8)), "b": evidence(None, b_now, Trend(b_before, 1, 2, 8))}
    assert stable_keep(values, ev, 1, 0.9, "eval_loss", "min", 0) == (1, {})
    r = Rungs(2, timeout_s=600, expected=2, confidence=0.9)  # the barrier says why a, ahead now, stops
    for n in ("a", "b"):
        r.join(n)
        r.arrive(n, 2, values[n], ev[n])
    assert r.turn("b", 2) and r.verdict("b", 2) == {}
    assert r.verdict("a", 2) == {"cut_because": "outside the best 1 in 100% of paired resamples of the eval rows, "
                                                "each trial judged where its trend points"}
    noisy = per_row([1.4, 0.8, 1.4, 0.8, 1.4, 1.4])  # mean 1.2 before, but rows went both ways
    b_now_noisy = per_row([1.0, 1.2, 1.0, 1.2, 1.1, 1.1])
    ev["b"] = evidence(None, b_now_noisy, Trend(noisy, 1, 2, 8))
    k, why = stable_keep(values, ev, 1, 0.9, "eval_loss", "min", 0)
    assert k == 2 and "paired resamples" in why["a"]


def test_a_barrier_keeps_the_unsteady_one_says_why_and_does_not_hold_for_a_decision():
    r = Rungs(2, timeout_s=600, expected=2, decide=True, confidence=0.9)
    for n in ("a", "b"):
        r.join(n)
    r.arrive("a", 4, -1.0, evidence(-1.2, per_row([1, 1, 1, 1])))
    r.arrive("b", 4, -1.1, evidence(-1.1, per_row([1.1, 1.1, 1.1, 1.1])))  # b led at the previous evaluation
    assert r.turn("b", 4) and r.order[4] == ["b", "a"] and r.kept[4] == 2  # both kept: worst first
    assert r.why_kept("b", 4) == "it was ahead of the cut at its previous evaluation" and r.why_kept("a", 4) is None
    assert not r.turn("a", 4)
    r.processed("b", 4)
    assert r.turn("a", 4) and not r.hold("a", 4, grace_s=5)  # two go on: this rung decides nothing


def test_the_one_kept_at_a_deciding_rung_holds_until_decided_then_ends():
    """Three trials, rf 2: at rung 2 two are kept (nobody holds); at rung 4 one of two is kept and every
    trial of the sweep has been seen, so the kept one waits after its report while the other is on its
    way out, until the driver says decided: then it ends there."""
    r = Rungs(2, timeout_s=600, expected=3, decide=True)
    for n in ("a", "b", "c"):
        r.join(n)
    for n, v in (("a", 0.5), ("b", 0.9), ("c", 0.1)):
        r.arrive(n, 2, v)
    assert r.turn("a", 2) and not r.turn("b", 2)  # the kept ones report worst first: a, then b
    assert [r.turn(n, 2) for n in r.order[2]] == [True, False, False]
    r.processed("a", 2)
    assert not r.hold("a", 2, grace_s=5)  # two kept: no decision here
    r.leave("c")
    r.arrive("a", 4, 0.4)
    r.arrive("b", 4, 0.95)
    assert r.order.get(4) is None and r.turn("b", 4) and r.order[4] == ["b", "a"]
    r.processed("b", 4)
    assert r.hold("b", 4, grace_s=5) and not r.hold("a", 4, grace_s=5)  # a still has to report and leave
    r.processed("a", 4)
    r.leave("a")
    assert r.hold("b", 4, grace_s=5)  # the driver has a few seconds to see a's end
    assert not r.hold("b", 4, grace_s=0)  # ... and when it does not say decided, b goes on
    assert not r.ends("b")
    r.mark_decided("b")
    assert not r.hold("b", 4, grace_s=5) and r.ends("b") and not r.ends("a")  # decided: b ends at this rung
    assert not Rungs(2, 600, expected=3, decide=False).ends("b")
    assert not Rungs(2, 600, expected=3, decide=False).hold("b", 4, 5)  # finish_winner: nobody holds


def test_the_kept_one_holds_for_late_trials_and_goes_on_when_one_is_kept_too():
    """Four trials, two slots: a and b meet at rung 4 (b kept, a stopped) while c and d have not started.
    b holds while they are still to start or to be judged at 4 (each may be stopped below it: then 4
    decides); d, arriving late at 4 and better than the cutoff ASHA applies there, is kept too, so b goes
    on. A late arrival worse than the cutoff is stopped and b keeps holding."""
    def sweep(d_value):
        r = Rungs(2, timeout_s=600, expected=4, decide=True)
        for n in ("a", "b"):
            r.join(n)
            r.arrive(n, 2, {"a": 0.5, "b": 0.9}[n])
        r.order[2] = release_order(r.arrived[2], 2)
        r.arrive("a", 4, 0.4)
        r.arrive("b", 4, 0.95)
        assert r.turn("b", 4) and r.order[4] == ["b", "a"]
        r.leave("a")
        assert r.hold("b", 4, grace_s=0)  # c and d are still to start
        r.join("c")
        r.arrive("c", 2, 0.1)
        assert r.turn("c", 2) and r.hold("b", 4, grace_s=0)  # c is running (it will be stopped at 2)
        r.leave("c")
        r.join("d")
        for rung, v in ((2, 0.7), (4, d_value)):
            r.arrive("d", rung, v)
            assert r.turn("d", rung)
        return r

    contested = sweep(0.99)  # the cutoff at 4 is the median of {0.4, 0.95}: 0.675
    assert 4 in contested.contested and not contested.hold("b", 4, grace_s=0)
    stopped = sweep(0.6)
    assert 4 not in stopped.contested and stopped.hold("b", 4, grace_s=0)
    stopped.leave("d")
    assert stopped.hold("b", 4, grace_s=5) and not stopped.hold("b", 4, grace_s=0)  # the driver's grace, then on
    stopped.timeout_s = 0
    assert not stopped.hold("b", 4, grace_s=5)  # never past the rung's timeout


def test_trial_concurrency_from_cluster_resources():
    assert worker_resources(2, False, None) == {"CPU": 2}
    assert worker_resources(2, True, {"CPU": 4}) == {"CPU": 8, "GPU": 2}
    assert fitting({"CPU": 6.0}, {"CPU": 2}) == 3
    assert fitting({"CPU": 64.0, "GPU": 8.0}, {"CPU": 8, "GPU": 2}) == 4
    assert fitting({"CPU": 1.0}, {"CPU": 2}) == 0


def test_epochs_set_the_steps_capped_by_max_steps():
    from damoc.spec import FinetuneSpec

    assert planned_steps(FinetuneSpec(max_steps=200), 10_000) == 200  # no epochs: max_steps
    ft = FinetuneSpec(epochs=2, batch_size=8, num_workers=2, grad_accum=2, max_steps=1000)
    assert planned_steps(ft, 1000) == 63  # ceil(2 x 1000 / 32)
    assert planned_steps(ft, 200) == 13  # a fifth of the data, a fifth of the steps (rounded up)
    assert planned_steps(ft, 100_000) == 1000
    assert planned_steps(ft, 0) == 1


# ---------------------------------------------------------------- ranking, compare, render


def entry(name, status, score, steps, **kw):
    return {"name": name, "status": status, "score": score, "steps": steps, "worker_seconds": 10.0, **kw}


def test_ranking_finished_first_then_stopped_deepest_first_failed_unranked():
    rows = rank_candidates([
        entry("s1", "stopped_early", 0.5, 20), entry("f1", "finished", 2.0, 80), entry("x", "failed", None, 0,
                                                                                        reason="boom"),
        entry("s2", "stopped_early", 0.1, 40), entry("f2", "finished", 1.0, 80)], mode="min")
    assert [(r["name"], r["rank"]) for r in rows] == [("f2", 1), ("f1", 2), ("s2", 3), ("s1", 4), ("x", None)]
    assert rows[-1]["reason"] == "boom" and rows[2]["stopped_early"] and not rows[0]["stopped_early"]


def write_ranking(run, ranks_scores, ws, flops, metric="eval_loss"):
    (run / "report").mkdir(parents=True)
    cands = [{"name": n, "rank": r, "score": s} for n, (r, s) in ranks_scores.items()]
    (run / "report" / "ranking.json").write_text(json.dumps({
        "metric": metric, "mode": "min", "candidates": cands,
        "cost": {"worker_seconds": ws, "train_flops": flops}}))
    return run


def test_compare_two_runs(tmp_path):
    a = write_ranking(tmp_path / "a", {"x": (1, 0.9), "y": (2, 0.8), "z": (3, 5.0)}, 100.0, 1e9)
    b = write_ranking(tmp_path / "b", {"x": (2, 1.2), "y": (1, 1.0), "z": (3, 2.0)}, 2500.0, 3e10)
    c = compare_runs(a, b)
    assert c["kendall_tau"] == pytest.approx(1 / 3) and c["spearman"] == pytest.approx(0.5)
    assert c["top1_hit"] is False and c["choice_a"] == "x" and c["best_b"] == "y"
    assert c["rel_acc"] == pytest.approx((2.0 - 1.2) / (2.0 - 1.0))
    assert c["cost_ratio_worker_seconds"] == 25.0 and c["cost_ratio_train_flops"] == 30.0
    other = write_ranking(tmp_path / "c", {"x": (1, 0.1), "y": (2, 0.2)}, 1.0, 1.0, metric="rouge_l")
    with pytest.raises(ValueError, match="different metrics"):
        compare_runs(a, other)


def test_compare_says_when_the_runs_are_not_like_for_like(tmp_path):
    """Same eval rows as JSONL-born or CSV-born Parquet hash alike; other rows, candidates, models or training
    data are each named."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from damoc.report.compare import format_comparison

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    runs = {}
    for name, ranks, eval_rows, train in (("a", {"x": (1, 0.9), "y": (2, 0.8)}, rows, "data/t.jsonl"),
                                          ("b", {"x": (1, 1.0), "y": (2, 1.1)}, rows[::-1], "data/t.jsonl"),
                                          ("c", {"x": (1, 1.0), "y": (2, 1.1), "w": (3, 2.0)}, rows[:3] + [
                                              {"instruction": "q9", "input": "", "output": "a9"}], "data/t.csv")):
        run = write_ranking(tmp_path / name, ranks, 1.0, 1.0)
        (run / "data").mkdir()
        pq.write_table(pa.Table.from_pylist(eval_rows), run / "data" / "eval.parquet")
        (run / "spec.yaml").write_text(yaml.safe_dump({"data": {"train": {"path": train}}}))
        runs[name] = run
    assert compare_runs(runs["a"], runs["b"])["warnings"] == []  # the same rows, in another order
    warnings = compare_runs(runs["a"], runs["c"])["warnings"]
    assert warnings == ["the runs were evaluated on different rows (3 in common of A's 5 and B's 4): their "
                        "scores are not comparable, only their orders",
                        "the runs have different candidates: w only in B",
                        "the runs trained on different data: data/t.jsonl vs data/t.csv"]
    assert format_comparison(compare_runs(runs["a"], runs["c"]), "a", "c").startswith("WARNING: the runs were")


def test_render_escapes_and_references_images():
    blocks = [("h1", "R <1>"), ("table", ["a", "b"], [["x|y", 1.5], [None, 12345678.0]]), ("img", "p.png", "cap")]
    md, page = to_markdown(blocks), to_html(blocks, "t")
    assert "| x\\|y | 1.5 |" in md and "![cap](p.png)" in md
    assert "R &lt;1&gt;" in page and '<img src="p.png"' in page and "1.235e+07" in page


def test_rungs_judge_where_an_improving_trend_points_by_the_planned_end():
    """A trial falling 0.043 a step from 1.635 to 1.549 by step 2 of 6 scores 1.377 (1.549 - 4 x 0.043) and
    beats one at 1.443 falling 0.0065 a step (1.417): ASHA keeps it. Flat or worsening curves score
    their metric; so do the first report and the last step; `max` metrics move the other way."""
    from damoc.train.rungs import rung_score

    assert rung_score(1.549, (0, 1.635), 2, 6, "min") == pytest.approx(1.549 - 4 * 0.043)
    assert rung_score(1.443, (0, 1.456), 2, 6, "min") == pytest.approx(1.443 - 4 * 0.0065)
    assert rung_score(1.5, (0, 1.4), 2, 6, "min") == 1.5  # worse than before: not extrapolated
    assert rung_score(1.5, None, 0, 6, "min") == 1.5 and rung_score(1.2, (4, 1.3), 6, 6, "min") == 1.2
    assert rung_score(0.5, [2, 0.3], 4, 8, "max") == pytest.approx(0.5 + 0.1 * 4)  # resumed: JSON lists
    assert rung_score(0.3, (2, 0.5), 4, 8, "max") == 0.3


def test_the_report_says_who_went_on_past_asha_s_cut_and_the_saving_reached():
    from damoc.report.build import steadiness_note

    finetune = {"candidates": [{"name": "a"}, {"name": "b", "kept_because": {"16": "x", "8": "y"}}]}
    note = steadiness_note(finetune, {"savings": {"ratio": 3.25}})
    assert note == ("The ranking came before the saving: b went on from step 8 (y); b went on from step 16 (x). "
                    "ASHA's cut alone would have stopped it there; the saving this run reached is 3.2x (Cost).")
    assert steadiness_note({"candidates": [{"name": "a"}]}, {}) == ""


def test_the_full_projection_uses_steady_steps_and_rows_as_long_as_the_readable_ones(tmp_path):
    """Two trials whose first steps took 2 s each: the throughput is taken from the steps after them
    (3.5e9 FLOPs in 4 s), and a full run pays start-up and one first step (3 s). The kept rows are 100
    chars long, the dropped 50: full runs train on rows 0.75x as long (20 tokens a row uncompressed -> 15)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from damoc.report.savings import savings

    run = tmp_path
    (run / "finetune").mkdir()
    (run / "data").mkdir()
    (run / "models" / "a").mkdir(parents=True)
    entry = {"workers": 1, "warmup_seconds": 2.0, "warmup_steps": 1}
    results = {"candidates": [
        {**entry, "name": "a", "steps": 4, "train_flops": 4e9, "train_tokens": 320, "timeline": {"training": 5.0, "fixed": 1.0}},
        {**entry, "name": "b", "steps": 2, "train_flops": 1e9, "train_tokens": 160, "forward_params": 2e6,
         "timeline": {"training": 3.0, "fixed": 1.0}}]}
    (run / "finetune" / "results.json").write_text(json.dumps(results))
    (run / "models" / "a" / "compression.json").write_text(json.dumps({"params_before": 1e6}))
    (run / "data" / "manifest.json").write_text(json.dumps({"kept": 2, "readable": 4, "tokens_before": 30,
                                                            "tokens_after": 10}))
    pq.write_table(pa.table({"chars": [100, 100]}), run / "data" / "train.parquet")
    pq.write_table(pa.table({"chars": [50, 50]}), run / "data" / "dropped.parquet")
    (run / "spec.yaml").write_text(yaml.safe_dump({"finetune": {"batch_size": 8, "num_workers": 1, "max_steps": 10, "epochs": 1}}))
    out = savings(run, {"cost": {"worker_seconds": 10.0, "train_flops": 5e9}})
    rate = 3.5e9 / 4
    want = {"a": 6 * 1e6 * 8 * 15, "b": 6 * 2e6 * 8 * 15}
    for name, flops in want.items():
        assert out["per_candidate"][name] == {"flops": pytest.approx(flops), "worker_seconds": pytest.approx(flops / rate + 3)}
    assert out["ratio"] == pytest.approx(sum(f / rate + 3 for f in want.values()) / 10)
    assert "after each trial's first step" in out["assumptions"][0] and "0.75x as long" in out["assumptions"][2]
    for e in results["candidates"]:  # a run from before the first step was timed: every step counts
        del e["warmup_seconds"], e["warmup_steps"]
    (run / "finetune" / "results.json").write_text(json.dumps(results))
    (run / "data" / "dropped.parquet").unlink()
    out = savings(run, {"cost": {"worker_seconds": 10.0, "train_flops": 5e9}})
    assert out["per_candidate"]["a"]["worker_seconds"] == pytest.approx(6 * 1e6 * 8 * 20 / (5e9 / 8) + 1)


def test_the_terminal_cuts_a_reason_at_a_word_never_inside_one():
    from damoc.report.build import note

    reason = ("OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
              "them in the cached files")
    short = note({"reason": reason})
    assert len(short) <= 70 and short.endswith(" ... (whole in the report)")
    assert reason.startswith(short.removesuffix(" ... (whole in the report)") + " ")  # whole words only
    assert note({"note": "decided at step 4"}) == "decided at step 4" and note({}) == ""


def test_how_sure_says_which_way_the_paired_difference_points():
    from damoc.report.build import sureness

    def ranking(lo, hi, tied, mode="min"):
        return {"metric": "eval_loss", "mode": mode, "confidence": {
            "pick": "a", "p_best": 0.97, "replicates": 1000, "rows": 80,
            "vs": {"b": {"step": 8, "p_pick_better": 0.97, "difference": [lo, hi], "tied": tied},
                   "c": {"step": 4, "p_pick_better": 1.0, "difference": [0.5, 0.9], "tied": False}}}}

    ahead = sureness(ranking(0.02, 0.08, False))
    assert ahead.startswith("How sure: a's eval_loss is lower than that of the closest rival, b at step 8 "
                            "(where it was last evaluated), by 0.02 to 0.08") and "beats every other candidate in 97%" in ahead
    assert sureness(ranking(-0.01, 0.03, True)).startswith("How sure: too close to call between a and b")
    behind = sureness(ranking(-0.12, -0.07, False))
    assert behind.startswith("How sure: not on these figures. b's eval_loss at step 8") and "learning curve" in behind
    trend = ranking(-0.12, -0.07, False)
    trend["candidates"] = [{"name": "b", "cut_because": {"8": "outside the best 1 in 96% of paired resamples"}}]
    assert "the rung at step 8 stopped b as outside the best 1 in 96% of paired resamples" in sureness(trend)
    assert sureness(ranking(-0.12, -0.07, False, mode="max")).startswith("How sure: a's eval_loss is higher")
    assert sureness({"mode": "min", "metric": "eval_loss"}) == ""
