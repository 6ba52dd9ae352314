"""One user record -> one normalised row (id, instruction, input, output, source), or a reason.

Layouts recognised: Alpaca-style columns (named by `data.fields`) and ShareGPT-style turn
lists (`conversations` with from/value, or `messages` with role/content).
"""

from __future__ import annotations

from typing import Any

from damoc.spec import Fields

COLUMNS = ("id", "source", "instruction", "input", "output")
MAX_FIELD_CHARS = 200_000  # a field beyond this is a broken row, not a training sample
RAW_CHARS = 2_000  # how much of a bad record the quarantine keeps

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot", "model"}
SYSTEM_ROLES = {"system"}


class BadRow(ValueError):
    """The record cannot become a training row; the message is the quarantine reason."""


def _text(value: Any, name: str, required: bool) -> str:
    if value is None:
        if required:
            raise BadRow(f"missing field '{name}'")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow(f"field '{name}' is not text ({type(value).__name__})")
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_FIELD_CHARS:
        raise BadRow(f"field '{name}' is longer than {MAX_FIELD_CHARS} characters")
    return text


def _from_turns(turns: Any, key: str) -> tuple[str, str, str]:
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"field '{key}' is not a non-empty list of turns")
    system, instruction, output = "", None, None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{i}] is not an object")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        text = _text(turn.get("value", turn.get("content")), f"{key}[{i}].value", required=True)
        if role in SYSTEM_ROLES and instruction is None:
            system = text
        elif role in USER_ROLES and instruction is None:
            instruction = text
        elif role in ASSISTANT_ROLES and instruction is not None:
            output = text
            break  # the first exchange is the sample
    if instruction is None:
        raise BadRow(f"no user turn in '{key}'")
    return instruction, system, output or ""


def lookup(record: dict, path: str) -> Any:
    """A field by name, or by a dotted path into nested records and lists (`answers.text.0`, as
    SQuAD-style sets store their answer). None when any step is missing."""
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def normalize_record(record: Any, fields: Fields) -> dict[str, str]:
    """The row's instruction/input/output; raises BadRow with the reason."""
    if not isinstance(record, dict):
        raise BadRow(f"record is not an object ({type(record).__name__})")
    turns_key = next((k for k in ("conversations", "messages") if k in record), None)
    if turns_key and fields.instruction not in record:
        instruction, inp, output = _from_turns(record[turns_key], turns_key)
    else:
        instruction = _text(lookup(record, fields.instruction), fields.instruction, required=True)
        inp = _text(lookup(record, fields.input), fields.input, required=False) if fields.input else ""
        raw = lookup(record, fields.output)
        if raw is None:
            raise BadRow(f"no answer (field '{fields.output}' missing or null)")
        output = _text(raw, fields.output, required=False)
    if not instruction.strip():
        raise BadRow("empty instruction")
    if not output.strip():
        raise BadRow("no answer")
    return {"instruction": instruction, "input": inp, "output": output}


def row(row_id: str, source: str, record: Any, fields: Fields) -> dict[str, Any]:
    """A normalised row, or a quarantined one (reason set, raw record kept, truncated)."""
    try:
        out = normalize_record(record, fields)
        return {"id": row_id, "source": source, **out, "reason": None, "raw": None}
    except BadRow as exc:
        return quarantined(row_id, source, str(exc), record)


def quarantined(row_id: str, source: str, reason: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str):
        try:
            import json

            raw = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = repr(raw)
    return {"id": row_id, "source": source, "instruction": "", "input": "", "output": "",
            "reason": reason, "raw": raw[:RAW_CHARS]}
