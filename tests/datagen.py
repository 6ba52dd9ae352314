"""A corpus with known flaws, built from real text: malformed lines and planted near-duplicates."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from damoc.zoo.corpus import stdlib_docstrings


@dataclass
class Planted:
    malformed: set[str] = field(default_factory=set)  # ids of lines that must be quarantined
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (original id, near-copy id)


def _sentence(doc: str) -> str:
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return first.split(". ")[0][:200]


def write_corpus(path: Path, n: int, malformed: float = 0.02, dups: float = 0.05, seed: int = 0) -> Planted:
    rng = random.Random(seed)
    docs = [d for d in stdlib_docstrings(3_000_000) if len(d) > 120]
    planted = Planted()
    written: list[tuple[str, dict]] = []  # (id, record) of good rows
    offset = 0
    with open(path, "wb") as fh:
        for i in range(n):
            rid = f"{path.name}:{offset}"
            roll = rng.random()
            if roll < malformed:
                kind = i % 4
                line = [b'{"instruction": "cut short', b'{"instruction": "q", "output": "\xff\xfe bytes"}',
                        json.dumps({"instruction": f"unanswered {i}"}).encode(),
                        json.dumps({"instruction": {"nested": i}, "output": "x"}).encode()][kind]
                planted.malformed.add(rid)
            elif roll < malformed + dups and written:
                orig_id, rec = written[rng.randrange(len(written))]
                copy = {"instruction": rec["instruction"].upper(), "input": "  " + rec["input"] + " ",
                        "output": rec["output"] + " Thanks."}
                line = json.dumps(copy).encode()
                planted.pairs.append((orig_id, rid))
            else:
                a, b = docs[rng.randrange(len(docs))], docs[rng.randrange(len(docs))]
                rec = {"instruction": f"Summarise note {i}: {_sentence(a)[:80]}",
                       "input": (a[:160] + " " + b[:160]).replace("\n", " "), "output": _sentence(b)}
                line = json.dumps(rec).encode()
                written.append((rid, rec))
            fh.write(line + b"\n")
            offset += len(line) + 1
    return planted
