"""What the data stage writes and says: the files rows are routed to (train, dropped, eval, quarantine),
the manifest's notes (why fewer rows than asked were kept, who dropped what), and the error when no row
is left."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TEXT_COLUMNS = ["id", "source", "instruction", "input", "output"]
STATS_COLUMNS = ("chars", "repetition", "special_ratio", "scorer", "ce_cond", "ce_alone", "ifd", "ppl", "judge")
TOKEN_COLUMNS = ("prompt_tokens_before", "prompt_tokens_after", "rewrite_rounds")
EXAMPLES = 5  # before/after rows kept for the report


def drop_key(reason: str) -> str:
    """Manifest key of a drop reason (the copied row's id is detail, not a category)."""
    return "near_duplicate" if reason.startswith("near_duplicate_of:") else reason


class NoRowsLeft(ValueError):
    """Nothing to train on: every row was quarantined or dropped."""


def no_rows_reason(manifest: dict[str, Any], quarantine: Path) -> str:
    """Why no row was kept, in a sentence: the commonest quarantine reasons, or the drops."""
    if manifest["quarantined"] == manifest["input"]:
        reasons = Counter()
        with open(quarantine, encoding="utf-8") as fh:
            for line in fh:
                reasons[json.loads(line)["reason"]] += 1
        top = "; ".join(f"{r} ({n} rows)" for r, n in reasons.most_common(3))
        return (f"no readable rows: all {manifest['input']} rows of data.train were quarantined ({top}); "
                "check data.fields against the file's columns")
    drops = ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items())
    return (f"no rows kept: {manifest['quarantined']} quarantined and every readable row dropped ({drops}); "
            "loosen data.filter")


class ParquetSink:
    """One Parquet file written batch by batch (the contract names a file, not a folder)."""

    def __init__(self, path: Path, columns: list[str], ints: tuple[str, ...] = ()):
        self.path, self.columns, self.ints = path, columns, ints
        self.writer, self.rows = None, 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select([c for c in self.columns if c in table.column_names])
        for c in self.ints:
            if c in table.column_names:
                table = table.set_column(table.schema.get_field_index(c), c, table[c].cast(pa.int64()))
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows += table.num_rows

    def close(self) -> int:
        if self.writer is not None:
            self.writer.close()
        else:
            pq.write_table(pa.table({c: pa.array([], pa.string()) for c in TEXT_COLUMNS}), self.path)
        return self.rows


def quarantine_lines(table: pa.Table) -> str:
    return "".join(json.dumps({"id": r["id"], "source": r["source"], "split": r["origin"], "reason": r["reason"],
                               "raw": r["raw"]}, ensure_ascii=False) + "\n"
                   for r in table.select(["id", "source", "origin", "reason", "raw"]).to_pylist())


def budget_note(keep_ratio: float, budget: int | None, kept: int, dropped: dict[str, int], plan) -> str | None:
    """Why fewer rows than keep_ratio asked for were kept: the drops that are not the budget's own, the
    largest first, with the operator that made them."""
    if budget is None or kept >= budget:
        return None
    budget_reasons = ("below_budget", "not_selected", "over_share")
    others = sorted(((k, n) for k, n in dropped.items() if k != "held_out_eval"
                     and not any(b in k for b in budget_reasons)), key=lambda kv: -kv[1])
    names = {op.name: op for op in plan.chain}
    culprit = ", ".join(f"{k} dropped {n:,d} ({owner(k, names)})" for k, n in others[:3]) or "no operator"
    return (f"keep_ratio {keep_ratio:g} asked for {budget:,d} rows but {kept:,d} were kept: {culprit} before "
            "the budget applied")


def owner(reason: str, operators: dict) -> str:
    """The operator a drop reason comes from."""
    prefix = {"ifd>": "ifd_filter", "near_duplicate": "minhash_dedup", "judge<": "llm_judge", "perplexity>":
              "perplexity_filter", "rules:": "rules"}
    for p, name in prefix.items():
        if reason.startswith(p):
            return name
    return reason.split(":", 1)[0] if reason.split(":", 1)[0] in operators else "an operator"


@dataclass
class Routed:
    """Pass 2's counts."""

    written: dict[str, int]
    tokens_before: int = 0
    tokens_after: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    eval_quarantined: int = 0
    eval_input: int = 0
    rounds: list[np.ndarray] = field(default_factory=list)
    rewrite_rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: proposed, accepted, refused
    examples: dict[str, list[dict[str, str]]] = field(default_factory=lambda: {"compress": [], "rewrite": []})

    def note_rewrites(self, logs: list[str], after: list[dict[str, str]]) -> None:
        """Per-round acceptance and refusal reasons, and a few rows before and after."""
        for text, row in zip(logs, after):
            log_ = json.loads(text)
            for r, outcome in enumerate(log_["outcomes"]):
                while len(self.rewrite_rounds) <= r:
                    self.rewrite_rounds.append({"round": len(self.rewrite_rounds) + 1, "proposed": 0, "accepted": 0,
                                                "refused": {}})
                stats = self.rewrite_rounds[r]
                stats["proposed"] += 1
                if outcome == "accepted":
                    stats["accepted"] += 1
                else:
                    stats["refused"][outcome] = stats["refused"].get(outcome, 0) + 1
            if "accepted" in log_["outcomes"] and len(self.examples["rewrite"]) < EXAMPLES:
                self.examples["rewrite"].append({"before": log_["before"], "after": row})
