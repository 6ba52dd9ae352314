"""Iterative LLM rewrite of kept rows: up to `rounds` rounds of "make this clearer and more
concise, keep every fact and the answer's meaning", by a local HF causal LM or an
OpenAI-compatible endpoint (a vLLM server, say). A proposal is accepted only if it passes
the checks; otherwise the previous text stays. Rounds stop when one accepts nothing.

Checks: every field non-empty where it was; length within bounds; the answer's key tokens
(numbers, identifiers, capitalised words) all still in the answer; the answer not moved into the
prompt (the reference LM would find it easier there); the reference LM's answer
loss given the prompt not worse than before (beyond a small tolerance).

A writer that does not reply in the sample's form (small local models answer the question, rename
the fields or repeat them: SmolLM2-135M-Instruct did so for 80 of 80 rows) is asked again for the
question alone. A local chat model's reply is started for it (the assistant turn opens with the
form's first label, or with `Rewritten question: "`), which keeps such a model in the form; an
endpoint's reply is read as it comes.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Any

import numpy as np
import pandas as pd

from damoc.data.lm import LMScorer
from damoc.lm.load import load_causal_lm

PROMPT = (
    "Rewrite this sample to be clearer and more concise. Keep every fact and the answer's meaning.\n"
    "Reply in exactly this form:\nInstruction: ...\nInput: ...\nAnswer: ...\n\n"
    "Instruction: {instruction}\nInput: {input}\nAnswer: {output}\n"
)
SAMPLE_START = "Instruction:"
QUESTION_PROMPT = ("Rewrite this question to be clearer and more concise. Keep every name, number and fact. "
                   "Do not answer it.\n\n{instruction}")
QUESTION_START = 'Rewritten question: "'
QUESTION_TOKENS = 64  # a question is short: the reply is cut well before the sample form's limit
# What writers call the fields: a label at a line's start, perhaps in bold or after a heading mark.
_LABELS = {"instruction": "instruction", "question": "instruction", "input": "input", "context": "input",
           "answer": "output", "output": "output", "response": "output"}
_FIELD = re.compile(r"^[ \t#*]*(" + "|".join(_LABELS) + r")[ \t*]*:[ \t*]*(.*?)(?=^[ \t#*]*(?:"
                    + "|".join(_LABELS) + r")[ \t*]*:|\Z)", re.M | re.S | re.I)
_KEY = re.compile(r"\d+(?:[.,]\d+)*|\b\w*[A-Z_.]\w*\b")
API_KEY_ENV = ("DAMOC_REWRITE_API_KEY", "OPENAI_API_KEY")


def parse_reply(text: str, old: dict[str, str] | None = None) -> dict[str, str] | None:
    """The proposed sample, or None when the reply lacks an instruction or an answer (or says a field
    twice differently: a writer repeating itself). A missing input stays `old`'s."""
    got: dict[str, str] = {}
    for m in _FIELD.finditer(text):
        field, value = _LABELS[m.group(1).lower()], m.group(2).strip()
        if got.setdefault(field, value) != value:
            return None
    if not got.get("instruction") or "output" not in got:
        return None
    return {"instruction": got["instruction"], "input": got.get("input", (old or {}).get("input", "")),
            "output": got["output"]}


def parse_question(text: str) -> str | None:
    """The rewritten question of a reply to QUESTION_PROMPT: its first line, without the label and
    quotes a writer wraps it in; None if nothing is left."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    line = re.sub(r"^(?:rewritten question|question)\s*:\s*", "", line, flags=re.I)
    if line.startswith('"'):  # what follows the closing quote is the model going on
        line = line[1:].split('"', 1)[0]
    return line.strip().strip('"\'`').strip() or None


def key_tokens(answer: str) -> set[str]:
    """Numbers, identifiers and capitalised words: what a rewrite must not lose."""
    return {t for t in _KEY.findall(answer) if len(t) > 1 or t.isdigit()}


def passes_checks(old: dict[str, str], new: dict[str, str], min_len: float, max_len: float) -> str | None:
    """None if the proposal is acceptable, else why not."""
    if all(new[f].strip() == old[f].strip() for f in old):
        return "unchanged"
    for f in ("instruction", "output"):
        if not new[f].strip():
            return f"empty {f}"
    if old["input"].strip() and not new["input"].strip():
        return "empty input"
    before = sum(len(old[f]) for f in old)
    after = sum(len(new[f]) for f in new)
    if not (min_len * before <= after <= max_len * before):
        return f"length {after} outside [{min_len:g}, {max_len:g}] x {before}"
    lost = key_tokens(old["output"]) - set(_KEY.findall(new["output"]))
    if lost:
        return f"answer lost {sorted(lost)[:3]}"
    if leaks_answer(old, new):  # the reference LM would score that as "easier": refuse it first
        return "answer leaked into the prompt"
    return None


def leaks_answer(old: dict[str, str], new: dict[str, str]) -> bool:
    """Whether the new prompt gained at least two of the answer's words, and half of them, that the old
    prompt did not have (a writer that answers the question inside it)."""
    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9]{3,}", text.lower()))

    answer = words(old["output"])
    gained = (words(new["instruction"] + " " + new["input"]) - words(old["instruction"] + " " + old["input"])) & answer
    return len(gained) >= 2 and len(gained) >= len(answer) / 2


class EndpointWriter:
    """OpenAI-compatible chat completions (`{endpoint}/v1/chat/completions`)."""

    def __init__(self, endpoint: str, model: str | None, timeout: float = 60):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.timeout = model or "default", timeout
        self.key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)

    def __call__(self, prompts: list[str], start: str = "", max_new_tokens: int | None = None) -> list[str]:
        out = []  # a chat endpoint cannot be given the start of its reply: `start` is not used
        for p in prompts:
            body = json.dumps({"model": self.model, "temperature": 0,
                               "messages": [{"role": "user", "content": p}]}).encode()
            headers = {"Content-Type": "application/json"}
            if self.key:
                headers["Authorization"] = f"Bearer {self.key}"
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - user's endpoint
                    out.append(json.loads(resp.read())["choices"][0]["message"]["content"])
            except (OSError, ValueError, KeyError, IndexError):
                out.append("")  # an unanswered proposal is a rejected one; the row keeps its text
        return out


class LocalWriter:
    """A local HF causal LM, greedy decoding; an instruct model gets the prompt as a user turn of its
    chat template."""

    def __init__(self, model: str, max_new_tokens: int = 256, trust_remote_code: bool = False):
        self.tok, self.model = load_causal_lm(model, trust_remote_code=trust_remote_code)
        self.tok.padding_side = "left"
        self.max_new_tokens = max_new_tokens
        self.chat = bool(getattr(self.tok, "chat_template", None))

    def __call__(self, prompts: list[str], start: str = "", max_new_tokens: int | None = None) -> list[str]:
        """Greedy replies; `start` opens the assistant's turn (and is part of each reply returned)."""
        import torch

        if self.chat:
            prompts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) + start for p in prompts]
        else:
            start = ""
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=1024,
                       add_special_tokens=not self.chat)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return [start + t for t in self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


class Rewriter:
    """Callable class for `map_batches` on an actor pool: rewrites a batch for up to `rounds`."""

    def __init__(self, reference: str, model: str | None, endpoint: str | None, rounds: int,
                 max_length: int = 256, task: str = "qa", template: str = "auto", min_len: float = 0.3,
                 max_len: float = 1.2, max_loss_increase: float = 0.05):
        self.writer = EndpointWriter(endpoint, model) if endpoint else LocalWriter(model)
        self.scorer = LMScorer(reference, task=task, template=template, max_length=max_length, embeddings=False)
        self.rounds, self.min_len, self.max_len = rounds, min_len, max_len
        self.tol = max_loss_increase

    def _loss(self, rows: list[dict[str, str]]) -> np.ndarray:
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("instruction", "input", "output")}
        return self.scorer(batch)["ce_cond"]

    def propose(self, rows: list[dict[str, str]]) -> list[Any]:
        """One proposal per row (None: unreadable): the whole sample, else the question alone."""
        replies = self.writer([PROMPT.format(**r) for r in rows], SAMPLE_START)
        proposals: list[Any] = [parse_reply(t, r) for t, r in zip(replies, rows)]
        again = [i for i, p in enumerate(proposals) if p is None]
        if again:
            questions = self.writer([QUESTION_PROMPT.format(**rows[i]) for i in again], QUESTION_START,
                                    QUESTION_TOKENS)
            for i, text in zip(again, questions):
                q = parse_question(text)
                proposals[i] = None if q is None else {**rows[i], "instruction": q}
        return proposals

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        rows = [{"instruction": i, "input": x, "output": o}
                for i, x, o in zip(df["instruction"], df["input"], df["output"])]
        before = [dict(r) for r in rows]
        accepted = np.zeros(len(rows), dtype=np.int64)
        outcomes: list[list[str]] = [[] for _ in rows]  # per row, per round: "accepted" or why not
        loss = self._loss(rows) if rows else np.zeros(0)
        for _ in range(self.rounds):
            proposals = self.propose(rows)
            verdict = {i: "unreadable reply" if p is None else passes_checks(rows[i], p, self.min_len, self.max_len)
                       for i, p in enumerate(proposals)}
            ok = [i for i, v in verdict.items() if v is None]
            if ok:  # the reference LM must not find the answer harder to predict
                losses = dict(zip(ok, self._loss([proposals[i] for i in ok])))
                for i in ok:
                    if losses[i] <= loss[i] + self.tol:
                        rows[i], loss[i] = proposals[i], losses[i]
                        accepted[i] += 1
                    else:
                        verdict[i] = "answer harder for the reference LM"
            for i, v in verdict.items():
                outcomes[i].append(v or "accepted")
            if not any(v is None for v in verdict.values()):
                break  # a round that accepts nothing ends the rewriting
        for f in ("instruction", "input", "output"):
            df[f] = [r[f] for r in rows]
        df["rewrite_rounds"] = accepted
        df["rewrite_log"] = [json.dumps({"outcomes": o, "before": b}) for o, b in zip(outcomes, before)]
        return df
