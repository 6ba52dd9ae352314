"""The prompt every stage builds for a row: one template per task kind, or the tokenizer's chat template.

`render` returns the text and where the row's own fields sit in it, so token compression can
shorten the fields and leave the template alone. Layer calibration, IFD, token compression,
training and evaluation all call it, so they score and train the same text.

`template`: plain (the task template), chat (the tokenizer's chat template, one user turn; the
answer is the assistant's reply), auto (chat when the tokenizer has a chat template).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TASKS = ("qa", "reading_comprehension", "multiple_choice")

# "A. text", "B) text", "(C) text" at the start of a line.
OPTION_RE = re.compile(r"^\s*\(?([A-Ha-h])[.)]\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    text: str
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)  # field -> (start, end) in text


def _join(parts: list[tuple[str | None, str]]) -> Prompt:
    """Concatenate (field name or None, text) pieces, recording each field's span."""
    text, spans = "", {}
    for name, piece in parts:
        if name:
            spans[name] = (len(text), len(text) + len(piece))
        text += piece
    return Prompt(text, spans)


def _pieces(task: str, instruction: str, inp: str, chat: bool) -> list[tuple[str | None, str]]:
    """The row as template pieces. In a chat turn the role markers replace 'Question:'/'Answer:'."""
    if task == "reading_comprehension" and inp:
        return [(None, "Passage: "), ("input", inp), (None, "\nQuestion: "), ("instruction", instruction),
                *([] if chat else [(None, "\nAnswer: ")])]
    context = [(None, "\n"), ("input", inp)] if inp else []
    if chat:
        return [("instruction", instruction), *context]
    return [(None, "Question: "), ("instruction", instruction), *context, (None, "\nAnswer: ")]


def uses_chat(tok, template: str) -> bool:
    if template == "chat":
        if not getattr(tok, "chat_template", None):
            raise ValueError("template chat: this tokenizer has no chat template")
        return True
    return template == "auto" and bool(getattr(tok, "chat_template", None))


def render(task: str, instruction: str, inp: str | None, tok=None, template: str = "plain") -> Prompt:
    """The prompt text for a row (the answer follows it directly) and its fields' spans."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; known: {', '.join(TASKS)}")
    chat = tok is not None and uses_chat(tok, template)
    user = _join(_pieces(task, str(instruction), str(inp or ""), chat))
    if not chat:
        return user
    text = tok.apply_chat_template([{"role": "user", "content": user.text}], tokenize=False,
                                   add_generation_prompt=True)
    at = text.rfind(user.text)
    if at < 0:  # a template that rewrites the message: no field spans (nothing is compressed)
        return Prompt(text, {})
    return Prompt(text, {k: (a + at, b + at) for k, (a, b) in user.fields.items()})


def prompt_text(task: str, instruction: str, inp: str | None, tok=None, template: str = "plain") -> str:
    return render(task, instruction, inp, tok, template).text


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
