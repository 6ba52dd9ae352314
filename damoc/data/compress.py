"""Token compression (Selective Context / LLMLingua family) at word granularity: keep the words of a
row's fields that carry the most self-information -log p(x_t | x_<t) under the reference LM, up to
`ratio` of their tokens, in their order. A word is kept or dropped whole (its information is the
mean over its tokens, as LLMLingua-2 aggregates), so a compressed prompt still reads as words.
Words holding a forced piece (digits, newlines, '?', ':' and any the spec adds) are never dropped.
Identifiers (os.path.basename, snake_case, camelCase, call()) and the prompt's key words that the
answer repeats come next, before any other word, while they fit the budget: a question without the
name it asks about is not a shorter question.
The ratio holds over the rows, not row by row: a row whose forced words overrun its share carries the
excess to the next rows of the batch, and one with words too long to fit its share carries the slack
(error diffusion), each row within half and all of its tokens.
Only the row's fields are compressed, never the template around them, and the answer only when
the spec asks. Text is rebuilt from the original characters: a kept token brings the whitespace
before it.

The self-information comes from the scorer's forward pass over the prompt as training renders it
(damoc/lm/prompts.py), so compressing costs no second pass over the model.
"""

from __future__ import annotations

import math
import re

import numpy as np

DEFAULT_FORCED = ("\n", "?", ":")
# Code-like words: a separator between word characters (a.b, a_b, a::b, a->b, a/b), camelCase, a call.
IDENTIFIER = re.compile(r"\w(?:\.|_|::|->|/)\w|[a-z][A-Z]|\w\(|`")
EDGE = ".,;!?:'\"()[]{}<>`"
COMMON = frozenset("what does this that with from have which when where there their these those into than "
                   "then them they were been will would should could about your also used uses".split())


def is_identifier(word: str) -> bool:
    return bool(IDENTIFIER.search(word.strip().rstrip(".,;!?:'\"")))


def answer_words(answer: str) -> set[str]:
    """The answer's words that name something (four letters or more, not a common function word)."""
    return {w for w in (t.strip(EDGE).lower() for t in answer.split()) if len(w) >= 4 and w not in COMMON}


def is_forced(piece: str, forced: tuple[str, ...]) -> bool:
    return any(c.isdigit() for c in piece) or any(f in piece for f in forced)


def keep_mask(info: list[float], pieces: list[str], ratio: float, forced: tuple[str, ...],
              groups: list[list[int]] | None = None, carry: float = 0.0,
              required: np.ndarray | None = None) -> np.ndarray:
    """Which tokens stay, deciding per group (default: every token alone): every group holding a forced
    piece; then, while they fit in ceil(ratio * n + carry) tokens, the groups holding a `required` token
    and then the others, each by mean information, high first (ties: the earlier). `carry`: what earlier
    rows overran or left; the budget stays within half of ratio * n and n."""
    n = len(info)
    groups = groups if groups is not None else [[i] for i in range(n)]
    keep = np.zeros(n, dtype=bool)
    budget = min(n, max(math.ceil(ratio * n / 2), math.ceil(ratio * n + carry)))
    values = np.asarray(info, dtype=np.float64)
    free = []
    for gi, g in enumerate(groups):
        if any(is_forced(pieces[i], forced) for i in g):
            keep[g] = True
        else:
            wanted = required is not None and bool(required[g].any())
            free.append((not wanted, -float(values[g].mean()), gi))
    used = int(keep.sum())
    for *_, gi in sorted(free):
        g = groups[gi]
        if used + len(g) <= budget:
            keep[g] = True
            used += len(g)
        if used >= budget:
            break
    return keep


def covers(spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Each token's span widened back to the previous token's end (its leading whitespace)."""
    out, prev = [], 0
    for _, end in spans:
        out.append((prev, max(prev, end)))
        prev = max(prev, end)
    if out:
        out[-1] = (out[-1][0], length)  # trailing text rides with the last token
    return out


def word_groups(text: str, cov: list[tuple[int, int]]) -> list[list[int]]:
    """Tokens grouped into words: a token whose cover starts with whitespace begins a new word."""
    groups: list[list[int]] = []
    for i, (a, b) in enumerate(cov):
        if not groups or (b > a and text[a].isspace()):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def rebuild(text: str, cov: list[tuple[int, int]], keep: np.ndarray, lo: int, hi: int) -> str:
    return "".join(text[max(a, lo):min(b, hi)] for (a, b), k in zip(cov, keep) if k and a < hi and b > lo)


def compress_fields(text: str, fields: dict[str, tuple[int, int]], spans: list[tuple[int, int]],
                    info: list[float], ratio: float, forced: tuple[str, ...],
                    words: bool = True, carry: float = 0.0, answer: str = "") -> tuple[dict[str, str], int, int]:
    """Compress the named fields of a rendered prompt together. `spans`/`info`: each prompt token's
    character span in `text` and its self-information. Returns the fields' new text, and their token
    count before and after. Tokens outside every field (the template) are neither counted nor cut.
    `words` false: each token is kept or dropped alone (subword cuts), identifiers and the answer's
    key words still whole. `carry`: tokens earlier rows owe (keep_mask); `answer`: the row's answer."""
    inside = [i for i, (a, b) in enumerate(spans) if any(a < hi and b > lo for lo, hi in fields.values())]
    if not inside:
        return {k: text[lo:hi] for k, (lo, hi) in fields.items()}, 0, 0
    sub_spans = [spans[i] for i in inside]
    cov = covers(sub_spans, len(text))

    def piece(a: int, b: int) -> str:  # a token's text with its leading whitespace, inside its field
        lo, hi = next((lo, hi) for lo, hi in fields.values() if a < hi and b > lo) if b > a else (a, b)
        return text[max(a, lo):min(b, hi)]

    pieces = [piece(a, b) for a, b in cov]
    groups = word_groups(text, cov)
    keys = answer_words(answer)
    required = np.zeros(len(pieces), dtype=bool)
    for g in groups:
        word = "".join(pieces[i] for i in g)
        if is_identifier(word) or word.strip(EDGE + " \n\t").lower() in keys:
            required[g] = True
    keep = keep_mask([info[i] for i in inside], pieces, ratio, forced, groups if words else None, carry, required)
    out = {k: rebuild(text, cov, keep, lo, hi).strip() for k, (lo, hi) in fields.items()}
    # A field cut to nothing keeps its text: an empty instruction is not a shorter one.
    out = {k: v or text[lo:hi] for (k, v), (lo, hi) in zip(out.items(), fields.values())}
    return out, len(inside), int(keep.sum())
