"""The reference-LM scorer and the judge, on tiny models built here."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd
import torch
from conftest import LOOKUP

from damoc.data.lm import LMScorer
from damoc.data.ops.llm_judge import DIGITS, JudgeScorer


def test_ifd_below_one_when_the_instruction_makes_the_answer_certain(lookup_model):
    scorer = LMScorer(str(lookup_model), max_length=64)
    qs, answers = zip(*LOOKUP[:4])
    out = scorer({"instruction": np.array(qs), "input": np.array([""] * 4), "output": np.array(answers)})
    assert (out["ifd"] < 0.5).all(), out["ifd"]
    assert (out["ce_cond"] < out["ce_alone"]).all()
    assert np.allclose(out["ppl"], np.exp(out["ce_cond"]), rtol=1e-5)
    emb = np.stack(out["embedding"])
    assert emb.shape[0] == 4 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_judge_reads_the_digit_distribution(lookup_model, tmp_path):
    prompt = tmp_path / "judge.txt"
    prompt.write_text("Rate: {instruction} / {input} / {output}\nScore:")
    judge = JudgeScorer({"model": str(lookup_model), "prompt_file": str(prompt)})
    df = pd.DataFrame({"instruction": ["Capital of Peru?"], "input": [""], "output": ["Lima"],
                       "reason": [None], "drop": [None], "split": ["train"]})
    got = judge(df)["judge"].iloc[0]
    text = "Rate: Capital of Peru? /  / Lima\nScore:"
    with torch.no_grad():
        logits = judge.model(**judge.tok([text], return_tensors="pt")).logits[0, -1]
    ids = [judge.tok(d, add_special_tokens=False)["input_ids"][0] for d in DIGITS]
    p = torch.softmax(logits[ids].double(), 0).numpy()
    assert abs(got - float((p * np.arange(1, 6)).sum())) < 1e-6 and 1.0 <= got <= 5.0


def test_the_reference_lm_is_the_smallest_loadable_candidate(tmp_path, tiny_model):
    """By parameter count from the weights' headers; a smaller candidate whose weights were cut short is
    passed over (it would take the data stage down, naming no candidate); none loadable: each one named."""
    import shutil

    from damoc.data.lm import smallest_model

    small, large = str(tiny_model("llama", layers=2)), str(tiny_model("llama", layers=4))
    assert smallest_model([large, small]) == small
    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert smallest_model([str(broken), large]) == large
    with pytest.raises(ValueError, match="no candidate can serve .* broken: model.safetensors is not a safetensors file or is truncated"):
        smallest_model([str(broken)])


def test_row_shares_are_even_stable_and_independent_of_the_names_order():
    import numpy as np

    from damoc.data.lm import row_key, shares
    from damoc.data.selection import split_budget

    keys = [row_key(f"q{i}", "", f"a{i}") for i in range(3000)]
    three = shares(keys, ["a", "b", "c"], seed=0)
    assert (np.bincount(three) > 900).all()
    assert (np.array(["c", "a", "b"])[shares(keys, ["c", "a", "b"], 0)] == np.array(["a", "b", "c"])[three]).all()
    two = np.array(["a", "c"])[shares(keys, ["a", "c"], 0)]  # "b" gone: only its rows move
    assert (two[three != 1] == np.array(["a", "b", "c"])[three][three != 1]).all()
    assert (shares(keys, ["solo"], 0) == 0).all()
    assert split_budget(10, [5, 5, 5]) == [4, 3, 3] and split_budget(7, [0, 10]) == [0, 7] and split_budget(0, [0]) == [0]
