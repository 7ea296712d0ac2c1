"""Training data: where rows come from, and whether they fit the method's formats.

Rows come from a dataset registered with Llama Stack (read through the datasetio
API) or, as the 0.2.x README's shorthand, from a local .json/.jsonl file. They are
checked here, row by row, before a job is accepted; the accepted rows are then
snapshotted into the job's directory, so the job (and a resumed job) trains on
exactly what was validated.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Literal

LOCAL_SUFFIXES = (".json", ".jsonl")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
INSTRUCT_KEYS = (("prompt", "completion"), ("input", "output"), ("question", "answer"))

PreferenceFormat = Literal["standard", "conversational"]
SFTFormat = Literal["instruct", "dialog"]


class DataError(ValueError):
    """A 400: the message names the field, and the row where there is one."""


def resolve_inside(value: str, roots: list[str], field: str) -> Path:
    """Resolve a user-given path (symlinks followed) and insist it lies under one of `roots`."""
    path = Path(value.removeprefix("file://")).expanduser().resolve()
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    if not any(path == root or path.is_relative_to(root) for root in resolved_roots):
        raise PermissionError(
            f"{field}: '{value}' resolves to {path}, which is outside the allowed roots "
            f"({', '.join(str(r) for r in resolved_roots)}); set the provider's roots to allow it"
        )
    return path


def is_local_file_reference(dataset_id: str) -> bool:
    return dataset_id.startswith(("/", "./", "../", "~", "file://")) or dataset_id.endswith(LOCAL_SUFFIXES)


def read_local_rows(path: Path, field: str) -> list[dict[str, Any]]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{field}: local datasets must be .json or .jsonl files, got '{path.name}'")
    if not path.is_file():
        raise DataError(f"{field}: no such file: {path}")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            doc = json.loads(path.read_text())
            rows = doc.get("data") if isinstance(doc, dict) else doc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{field}: {path.name} is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"{field}: {path.name} must hold a list of rows, or {{\"data\": [rows]}}")
    return rows


async def load_rows(dataset_id: str, *, field: str, datasetio: Any, roots: list[str], max_rows: int) -> list[dict]:
    """All rows of a registered dataset or a local file; raises DataError/PermissionError."""
    if is_local_file_reference(dataset_id):
        rows = read_local_rows(resolve_inside(dataset_id, roots, field), field)
    else:
        rows = await _read_registered(dataset_id, field=field, datasetio=datasetio, max_rows=max_rows)
    if not rows:
        raise DataError(f"{field}: dataset '{dataset_id}' has no rows")
    if len(rows) > max_rows:
        raise DataError(f"{field}: dataset '{dataset_id}' has more than {max_rows} rows (the provider's limits.max_dataset_rows)")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{field}: row {index} is a {type(row).__name__}, not an object")
    return rows


async def _read_registered(dataset_id: str, *, field: str, datasetio: Any, max_rows: int) -> list[dict]:
    if datasetio is None:
        raise DataError(f"{field}: '{dataset_id}' is not a local file and no datasetio provider is configured")
    from llama_stack_api.datasetio.models import IterRowsRequest

    try:
        # limit is needed: localfs ignores start_index without it. One extra row detects "too many".
        page = await datasetio.iterrows(IterRowsRequest(dataset_id=dataset_id, start_index=0, limit=max_rows + 1))
    except Exception as exc:  # the router raises ValueError/KeyError/ResourceNotFoundError for unknown ids
        raise DataError(
            f"{field}: dataset '{dataset_id}' could not be read ({type(exc).__name__}: {exc}); register it with "
            "POST /v1beta/datasets or give a local .json/.jsonl path"
        ) from None
    return list(page.data)


# ---- preference (DPO) rows -------------------------------------------------------------------


def _check_messages(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}[{i}] must be an object with role and content")
        if message.get("role") not in MESSAGE_ROLES:
            raise DataError(f"{where}[{i}].role must be one of {', '.join(MESSAGE_ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}[{i}].content must be a string")


def _check_text(row: dict, key: str, where: str) -> None:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    if not row[key].strip():
        raise DataError(f"{where}: field '{key}' is empty")


def preference_format(rows: list[dict], field: str) -> PreferenceFormat:
    """Check every row is TRL preference data, all in one format; return the format."""
    first = rows[0]
    fmt: PreferenceFormat = "conversational" if isinstance(first.get("chosen"), list) else "standard"
    for index, row in enumerate(rows):
        where = f"{field}: row {index}"
        for key in ("chosen", "rejected"):
            if key not in row or row[key] is None:
                raise DataError(f"{where}: missing field '{key}' (preference rows need prompt, chosen, rejected)")
        if fmt == "standard":
            for key in ("prompt", "chosen", "rejected"):
                _check_text(row, key, where)
        else:
            has_prompt = row.get("prompt") is not None
            if has_prompt != (first.get("prompt") is not None):
                # TRL extracts an implicit prompt only when the whole dataset has none
                raise DataError(f"{where}: {'has' if has_prompt else 'has no'} field 'prompt' but row 0 "
                                f"{'has none' if has_prompt else 'has one'}; give a prompt in every row or in none")
            if has_prompt:
                _check_messages(row["prompt"], f"{where}: field 'prompt'")
            _check_messages(row["chosen"], f"{where}: field 'chosen'")
            _check_messages(row["rejected"], f"{where}: field 'rejected'")
    return fmt


def preference_rows(rows: list[dict], fmt: PreferenceFormat) -> list[dict]:
    """Keep only the columns TRL reads; an absent conversational prompt stays absent (TRL extracts it)."""
    keys = ("prompt", "chosen", "rejected")
    return [{k: row[k] for k in keys if row.get(k) is not None} for row in rows]


# ---- supervised fine-tuning rows -------------------------------------------------------------


def _has(row: dict, key: str) -> bool:
    """Registered datasets come back as a table: a field a row lacks reads as None or NaN."""
    value = row.get(key)
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _instruct_pair(row: dict) -> tuple[str, str] | None:
    for prompt_key, completion_key in INSTRUCT_KEYS:
        if _has(row, prompt_key) and _has(row, completion_key):
            return prompt_key, completion_key
    return None


def sft_format(rows: list[dict], field: str, declared: str | None) -> SFTFormat:
    accepted = "instruct rows (prompt/completion, input/output or question/answer strings) or dialog rows (messages)"
    fmt: SFTFormat | None = declared  # type: ignore[assignment]
    for index, row in enumerate(rows):
        where = f"{field}: row {index}"
        row_fmt: SFTFormat | None = "dialog" if _has(row, "messages") else ("instruct" if _instruct_pair(row) else None)
        if row_fmt is None:
            keys = ", ".join(sorted(k for k in row if _has(row, k))) or "none"
            raise DataError(f"{where} fits no format (keys: {keys}); accepted: {accepted}")
        if fmt is None:
            fmt = row_fmt
        if row_fmt != fmt:
            raise DataError(f"{where} is {row_fmt} data but the dataset is {fmt}; accepted: {accepted}")
        try:
            if fmt == "dialog":
                _check_messages(row["messages"], f"{where}: field 'messages'")
                if not any(m["role"] == "assistant" for m in row["messages"]):
                    raise DataError(f"{where}: field 'messages' has no assistant message to learn from")
            else:
                for key in _instruct_pair(row):
                    _check_text(row, key, where)
        except DataError as exc:
            raise DataError(f"{exc}; accepted: {accepted}") from None
    assert fmt is not None
    return fmt


def sft_rows(rows: list[dict], fmt: SFTFormat) -> list[dict]:
    """TRL's SFT formats: {"messages": [...]} or {"prompt": str, "completion": str}."""
    if fmt == "dialog":
        return [{"messages": row["messages"]} for row in rows]
    out = []
    for row in rows:
        prompt_key, completion_key = _instruct_pair(row)
        out.append({"prompt": row[prompt_key], "completion": row[completion_key]})
    return out


def hold_out(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): a fraction of the rows, at least one, for validation; at least one
    row stays for training. Chosen by a fixed seed, so the same data always splits the same way,
    and spread over the dataset, since datasets are often sorted."""
    if len(rows) < 2 or fraction <= 0:
        return rows, []
    n_validation = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    picked = set(random.Random(0).sample(range(len(rows)), n_validation))
    return ([r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked])


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
