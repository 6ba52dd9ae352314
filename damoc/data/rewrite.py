"""Iterative LLM rewrite of kept rows: up to `rounds` rounds of "make this clearer and more
concise, keep every fact and the answer's meaning", by a local HF causal LM or an
OpenAI-compatible endpoint (a vLLM server, say). A proposal is accepted only if it passes
the checks; otherwise the previous text stays. Rounds stop when one accepts nothing.

Checks: every field non-empty where it was; length within bounds; the answer's key tokens
(numbers, identifiers, capitalised words) all still in the answer; the reference LM's answer
loss given the prompt not worse than before (beyond a small tolerance).
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
_FIELD = re.compile(r"^(Instruction|Input|Answer):[ \t]*(.*?)(?=^(?:Instruction|Input|Answer):|\Z)", re.M | re.S)
_KEY = re.compile(r"\d+(?:[.,]\d+)*|\b\w*[A-Z_.]\w*\b")
API_KEY_ENV = ("DAMOC_REWRITE_API_KEY", "OPENAI_API_KEY")


def parse_reply(text: str) -> dict[str, str] | None:
    got = {m.group(1): m.group(2).strip() for m in _FIELD.finditer(text)}
    if "Instruction" not in got or "Answer" not in got:
        return None
    return {"instruction": got["Instruction"], "input": got.get("Input", ""), "output": got["Answer"]}


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
    return None


class EndpointWriter:
    """OpenAI-compatible chat completions (`{endpoint}/v1/chat/completions`)."""

    def __init__(self, endpoint: str, model: str | None, timeout: float = 60):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.timeout = model or "default", timeout
        self.key = next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)

    def __call__(self, prompts: list[str]) -> list[str]:
        out = []
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

    def __call__(self, prompts: list[str]) -> list[str]:
        import torch

        if self.chat:
            prompts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=1024,
                       add_special_tokens=not self.chat)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


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

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        rows = [{"instruction": i, "input": x, "output": o}
                for i, x, o in zip(df["instruction"], df["input"], df["output"])]
        before = [dict(r) for r in rows]
        accepted = np.zeros(len(rows), dtype=np.int64)
        outcomes: list[list[str]] = [[] for _ in rows]  # per row, per round: "accepted" or why not
        loss = self._loss(rows) if rows else np.zeros(0)
        for _ in range(self.rounds):
            replies = self.writer([PROMPT.format(**r) for r in rows])
            proposals: list[Any] = [parse_reply(t) for t in replies]
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
