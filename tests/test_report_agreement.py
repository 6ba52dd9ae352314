"""Ranking agreement: exact values on small hand-checked rankings."""

from __future__ import annotations

import pytest

from damoc.report.agreement import kendall_tau, rel_acc, spearman, top1_hit

TRUTH = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}  # losses: a is best


def test_identical_and_reversed_rankings():
    assert kendall_tau(TRUTH, TRUTH) == 1.0 and spearman(TRUTH, TRUTH) == 1.0
    rev = {k: -v for k, v in TRUTH.items()}
    assert kendall_tau(TRUTH, rev) == -1.0 and spearman(TRUTH, rev) == -1.0


def test_one_swap():
    swapped = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}
    assert kendall_tau(swapped, TRUTH) == pytest.approx((5 - 1) / 6)  # 5 concordant, 1 discordant pair
    assert spearman(swapped, TRUTH) == pytest.approx(1 - 6 * 2 / (4 * 15))  # sum d^2 = 2
    assert top1_hit(swapped, TRUTH, "min") and rel_acc(swapped, TRUTH, "min") == 1.0


def test_ties_use_tau_b_and_average_ranks():
    tied = {"a": 1.0, "b": 1.0, "c": 3.0, "d": 4.0}
    # 5 concordant, 0 discordant, 1 pair tied in `tied` only: 5 / sqrt(6 * 5)
    assert kendall_tau(tied, TRUTH) == pytest.approx(5 / (6 * 5) ** 0.5)
    assert spearman(tied, TRUTH) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)  # ranks 1.5,1.5,3,4 vs 1,2,3,4


def test_rel_acc_and_top1_of_a_wrong_pick():
    picks_c = {"a": 5.0, "b": 6.0, "c": 0.5, "d": 7.0}
    assert not top1_hit(picks_c, TRUTH, "min")
    assert rel_acc(picks_c, TRUTH, "min") == pytest.approx((4 - 3) / (4 - 1))
    accuracy = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.1}  # higher is better
    assert rel_acc({"a": 0.1, "b": 0.2, "c": 0.9, "d": 0.0}, accuracy, "max") == pytest.approx((0.7 - 0.1) / 0.8)


def test_only_common_candidates_count_and_two_are_needed():
    assert kendall_tau({**TRUTH, "e": 9.0}, TRUTH) == 1.0
    with pytest.raises(ValueError, match="at least two"):
        kendall_tau({"a": 1.0}, TRUTH)


def test_the_zero_shot_table_takes_the_compressed_figures_from_the_trials_step_0(tmp_path):
    """The original models' zero-shot loss comes from the model stage; the compressed models' from their
    trials' step 0 (the same model on the same rows), unless an older run measured it in the model stage."""
    import json

    from damoc.report.ranking import zero_shot_ranking

    zs = {"a": {"original": 3.0, "rows": 4}, "b": {"original": 2.0, "compressed": 2.5, "rows": 4}}
    for name, z in zs.items():
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "compression.json").write_text(json.dumps({"zero_shot": z}))
    finetune = {"candidates": [{"name": n, "curve": [{"step": 0, "eval_loss": v}, {"step": 4, "eval_loss": v - 1}]}
                               for n, v in (("a", 3.4), ("b", 2.2))]}
    ranking = {"candidates": [{"name": "a", "rank": 1}, {"name": "b", "rank": 2}]}
    z = zero_shot_ranking(tmp_path, finetune, ranking)
    assert z["scores"] == {"a": 3.0, "b": 2.0} and z["compressed"] == {"a": 3.4, "b": 2.5}
    assert z["pick"] == "b" and not z["agrees_on_pick"] and z["source"] == "original models (model stage)"


def test_the_zero_shot_sentence_claims_only_what_the_run_measured(tmp_path):
    """Agreeing; disagreeing in a DaMoC run (not judged: this run is no reference); disagreeing in a full
    fine-tuning run (the free guess was wrong); and every candidate ending worse than its original began."""
    import json

    import yaml

    from damoc.report.build import zero_shot_verdict
    from damoc.report.ranking import zero_shot_ranking

    for name, orig in (("a", 3.0), ("b", 2.0)):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "compression.json").write_text(json.dumps({"zero_shot": {"original": orig}}))

    def verdict(finals: dict[str, float], spec: dict) -> str:
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        finetune = {"candidates": [{"name": n, "curve": [{"step": 0, "eval_loss": 9.0}], "final": {"eval_loss": v}}
                                   for n, v in finals.items()]}
        order = sorted(finals, key=finals.get)
        ranking = {"candidates": [{"name": n, "rank": i + 1} for i, n in enumerate(order)]}
        return zero_shot_verdict(zero_shot_ranking(tmp_path, finetune, ranking), order[0])

    damoc = {"model": {"enabled": True}, "tune": {"scheduler": "asha"}}
    full = {"data": {"filter": {"method": "none"}, "compress": {"enabled": False}}, "model": {"enabled": False},
            "tune": {"scheduler": "none"}}
    assert verdict({"a": 2.5, "b": 1.5}, damoc) == "Zero-shot loss picks b, as this run does."
    said = verdict({"a": 1.5, "b": 1.8}, damoc)
    assert said.startswith("Zero-shot loss would pick b; DaMoC's short fine-tuning") and "cannot say which" in said
    assert "wrong" not in said and "worse than its unpruned original" not in said
    assert "the free guess would have been wrong here" in verdict({"a": 1.5, "b": 1.8}, full)
    assert "Every candidate ended worse than its unpruned original started" in verdict({"a": 3.5, "b": 2.4}, damoc)


def test_the_data_section_says_who_scored_the_rows_and_whether_that_can_favour_one():
    from damoc.report.build import scorers_note

    shared = {"reference_lm": {"rule": "shared", "models": {"a": {"rows": 51}, "b": {"rows": 49}}}}
    assert "a (51), b (49)" in scorers_note(shared) and "favours no candidate" in scorers_note(shared)
    one = {"reference_lm": {"rule": "smallest", "models": {"a": {"rows": 100}}}}
    assert "may favour it" in scorers_note(one)
    assert "only local candidate" in scorers_note({"reference_lm": {"rule": "shared", "models": {"a": {"rows": 9}}}})
    assert scorers_note({}) is None  # a manifest from before the rule: nothing claimed
