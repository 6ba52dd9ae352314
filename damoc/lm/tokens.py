"""Prompt + answer -> token ids with the loss on the answer tokens only.

Candidates have different tokenizers, so every example also carries the UTF-8 byte count of the
answer text it scores: the tokenizer-independent denominator of bits per byte. With `spans`, it
also carries each prompt token's character span, for token compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from damoc.lm.load import pad_id

IGNORE = -100  # label value the loss skips


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    answer_bytes: int  # UTF-8 bytes of the scored answer text (after any truncation)
    prompt_start: int = 0  # position of the first prompt token in ids (after BOS)
    prompt_spans: list[tuple[int, int]] = field(default_factory=list)  # char span of each prompt token kept
    prompt_cut: int = 0  # prompt tokens cut from the left to fit max_length


def encode(tok, prompt: str, answer: str, max_length: int, eos: bool = True, spans: bool = False) -> Example:
    """[BOS] + prompt ids (cut from the left to fit) + answer ids (+ EOS); labels mask the prompt.
    A prompt that already starts with BOS (a chat template's text) gets no second one."""
    full = tok(answer, add_special_tokens=False)["input_ids"] if answer else []
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=spans) if prompt else {"input_ids": []}
    p_ids = list(enc["input_ids"])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and p_ids[:1] != [tok.bos_token_id] else []
    a_ids = full[: max(1, max_length - len(bos) - 2)] if full else []
    answer_bytes = len((answer if len(a_ids) == len(full) else tok.decode(a_ids)).encode("utf-8"))
    tail = [tok.eos_token_id] if eos and tok.eos_token_id is not None else []
    room = max(0, max_length - len(bos) - len(a_ids) - len(tail))
    cut = max(0, len(p_ids) - room)
    offsets = [tuple(s) for s in enc["offset_mapping"][cut:]] if spans and p_ids else []
    ids = bos + p_ids[cut:] + a_ids + tail
    n_prompt = len(bos) + len(p_ids) - cut
    return Example(ids, [IGNORE] * n_prompt + a_ids + tail, answer_bytes, len(bos), offsets, cut)


def collate(examples: list[Example], pad: int | None = None, tok=None):
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    pad = pad if pad is not None else pad_id(tok)
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
