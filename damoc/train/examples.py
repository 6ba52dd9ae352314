"""Rows -> prompt/answer text -> token ids with the loss on the answer tokens only.

One prompt template per task kind. Candidates have different tokenizers, so every example
also carries the UTF-8 byte count of the answer text it scores: the tokenizer-independent
denominator of bits per byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORE = -100  # label value the loss skips

TEMPLATES = {
    "qa": "Question: {instruction}{context}\nAnswer: ",
    "reading_comprehension": "Passage: {input}\nQuestion: {instruction}\nAnswer: ",
    "multiple_choice": "Question: {instruction}{context}\nAnswer: ",
}

# "A. text", "B) text", "(C) text" at the start of a line.
OPTION_RE = re.compile(r"^\s*\(?([A-Ha-h])[.)]\s*(.+?)\s*$", re.MULTILINE)


def prompt_text(task: str, instruction: str, inp: str | None) -> str:
    inp = inp or ""
    if task == "reading_comprehension" and inp:
        return TEMPLATES[task].format(instruction=instruction, input=inp)
    return TEMPLATES["qa" if task == "reading_comprehension" else task].format(
        instruction=instruction, context=("\n" + inp) if inp else "")


def options_of(instruction: str, inp: str | None) -> list[tuple[str, str]]:
    """Lettered options written in the prompt, as (letter, text); [] when there are none."""
    found = OPTION_RE.findall((instruction or "") + "\n" + (inp or ""))
    return [(letter.upper(), text) for letter, text in found]


def gold_option(options: list[tuple[str, str]], answer: str) -> int | None:
    """Index of the option the answer names, by letter ("B", "B. text") or by its text."""
    a = answer.strip()
    for i, (letter, _) in enumerate(options):
        if a.upper() == letter or re.match(rf"^\(?{letter}[.):]?(\s|$)", a, re.IGNORECASE):
            return i
    for i, (_, text) in enumerate(options):
        if a.lower() == text.lower():
            return i
    return None


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    answer_bytes: int  # UTF-8 bytes of the scored answer text (after any truncation)


def encode(tok, prompt: str, answer: str, max_length: int, eos: bool = True) -> Example:
    """Prompt ids (cut from the left to fit) + answer ids (+ EOS when training); labels mask the prompt."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    full = tok(answer, add_special_tokens=False)["input_ids"]
    a_ids = full[: max(1, max_length - len(bos) - 2)]
    answer_bytes = len((answer if len(a_ids) == len(full) else tok.decode(a_ids)).encode("utf-8"))
    tail = [tok.eos_token_id] if eos and tok.eos_token_id is not None else []
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    room = max_length - len(bos) - len(a_ids) - len(tail)
    p_ids = bos + (p_ids[-room:] if room > 0 else [])
    return Example(p_ids + a_ids + tail, [IGNORE] * len(p_ids) + a_ids + tail, answer_bytes)


def collate(examples: list[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE on padding)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
