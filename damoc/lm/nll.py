"""Batched forward passes over encoded examples: next-token NLL (fp32) at every position, the answer
NLL per token and per UTF-8 byte, and (for token compression) each prompt token's self-information."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from damoc.lm.tokens import Example, collate


# Logits of this many floats at most are alive at once in the scored-positions loss (256 MiB in fp32):
# 256 answer tokens at a time for a 262k vocabulary (Gemma 3), 1,365 for a 49k one.
CHUNK_FLOATS = 1 << 26
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # head module -> usable


def _unwrapped(model):
    """The HF model under a DeepSpeed engine or DDP wrapper (PeftModel forwards attributes itself)."""
    return getattr(model, "module", model)


def output_head(model):
    """The output projection, where the model's logits are exactly that projection of its last hidden
    state (checked once per model on three tokens): then the loss needs logits only at the scored
    positions. None where the family does more (soft-capping, scaling): the full logits are used."""
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return None
    if head not in _HEAD_CHECKED:
        ids = torch.tensor([[1, 2, 3]], device=head.weight.device)
        with torch.no_grad():
            out = inner(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
            mine = head(out.hidden_states[-1][:, -1:])
        _HEAD_CHECKED[head] = out.logits.shape == mine.shape and torch.allclose(
            out.logits.float(), mine.float(), atol=1e-4, rtol=1e-4)
    return head if _HEAD_CHECKED[head] else None


def _scored_nll(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each scored position (hidden: [N, H]) in chunks of CHUNK_FLOATS logits. With
    gradients on and more than one chunk, each chunk's logits are recomputed in the backward pass
    (activation checkpointing) instead of kept: peak memory is one chunk of logits, not N x vocab."""
    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="none")

    recompute = torch.is_grad_enabled()
    # Without gradients nothing is kept for a backward pass: twice the chunk, whose larger matmul runs
    # ~10% faster a position on CPU (Gemma 3's head: 2.4 ms at 512 positions, 2.7 at 256).
    step = max(1, CHUNK_FLOATS * (1 if recompute else 2) // max(1, head.weight.shape[0]))
    if hidden.shape[0] <= step:
        return piece(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(piece, hidden[s:s + step], targets[s:s + step], use_reentrant=False)
                      if recompute else piece(hidden[s:s + step], targets[s:s + step])
                      for s in range(0, hidden.shape[0], step)])


def next_token_nll(model, batch, at: torch.Tensor, hidden: bool = False):
    """NLL in fp32 of each next token (input_ids[:, 1:]) at the positions `at` ([batch, len-1] bool), 0
    elsewhere, and with `hidden` the last hidden state. Logits are computed only at those positions where
    the model allows it (`output_head`), a chunk at a time: a batch x length x vocabulary tensor is never
    built (2 GB for 8 x 256 tokens of a 262k vocabulary)."""
    targets = batch["input_ids"][:, 1:]
    head = output_head(model)
    if head is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
        nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
        return torch.where(at, nll, torch.zeros_like(nll)), (out.hidden_states[-1] if hidden else None)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                output_hidden_states=True)
    last = out.hidden_states[-1]
    values = _scored_nll(head, last[:, :-1][at], targets[at])
    nll = torch.zeros(targets.shape, dtype=values.dtype, device=values.device)
    nll[at] = values
    return nll, (last if hidden else None)


def token_nll(model, batch, scored_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL in fp32 at every position ([batch, len-1], 0 where the label is IGNORE) and the
    mask of scored positions (answer tokens and EOS), from logits at the scored positions only unless
    `scored_only` is off (ZeRO-3 gathers the head's weight only inside the model's own forward)."""
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    if scored_only:  # labels equal the next input ids wherever they are scored
        return next_token_nll(model, batch, scored)[0], scored
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll, scored


def causal_lm_loss(model, batch, scored_only: bool = True) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels IGNORE elsewhere), computed in fp32."""
    nll, scored = token_nll(model, batch, scored_only)
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
def answer_nll(model, examples: list[Example], pad: int, batch_size: int, device,
               scored_only: bool = True) -> list[tuple[float, int]]:
    """Per example: (summed answer NLL in nats, answer tokens)."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for idx in by_length(examples, batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad).items()}
        nll, scored = token_nll(model, batch, scored_only)
        for i, n, t in zip(idx, nll.sum(dim=1).tolist(), scored.sum(dim=1).tolist()):
            out[i] = (n, t)
    return out


@dataclass
class Scored:
    """One example's forward pass: mean answer NLL, prompt tokens' self-information, pooled state."""

    answer_ce: float
    prompt_info: list[float]  # -log p(token | everything before it), one per prompt token in ids
    embedding: np.ndarray | None = None


def score(model, examples: list[Example], pad: int, device, hidden: bool = False, max_tokens: int = 1024,
          prompt_info: bool = True) -> list[Scored]:
    """Forward passes over the examples in length-sorted batches: mean answer cross-entropy, with
    `prompt_info` each prompt token's self-information (the first token of a sequence without BOS has no
    context: +inf, so it is never the first dropped) and, with `hidden`, the mean-pooled, L2-normalised
    last hidden state."""
    out: list[Scored] = [None] * len(examples)  # type: ignore[list-item]
    for idx in by_length(examples, len(examples), max_tokens):
        for i, r in zip(idx, _score_batch(model, [examples[i] for i in idx], pad, device, hidden, prompt_info)):
            out[i] = r
    return out


@torch.no_grad()
def _score_batch(model, examples: list[Example], pad: int, device, hidden: bool, prompt_info: bool) -> list[Scored]:
    batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
    scored_t = batch["labels"][:, 1:] != -100
    at = batch["attention_mask"][:, 1:].bool() if prompt_info else scored_t
    nll, last = next_token_nll(model, batch, at, hidden)
    every, scored = nll.cpu().numpy(), scored_t.cpu().numpy()
    pooled = None
    if hidden:
        h, a = last.float(), batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((h * a).sum(1) / a.sum(1).clamp(min=1), dim=-1).cpu().numpy()
    results = []
    for i, e in enumerate(examples):
        n_answer = int(scored[i].sum())
        ce = float((every[i] * scored[i]).sum() / max(1, n_answer))
        positions = range(e.prompt_start, len(e.ids) - sum(1 for x in e.labels if x != -100)) if prompt_info else ()
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
