"""Batched forward passes over encoded examples: next-token NLL (fp32) at every position, the answer
NLL per token and per UTF-8 byte, and (for token compression) each prompt token's self-information."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from damoc.lm.tokens import Example, collate


def token_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL in fp32 at every position ([batch, len-1], 0 where the label is IGNORE) and the
    mask of scored positions (answer tokens and EOS)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll, labels != -100


def causal_lm_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels IGNORE elsewhere), computed in fp32."""
    nll, scored = token_nll(model, batch)
    return nll.sum() / scored.sum().clamp(min=1)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed answer NLL (nats) over the answer's UTF-8 bytes, in bits: comparable across tokenizers."""
    return nll_nats / (math.log(2) * max(1, n_bytes))


def by_length(examples: list[Example], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches of similar length (longest first): a batch pads to its longest row, so
    mixing a 250-token row with 40-token ones makes every row cost 250. With `max_tokens`, a batch
    grows up to that many padded tokens instead of `batch_size` rows (short rows, bigger batches)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    out: list[list[int]] = []
    for i in order:
        width = len(examples[out[-1][0]].ids) if out else 0
        full = (len(out[-1]) >= batch_size if max_tokens is None else (len(out[-1]) + 1) * width > max_tokens) \
            if out else True
        if full:
            out.append([i])
        else:
            out[-1].append(i)
    return out


@torch.no_grad()
def answer_nll(model, examples: list[Example], pad: int, batch_size: int, device) -> list[tuple[float, int]]:
    """Per example: (summed answer NLL in nats, answer tokens)."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for idx in by_length(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad).items()}
        nll, scored = token_nll(model, batch)
        for i, n, t in zip(idx, nll.sum(dim=1).tolist(), scored.sum(dim=1).tolist()):
            out[i] = (n, t)
    return out


@dataclass
class Scored:
    """One example's forward pass: mean answer NLL, prompt tokens' self-information, pooled state."""

    answer_ce: float
    prompt_info: list[float]  # -log p(token | everything before it), one per prompt token in ids
    embedding: np.ndarray | None = None


def score(model, examples: list[Example], pad: int, device, hidden: bool = False,
          max_tokens: int = 1024) -> list[Scored]:
    """Forward passes over the examples in length-sorted batches: mean answer cross-entropy, each
    prompt token's self-information (the first token of a sequence without BOS has no context: +inf,
    so it is never the first dropped) and, with `hidden`, the mean-pooled, L2-normalised last hidden
    state."""
    out: list[Scored] = [None] * len(examples)  # type: ignore[list-item]
    for idx in by_length(examples, len(examples), max_tokens):
        for i, r in zip(idx, _score_batch(model, [examples[i] for i in idx], pad, device, hidden)):
            out[i] = r
    return out


@torch.no_grad()
def _score_batch(model, examples: list[Example], pad: int, device, hidden: bool) -> list[Scored]:
    batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()
    every = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:],
                                              reduction="none").cpu().numpy()
    scored = (batch["labels"][:, 1:] != -100).cpu().numpy()
    pooled = None
    if hidden:
        h, a = out.hidden_states[-1].float(), batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((h * a).sum(1) / a.sum(1).clamp(min=1), dim=-1).cpu().numpy()
    results = []
    for i, e in enumerate(examples):
        n_answer = int(scored[i].sum())
        ce = float((every[i] * scored[i]).sum() / max(1, n_answer))
        positions = range(e.prompt_start, len(e.ids) - sum(1 for x in e.labels if x != -100))
        info = [math.inf if p == 0 else float(every[i, p - 1]) for p in positions]
        results.append(Scored(ce, info, None if pooled is None else pooled[i]))
    return results


def rows_bits_per_byte(model, tok, rows: list[dict[str, str]], task: str, template: str, max_length: int,
                       batch_size: int = 8) -> float:
    """Answer NLL in bits per UTF-8 byte over rows (instruction, input, output), rendered as training
    renders them: the zero-shot figure a candidate starts from."""
    from damoc.lm.load import pad_id
    from damoc.lm.prompts import prompt_text
    from damoc.lm.tokens import encode

    examples = [encode(tok, prompt_text(task, r["instruction"], r["input"], tok, template), r["output"], max_length)
                for r in rows]
    scored = answer_nll(model, examples, pad_id(tok), batch_size, next(model.parameters()).device)
    return bits_per_byte(sum(n for n, _ in scored), sum(e.answer_bytes for e in examples))
