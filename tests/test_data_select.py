"""Selection functions, tested exactly on small arrays."""

from __future__ import annotations

import numpy as np

from damoc.data.compress import compress_fields, covers, keep_mask, rebuild, word_groups
from damoc.data.ops.llm_judge import expected_digit
from damoc.data.ops.rules import repetition_ratio, special_ratio
from damoc.data.select import (
    balanced_quota,
    deita_admit,
    estimated_jaccard,
    k_center,
    kmeans,
    lsh_shape,
    minhash,
    minhash_params,
    shingles,
    top_k,
)


def test_k_center_picks_the_known_farthest_points():
    pts = np.array([[0, 0], [1, 0], [0, 1], [10, 0], [0, 11], [5, 5], [-20, 0]], dtype=float)
    # From the earliest row (0,0): farthest is (-20,0); then (0,11) at 11; then (10,0) at 10.
    assert k_center(pts, 4).tolist() == [0, 6, 4, 3]


def test_k_center_ties_go_to_the_earlier_row():
    pts = np.array([[0.0], [1.0], [-1.0]])
    assert k_center(pts, 2).tolist() == [0, 1]
    assert k_center(pts, 2, order=np.array([0, 9, 5])).tolist() == [0, 2]


def test_deita_admits_by_score_and_rejects_the_similar():
    emb = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.7, 0.7], [-1, 0]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    admitted, similar = deita_admit(scores, emb, tau=0.9, k=3)
    assert admitted.tolist() == [0, 2, 3]  # row 1 is ~row 0 (cos 0.99): rejected
    assert similar.tolist() == [1]
    admitted, _ = deita_admit(scores, emb, tau=0.9, k=10)
    assert admitted.tolist() == [0, 2, 3, 4]


def test_top_k_breaks_ties_by_order_and_ranks_nan_last():
    scores = np.array([0.5, np.nan, 0.9, 0.5, 0.9])
    assert top_k(scores, np.array([4, 0, 3, 1, 2]), 4).tolist() == [4, 2, 3, 0]


def test_balanced_quota_gives_leftovers_to_large_clusters():
    assert balanced_quota(np.array([10, 1, 10]), 9).tolist() == [4, 1, 4]
    assert balanced_quota(np.array([2, 2, 2]), 6).tolist() == [2, 2, 2]
    assert balanced_quota(np.array([5, 0, 5]), 3).sum() == 3


def test_kmeans_separates_two_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    _, labels = kmeans(x, 2)
    assert len(set(labels[:50])) == 1 and len(set(labels[50:])) == 1 and labels[0] != labels[-1]


def test_minhash_estimates_jaccard():
    a, b = minhash_params(256)
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    same = minhash(shingles(base.upper() + "  "), a, b)  # case and spacing do not matter
    assert estimated_jaccard(minhash(shingles(base), a, b), same) == 1.0
    other = minhash(shingles("an entirely different sentence about ray clusters and models"), a, b)
    assert estimated_jaccard(minhash(shingles(base), a, b), other) < 0.1
    bands, rows = lsh_shape(0.8, 128)
    assert bands * rows == 128 and (1 / bands) ** (1 / rows) < 0.8


def test_rule_stats():
    assert repetition_ratio("a b c a b c a b c") == 1 - 3 / 7
    assert repetition_ratio("one two") == 0.0
    assert special_ratio("ab!!") == 0.5


def test_judge_score_is_the_expectation_over_digits():
    logits = np.zeros((2, 10))
    logits[0, [3, 4, 5, 6, 7]] = [0, 0, 0, 0, 0]  # uniform over 1..5 -> 3
    logits[1, [3, 4, 5, 6, 7]] = [-50, -50, -50, np.log(1.0), np.log(3.0)]  # p(4)=.25, p(5)=.75
    got = expected_digit(logits, [3, 4, 5, 6, 7])
    assert np.allclose(got, [3.0, 4.75])


def test_token_compression_keeps_forced_tokens_and_order():
    text = "Compute 12 plus 7: what is it?"
    pieces = ["Compute", " 12", " plus", " 7", ":", " what", " is", " it", "?"]
    spans, pos = [], 0
    for p in pieces:
        start = text.index(p.strip(), pos)
        spans.append((start, start + len(p.strip())))
        pos = start + len(p.strip())
    info = [9.0, 1.0, 5.0, 1.0, 0.1, 0.2, 0.3, 6.0, 0.1]
    cov = covers(spans, len(text))
    keep = keep_mask(info, [text[a:b] for a, b in cov], 0.67, ("\n", "?", ":"))
    # ceil(0.67*9)=7: forced " 12", " 7", ":", "?" plus the 3 most informative others.
    assert keep.tolist() == [True, True, True, True, True, False, False, True, True]
    assert rebuild(text, cov, keep, 0, len(text)) == "Compute 12 plus 7: it?"


def test_word_level_compression_keeps_or_drops_whole_words():
    text = "What is the capital of France?"
    words = ["What", " is", " the", " cap", "ital", " of", " Fr", "ance", "?"]
    spans, pos = [], 0
    for w in words:
        start = text.index(w.strip(), pos)
        spans.append((start, start + len(w.strip())))
        pos = start + len(w.strip())
    cov = covers(spans, len(text))
    assert word_groups(text, cov) == [[0], [1], [2], [3, 4], [5], [6, 7, 8]]
    info = [9.0, 0.1, 0.2, 4.0, 6.0, 0.3, 1.0, 1.0, 0.1]
    # ceil(0.6*9)=6 tokens: "France?" is forced (its "?") = 3, then "capital" (mean 5.0, 2 tokens)
    # and "What" (9.0, 1 token); subword pieces never split a word.
    keep = keep_mask(info, [text[a:b] for a, b in cov], 0.6, ("?",), word_groups(text, cov))
    assert rebuild(text, cov, keep, 0, len(text)) == "What capital France?"
    # granularity token (words=False): the same budget spent piece by piece, cutting inside words
    info[5] = 2.0  # " of": now above " Fr" and " ance" but below every whole word kept before
    fields, before, after = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.6, ("?",), words=False)
    assert (before, after) == (9, 6) and fields["q"] == "What capital of Fr?"
    fields, _, after = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.6, ("?",))
    assert after == 6 and fields["q"] == "What capital France?"


def test_compression_shortens_the_fields_and_leaves_the_template():
    from damoc.lm.prompts import render

    p = render("qa", "What is the capital city of France", "a country in Europe")
    spans = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", p.text)]
    info = [float(len(p.text[a:b])) for a, b in spans]  # longer words carry more information
    fields, before, after = compress_fields(p.text, p.fields, spans, info, 0.5, ("?", ":"))
    # 11 words in the two fields ("Question:"/"Answer:" are not counted), ceil(0.5 * 11) = 6 kept: the
    # longest, ties to the earlier word.
    assert (before, after) == (11, 6)
    assert fields["instruction"] == "What capital city France" and fields["input"] == "country Europe"


def test_every_operator_is_registered_whatever_was_imported_first():
    import damoc.data.ops.rules  # noqa: F401  (a direct import must not hide the others)
    from damoc.data.ops import MODULES, OPERATORS, get_operator

    get_operator("rules")
    assert set(MODULES) == set(OPERATORS)


def test_keep_ratio_shortfall_names_the_operator_responsible():
    """keep_ratio 0.2 of 903 readable rows asks for 181; ifd>1 dropped 802 before the budget: said, with
    the operator that did it. Meeting the budget (or having none) says nothing."""
    from types import SimpleNamespace

    from damoc.data.output import budget_note

    plan = SimpleNamespace(chain=[SimpleNamespace(name="ifd_filter"), SimpleNamespace(name="top_k")])
    dropped = {"ifd>1": 802, "below_budget:top_k": 7, "held_out_eval": 90}
    assert budget_note(0.2, 181, 94, dropped, plan) == (
        "keep_ratio 0.2 asked for 181 rows but 94 were kept: ifd>1 dropped 802 (ifd_filter) before the budget applied")
    assert budget_note(0.2, 181, 181, dropped, plan) is None and budget_note(0.2, None, 5, dropped, plan) is None


def _pieces(text: str, size: int = 3) -> list[tuple[int, int]]:
    """Token spans: each word cut into pieces of `size` characters (long words are many tokens)."""
    import re

    return [(m.start() + i, min(m.end(), m.start() + i + size)) for m in re.finditer(r"\S+", text)
            for i in range(0, m.end() - m.start(), size)]


def test_identifiers_and_the_answers_key_words_are_never_dropped():
    text = "What does the Python function os.path.basename do with a trailing slash"
    spans = _pieces(text)
    # the identifier's later pieces are predictable: its mean information is the lowest of all words
    info = [0.1 if text[a - 1] not in " " and a > 0 and text[a:b] != "What" else 5.0 for a, b in spans]
    fields, before, after = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.5, ("?",),
                                            answer="Returns the final component; a trailing slash gives ''.")
    assert "os.path.basename" in fields["q"] and "trailing" in fields["q"] and "slash" in fields["q"]
    alone, _, _ = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.5, ("?",))
    assert "os.path.basename" in alone["q"]  # identifiers stay without an answer too
    assert after <= before / 2 + 1 and "What" not in fields["q"]


def test_the_ratio_holds_over_the_rows_when_long_words_do_not_fit_a_rows_share():
    """Rows whose identifier is too long for what is left of the row's share: row by row it is skipped
    and the row keeps far less than asked; carried over, the rows settle the ratio between them and
    every other row keeps its identifier."""
    rng = np.random.default_rng(0)
    totals = {"row": [0, 0], "carried": [0, 0]}
    kept_names, owed = 0, 0.0
    for i in range(200):
        words = list(rng.choice(["x", "y", "z", "ab", "cd"], size=int(rng.integers(2, 5))))
        text = " ".join(words + [f"configuration_parameter_{chr(97 + i % 26)}_value"])
        spans = _pieces(text)
        info = rng.random(len(spans)).tolist()
        _, b, a = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.6, ("?",))
        totals["row"][0] += b
        totals["row"][1] += a
        fields, b, a = compress_fields(text, {"q": (0, len(text))}, spans, info, 0.6, ("?",), carry=-owed)
        owed += a - 0.6 * b
        totals["carried"][0] += b
        totals["carried"][1] += a
        kept_names += "configuration_parameter" in fields["q"]
    row, carried = (t[1] / t[0] for t in totals.values())
    assert row < 0.5 and abs(carried - 0.6) <= 0.02 and kept_names >= 80
