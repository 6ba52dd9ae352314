"""How far two rankings of the same candidates agree: pure functions on {name: score}.

Scores are oriented by `mode`: "min" when lower is better (eval_loss), "max" otherwise.
Only candidates scored in both runs are compared.
"""

from __future__ import annotations

import math


def _common(a: dict[str, float], b: dict[str, float]) -> list[str]:
    names = sorted(set(a) & set(b))
    if len(names) < 2:
        raise ValueError(f"need at least two candidates scored in both runs, got {names}")
    return names


def kendall_tau(a: dict[str, float], b: dict[str, float]) -> float:
    """Kendall's tau-b (ties in either ranking handled); 1 = same order, -1 = reversed."""
    names = _common(a, b)
    concordant = discordant = ties_a = ties_b = 0
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            da, db = a[x] - a[y], b[x] - b[y]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denom if denom else 0.0


def ranks(scores: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    out = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman's rho: Pearson correlation of the (average) ranks."""
    names = _common(a, b)
    ra, rb = ranks([a[n] for n in names]), ranks([b[n] for n in names])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


def best(scores: dict[str, float], mode: str) -> str:
    """The winner (ties broken by name, so the choice is stable)."""
    sign = 1 if mode == "min" else -1
    return min(sorted(scores), key=lambda n: sign * scores[n])


def top1_hit(choice: dict[str, float], truth: dict[str, float], mode: str) -> bool:
    """Does `choice` pick a candidate that is best under `truth` (any of the tied best)?"""
    names = _common(choice, truth)
    picked = best({n: choice[n] for n in names}, mode)
    return truth[picked] == truth[best({n: truth[n] for n in names}, mode)]


def rel_acc(choice: dict[str, float], truth: dict[str, float], mode: str) -> float:
    """RelAcc of `choice`'s pick under `truth`: (worst - picked) / (worst - best), 1 = the best."""
    names = _common(choice, truth)
    t = {n: truth[n] for n in names}
    picked = t[best({n: choice[n] for n in names}, mode)]
    hi, lo = max(t.values()), min(t.values())
    worst, top = (hi, lo) if mode == "min" else (lo, hi)
    return 1.0 if worst == top else (worst - picked) / (worst - top)
