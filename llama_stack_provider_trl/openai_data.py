"""OpenAI's fine-tuning file formats, checked row by row and turned into TRL's.

- SFT chat rows ``{"messages": [...]}``; an assistant message with ``"weight": 0`` carries no loss. Rows
  without such messages stay ``{"messages"}`` (SFT trains on every assistant turn). When any row has one,
  every row becomes conversational prompt/completion: the prompt ends before the first assistant message
  with weight 1, and the recipe trains on the completion's assistant turns (both of TRL's masks), so
  weight 0 works for assistant messages before the first trained one; a weight-0 message after a trained
  one is refused (a 400), not silently trained on.
- DPO rows ``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}``
  become TRL's conversational ``prompt`` / ``chosen`` / ``rejected``.

Files in TRL's own formats go through data.py's checks unchanged. Every problem is a DataError (a 400)
naming the file's field, its line (or row) and the field inside the row.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .data import DataError, check_strings, preference_format, preference_rows, sft_format, sft_rows

ROLES = ("system", "user", "assistant", "tool")
UNSUPPORTED_ROW_KEYS = ("tools", "functions", "parallel_tool_calls")
UNSUPPORTED_MESSAGE_KEYS = ("tool_calls", "function_call")


class Rows:
    """A file's rows and where each came from ("line 3" for JSONL files, "row 2" for datasets)."""

    def __init__(self, field: str, rows: list[Any], places: list[str] | None = None) -> None:
        self.field = field
        self.rows = rows
        self.places = places or [f"row {i}" for i in range(len(rows))]

    def where(self, index: int) -> str:
        return f"{self.field}: {self.places[index]}"


def parse_jsonl(field: str, content: bytes, max_rows: int) -> Rows:
    """A JSONL file's rows, each an object, with their line numbers."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{field}: the file is not UTF-8 text ({exc})") from None
    rows, places = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(rows) == max_rows:
            raise DataError(f"{field}: more than {max_rows} rows, the provider's limits.max_dataset_rows")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "a fine-tuning file holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{field}: line {number}: a JSON {type(row).__name__}, not an object")
        rows.append(row)
        places.append(f"line {number}")
    if not rows:
        raise DataError(f"{field}: the file has no rows")
    return Rows(field, rows, places)


def _trl_checked(data: Rows, check) -> list[dict]:
    """data.py's checks name rows by index; say the line instead where the file has lines."""
    try:
        return check(data.rows, data.field)
    except DataError as exc:
        message = re.sub(r"\brow (\d+)", lambda m: data.places[int(m.group(1))], str(exc), count=1)
        raise DataError(message) from None


# ---- messages ---------------------------------------------------------------------------------


def _content(value: Any, where: str) -> str:
    """A string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise DataError(f"{where}.content must be a string (or a list of text parts)")


def _messages(value: Any, where: str, weights: bool = False) -> list[dict]:
    """Checked messages as {role, content} (and weight where allowed); "developer" reads as "system"."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with role and content")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise DataError(f"{at}.role must be one of system, developer, user, assistant, tool; got "
                            f"{message.get('role')!r}")
        for key in UNSUPPORTED_MESSAGE_KEYS:
            if message.get(key) is not None:
                raise DataError(f"{at}.{key}: tool calls are not supported in training files")
        converted = {"role": role, "content": _content(message.get("content"), at)}
        if "weight" in message:
            weight = message["weight"]
            if not weights or role != "assistant":
                raise DataError(f"{at}.weight: only assistant messages of SFT chat rows have a weight")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise DataError(f"{at}.weight must be 0 or 1, got {weight!r}")
            converted["weight"] = int(weight)
        out.append(converted)
    return out


def _check_row_keys(row: dict, where: str) -> None:
    for key in UNSUPPORTED_ROW_KEYS:
        if row.get(key) is not None:
            raise DataError(f"{where}: field '{key}': tool definitions are not supported in training files")


# ---- SFT --------------------------------------------------------------------------------------


def _chat_row(row: dict, where: str) -> list[dict]:
    _check_row_keys(row, where)
    messages = _messages(row.get("messages"), f"{where}: messages", weights=True)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) == 1]
    if not trained:
        raise DataError(f"{where}: messages has no assistant message with weight 1 to learn from")
    for i, m in enumerate(messages):
        if i > trained[0] and m["role"] == "assistant" and m.get("weight") == 0:
            raise DataError(f"{where}: messages[{i}].weight: 0 after a trained assistant message (messages"
                            f"[{trained[0]}]) is not supported; only assistant messages before the first trained "
                            "one can have weight 0")
    if trained[0] == 0:
        raise DataError(f"{where}: messages[0]: the conversation begins with the assistant; give the prompt "
                        "(a system or user message) first")
    check_strings(messages, f"{where}: messages", name_path=True)
    return messages


def sft_training_rows(train: Rows, validation: Rows | None) -> tuple[list[dict], list[dict] | None]:
    """TRL SFT rows for the training (and validation) file; OpenAI chat rows when the first row has messages."""
    if "messages" not in train.rows[0]:
        def check(rows: list[dict], field: str) -> list[dict]:
            return sft_rows(rows, sft_format(rows, field, None))

        fmt_rows = _trl_checked(train, check)
        return fmt_rows, _trl_checked(validation, check) if validation else None

    chats = []
    for data in (train, validation):
        if data is None:
            continue
        chats.append([_chat_row(row, data.where(i)) for i, row in enumerate(data.rows)])
    weighted = any(m.get("weight") == 0 for rows in chats for messages in rows for m in messages)
    converted = [[_as_trl(messages, weighted) for messages in rows] for rows in chats]
    return converted[0], converted[1] if validation else None


def _as_trl(messages: list[dict], prompt_completion: bool) -> dict:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not prompt_completion:
        return {"messages": plain}
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) == 1)
    return {"prompt": plain[:first], "completion": plain[first:]}


# ---- DPO --------------------------------------------------------------------------------------


def _preference_row(row: dict, where: str) -> dict:
    _check_row_keys(row, where)
    source = row.get("input")
    if not isinstance(source, dict):
        raise DataError(f"{where}: input must be an object with messages")
    _check_row_keys(source, f"{where}: input")
    prompt = _messages(source.get("messages"), f"{where}: input.messages")
    answers = {}
    for key in ("preferred_output", "non_preferred_output"):
        messages = _messages(row.get(key), f"{where}: {key}")
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                raise DataError(f"{where}: {key}[{i}].role must be assistant, got {m['role']!r}")
        answers[key] = messages
    converted = {"prompt": prompt, "chosen": answers["preferred_output"], "rejected": answers["non_preferred_output"]}
    check_strings(converted, where, name_path=True)
    return converted


def dpo_training_rows(train: Rows, validation: Rows | None) -> tuple[list[dict], list[dict] | None]:
    """TRL preference rows; OpenAI's preference rows when the first row has input or preferred_output."""
    first = train.rows[0]
    if "input" not in first and "preferred_output" not in first:
        def check(rows: list[dict], field: str) -> list[dict]:
            return preference_rows(rows, preference_format(rows, field))

        return _trl_checked(train, check), _trl_checked(validation, check) if validation else None
    out = [[_preference_row(row, data.where(i)) for i, row in enumerate(data.rows)]
           for data in (train, validation) if data is not None]
    return out[0], out[1] if validation else None


__all__ = ["Rows", "parse_jsonl", "sft_training_rows", "dpo_training_rows"]
