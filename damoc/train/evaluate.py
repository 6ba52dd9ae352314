"""Evaluation on this worker's slice of the eval rows, summed over workers.

Every worker evaluates rows[rank::world], padded with zero-weight rows to the same batch
count so collective forwards (ZeRO-3) stay in step. The slice is tokenised once (`EvalSet`);
each evaluation only runs forwards. Loss is answer NLL per UTF-8 byte in bits (comparable
across tokenizers) plus per-token nats beside it; generation metrics (exact match, ROUGE-L)
use greedy decoding of a bounded length; multiple-choice accuracy picks the option with the
lowest NLL per byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from damoc.lm.load import pad_id
from damoc.lm.nll import answer_nll, bits_per_byte
from damoc.lm.prompts import gold_option, options_of, prompt_text
from damoc.lm.tokens import Example, encode
from damoc.train import metrics
from damoc.train.args import TrainArgs


def my_slice(rows: list[dict[str, Any]], rank: int, world: int) -> list[tuple[dict[str, Any], float]]:
    """This rank's rows with weight 1, padded with weight-0 copies to ceil(n / world)."""
    mine = [(r, 1.0) for r in rows[rank::world]]
    target = math.ceil(len(rows) / world)
    while len(mine) < target:
        mine.append((rows[0], 0.0))
    return mine


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


class EvalSet:
    """This rank's eval rows, tokenised once: scored answers (EOS included: the likelihood of the
    answer as a whole answer, as training shapes it), prompts for generation, and per
    multiple-choice row its option answers and the gold index."""

    def __init__(self, tok, rows: list[dict[str, Any]], args: TrainArgs, rank: int, world: int):
        task, max_len = args.task, args.max_length
        self.n_rows = len(rows)
        mine = my_slice(rows, rank, world)
        self.weights = [w for _, w in mine]
        self.index = [rank + world * j for j in range(len(mine))]  # each row's place in the eval rows
        self.references = [r["output"] for r, _ in mine]
        prompts = [prompt_text(task, r["instruction"], r["input"], tok, args.template) for r, _ in mine]
        self.answers = [encode(tok, p, r["output"], max_len) for p, (r, _) in zip(prompts, mine)]
        gen_len = max(8, max_len - args.max_new_tokens)
        self.prompt_ids = [encode(tok, p, "", gen_len, eos=False).ids for p in prompts]
        self.choices: list[tuple[float, list[Example], int, int]] = []  # (weight, option examples, gold, row)
        if task == "multiple_choice" or args.metric == "accuracy":
            for j, ((r, w), p) in enumerate(zip(mine, prompts)):
                opts = options_of(r["instruction"], r["input"])
                gold = gold_option(opts, r["output"]) if opts else None
                if gold is None:
                    continue
                by_letter = r["output"].strip().upper() in {letter for letter, _ in opts}
                options = [encode(tok, p, letter if by_letter else text, max_len) for letter, text in opts]
                self.choices.append((w, options, gold, self.index[j]))


@torch.no_grad()
def generate_answer(model, tok, prompt_ids: list[int], max_new_tokens: int, device, synced: bool) -> str:
    ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, synced_gpus=synced)
    return metrics.first_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def evaluate(model, tok, es: EvalSet, args: TrainArgs, device, generation: bool,
             synced: bool = False, rows: dict | None = None) -> dict[str, float]:
    """Metrics over all eval rows (every rank must call this the same number of times). With `rows`, it
    also fills in this rank's per-row figures (by row index), which the pick's confidence resamples."""
    was_training = model.training
    model.eval()
    bs = args.eval_batch_size
    pad = pad_id(tok)
    scored = answer_nll(model, es.answers, pad, bs, device, not synced)  # ZeRO-3 across ranks: full logits
    sums = [sum(w * n for (n, _), w in zip(scored, es.weights)),
            sum(w * t for (_, t), w in zip(scored, es.weights)),
            sum(w * e.answer_bytes for e, w in zip(es.answers, es.weights))]
    if rows is not None:
        for i, (n, _), e, w in zip(es.index, scored, es.answers, es.weights):
            if w:
                rows.setdefault(i, {}).update(nll=n, bytes=e.answer_bytes)
    em = rl = gen_n = 0.0
    if generation:
        for i, ids, ref, w in zip(es.index, es.prompt_ids, es.references, es.weights):
            pred = generate_answer(model, tok, ids, args.max_new_tokens, device, synced)
            row_em, row_rl = metrics.exact_match(pred, ref), metrics.rouge_l(pred, ref)
            em, rl, gen_n = em + w * row_em, rl + w * row_rl, gen_n + w
            if rows is not None and w:
                rows.setdefault(i, {}).update(exact_match=row_em, rouge_l=row_rl)
    correct = mc_n = 0.0
    for w, options, gold, i in es.choices:
        per_byte = [nll / max(1, e.answer_bytes)
                    for (nll, _), e in zip(answer_nll(model, options, pad, bs, device, not synced), options)]
        hit = float(min(range(len(per_byte)), key=per_byte.__getitem__) == gold)
        correct, mc_n = correct + w * hit, mc_n + w
        if rows is not None and w:
            rows.setdefault(i, {}).update(accuracy=hit)
    nll, tokens, n_bytes, em, rl, gen_n, correct, mc_n = all_sum(sums + [em, rl, gen_n, correct, mc_n], device)
    if was_training:
        model.train()
    result = {"eval_loss": bits_per_byte(nll, int(n_bytes)),
              "eval_loss_token": nll / max(1.0, tokens), "eval_rows": es.n_rows}
    if gen_n:
        result["exact_match"], result["rouge_l"] = em / gen_n, rl / gen_n
    if mc_n:
        result["accuracy"] = correct / mc_n
    return result


def gather_rows(rows: dict[int, dict[str, float]], world: int) -> dict[int, dict[str, float]]:
    """Every rank's per-row figures, merged (on every rank; rank 0 writes them)."""
    if world == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, rows)
    merged: dict[int, dict[str, float]] = {}
    for p in parts:
        merged.update(p or {})
    return merged
