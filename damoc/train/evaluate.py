"""Evaluation on this worker's slice of the eval rows, summed over workers.

Every worker evaluates rows[rank::world], padded with zero-weight rows to the same batch
count so collective forwards (ZeRO-3) stay in step. Loss is answer NLL per UTF-8 byte in
bits (comparable across tokenizers) plus per-token nats beside it; generation metrics
(exact match, ROUGE-L) use greedy decoding of a bounded length; multiple-choice accuracy
picks the option with the lowest NLL per byte.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from damoc.train import metrics
from damoc.train.examples import IGNORE, collate, encode, gold_option, options_of, prompt_text


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


@torch.no_grad()
def answer_nll(model, tok, pairs: list[tuple[str, str]], max_length: int, batch_size: int, device):
    """Per pair: (summed answer NLL in nats, answer tokens, answer bytes)."""
    out = []
    for i in range(0, len(pairs), batch_size):
        # EOS is scored too: the likelihood of the answer as a whole answer, as training shapes it.
        exs = [encode(tok, p, a, max_length) for p, a in pairs[i:i + batch_size]]
        batch = {k: v.to(device) for k, v in collate(exs, tok.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                reduction="none").sum(dim=1)
        counts = (labels != IGNORE).sum(dim=1)
        out += [(float(n), int(c), e.answer_bytes) for n, c, e in zip(nll, counts, exs)]
    return out


@torch.no_grad()
def generate_answer(model, tok, prompt: str, max_length: int, max_new_tokens: int, device, synced: bool) -> str:
    ex = encode(tok, prompt, "", max(8, max_length - max_new_tokens), eos=False)
    ids = torch.tensor([ex.ids], device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         synced_gpus=synced)
    return metrics.first_line(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def evaluate(model, tok, rows: list[dict[str, Any]], cfg: dict[str, Any], device, rank: int, world: int,
             generation: bool, synced: bool = False) -> dict[str, float]:
    """Metrics over all eval rows (every rank must call this the same number of times)."""
    was_training = model.training
    model.eval()
    task, max_len, bs = cfg["task"], cfg["max_length"], cfg["eval_batch_size"]
    mine = my_slice(rows, rank, world)
    pairs = [(prompt_text(task, r["instruction"], r["input"]), r["output"]) for r, _ in mine]
    scored = answer_nll(model, tok, pairs, max_len, bs, device)
    sums = [sum(w * n for (n, _, _), (_, w) in zip(scored, mine)),
            sum(w * t for (_, t, _), (_, w) in zip(scored, mine)),
            sum(w * b for (_, _, b), (_, w) in zip(scored, mine))]
    em = rl = gen_n = 0.0
    if generation:
        for (r, w), (p, _) in zip(mine, pairs):
            pred = generate_answer(model, tok, p, max_len, cfg["max_new_tokens"], device, synced)
            em += w * metrics.exact_match(pred, r["output"])
            rl += w * metrics.rouge_l(pred, r["output"])
            gen_n += w
    correct = mc_n = 0.0
    if task == "multiple_choice" or cfg["metric"] == "accuracy":
        correct, mc_n = _choice_accuracy(model, tok, mine, task, max_len, bs, device)
    nll, tokens, n_bytes, em, rl, gen_n, correct, mc_n = all_sum(
        sums + [em, rl, gen_n, correct, mc_n], device)
    if was_training:
        model.train()
    result = {"eval_loss": metrics.bits_per_byte(nll, int(n_bytes)),
              "eval_loss_token": nll / max(1.0, tokens), "eval_rows": len(rows)}
    if gen_n:
        result["exact_match"], result["rouge_l"] = em / gen_n, rl / gen_n
    if mc_n:
        result["accuracy"] = correct / mc_n
    return result


def _choice_accuracy(model, tok, mine, task, max_len, bs, device) -> tuple[float, float]:
    """Weighted count of rows whose lowest-NLL-per-byte option is the gold one, and of rows with options."""
    correct = n = 0.0
    for r, w in mine:
        opts = options_of(r["instruction"], r["input"])
        gold = gold_option(opts, r["output"]) if opts else None
        if gold is None:
            continue
        prompt = prompt_text(task, r["instruction"], r["input"])
        by_letter = r["output"].strip().upper() in {letter for letter, _ in opts}
        answers = [letter if by_letter else text for letter, text in opts]
        scored = answer_nll(model, tok, [(prompt, a) for a in answers], max_len, bs, device)
        per_byte = [nll / max(1, b) for nll, _, b in scored]
        correct += w * float(min(range(len(per_byte)), key=per_byte.__getitem__) == gold)
        n += w
    return correct, n
