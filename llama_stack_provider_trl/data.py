"""Training data: where rows come from, and whether they fit the method's formats.

Rows come from a dataset registered with Llama Stack (read through the datasetio
API) or, as the 0.2.x README's shorthand, from a local .json/.jsonl file. They are
checked here, row by row, before a job is accepted; the accepted rows are then
snapshotted into the job's directory, so the job (and a resumed job) trains on
exactly what was validated.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import random
import re
import stat
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

LOCAL_SUFFIXES = (".json", ".jsonl")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
INSTRUCT_KEYS = (("prompt", "completion"), ("input", "output"), ("question", "answer"))
# Rows are flat records of strings and message lists; anything deeper is no training data, and
# walking (or json-encoding) it recursively would hit Python's recursion limit (a 500).
MAX_NESTING = 32
# Sources Llama Stack's localfs datasetio reads itself; we read them the same way (pandas), in a
# thread and with the row limit, so a big dataset neither blocks the event loop nor is read whole.
LOCALFS_SUFFIXES = (".csv", ".xlsx")
REGISTERED_PAGE_ROWS = 100_000

PreferenceFormat = Literal["standard", "conversational"]
SFTFormat = Literal["instruct", "dialog"]


class DataError(ValueError):
    """A 400: the message names the field, and the row where there is one."""


class StorageFullError(Exception):
    """A 507: the job's data snapshot could not be written for lack of space. translate_exception
    answers an exception's status_code."""

    status_code = 507


def _too_many(field: str, dataset_id: str, max_rows: int) -> DataError:
    return DataError(f"{field}: dataset '{dataset_id}' has more than {max_rows} rows (the provider's limits.max_dataset_rows)")


def require_kind(path: Path, field: str, value: str, kind: Literal["file", "dir", "any"]) -> None:
    """stat (never open) a path: a FIFO or device would block the reader until someone writes to it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return  # callers say "no such file" in their own terms
    except OSError as exc:
        raise DataError(f"{field}: '{value}' cannot be examined ({exc.strerror})") from None
    if stat.S_ISREG(mode) and kind in ("file", "any"):
        return
    if stat.S_ISDIR(mode) and kind in ("dir", "any"):
        return
    what = "a directory" if stat.S_ISDIR(mode) else ("a regular file" if stat.S_ISREG(mode) else
                                                    "a FIFO, socket or device, not a regular file or directory")
    raise DataError(f"{field}: '{value}' is {what}")


def resolve_inside(value: str, roots: list[str], field: str) -> Path:
    """Resolve a user-given path (symlinks followed) and insist it lies under one of `roots`,
    and is a regular file or directory (nothing else is ever opened)."""
    path = Path(value.removeprefix("file://")).expanduser().resolve()
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    if not any(path == root or path.is_relative_to(root) for root in resolved_roots):
        raise PermissionError(
            f"{field}: '{value}' resolves to {path}, which is outside the allowed roots "
            f"({', '.join(str(r) for r in resolved_roots)}); set the provider's roots to allow it"
        )
    require_kind(path, field, value, "any")
    return path


def is_local_file_reference(dataset_id: str) -> bool:
    return dataset_id.startswith(("/", "./", "../", "~", "file://")) or dataset_id.endswith(LOCAL_SUFFIXES)


def local_uri_path(uri: str) -> str | None:
    """The local path a dataset source URI names (a plain path or file: URI), or None for data:,
    http(s) and other remote schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        return None
    return uri


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"{where} is nested too deeply to be training data") from None


_WS = re.compile(r"[ \t\n\r]*")
_DATA_LIST = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"data"[ \t\n\r]*:[ \t\n\r]*\[')


def _json_list_rows(text: str, name: str, field: str, dataset_id: str, max_rows: int) -> list[Any] | None:
    """The elements of a top-level [...] or {"data": [...]}, decoded one at a time so that a file with
    too many rows is refused at row max_rows + 1. None when the document has another shape."""
    match = _DATA_LIST.match(text)
    if match:
        pos, closer = match.end(), "}"
    else:
        pos = _WS.match(text).end()
        if not text.startswith("[", pos):
            return None
        pos, closer = pos + 1, ""
    decoder = json.JSONDecoder()
    rows: list[Any] = []
    pos = _WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            if len(rows) == max_rows:
                raise _too_many(field, dataset_id, max_rows)
            try:
                row, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{field}: {name} is not valid JSON: {exc}") from None
            except RecursionError:
                raise DataError(f"{field}: {name} row {len(rows)} is nested too deeply to be training data") from None
            rows.append(row)
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise DataError(f"{field}: {name} is not valid JSON: expected ',' or ']' at character {pos}")
    rest = text[pos:].strip()
    if rest != closer:
        return None  # e.g. {"data": [...], "other": ...}: let the full parser judge it
    return rows


def read_local_rows(path: Path, field: str, max_rows: int = 10**12, dataset_id: str | None = None) -> list[Any]:
    """Rows of a local .jsonl (streamed line by line) or .json file, stopping at max_rows + 1."""
    dataset_id = dataset_id or str(path)
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{field}: local datasets must be .json or .jsonl files, got '{path.name}'")
    require_kind(path, field, str(path), "file")
    if not path.is_file():
        raise DataError(f"{field}: no such file: {path}")
    try:
        if path.suffix == ".jsonl":
            rows: list[Any] = []
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if len(rows) == max_rows:
                        raise _too_many(field, dataset_id, max_rows)
                    rows.append(_loads(line, f"{field}: {path.name} line {number}"))
            return rows
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{field}: {path.name} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataError(f"{field}: {path.name} cannot be read ({exc.strerror})") from None
    rows = _json_list_rows(text, path.name, field, dataset_id, max_rows)
    if rows is None:
        doc = _loads(text, f"{field}: {path.name}")
        rows = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise DataError(f"{field}: {path.name} must hold a list of rows, or {{\"data\": [rows]}}")
    return rows


def _check_loaded(rows: list[Any], dataset_id: str, field: str, max_rows: int) -> list[dict]:
    if not rows:
        raise DataError(f"{field}: dataset '{dataset_id}' has no rows")
    if len(rows) > max_rows:
        raise _too_many(field, dataset_id, max_rows)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{field}: row {index} is a {type(row).__name__}, not an object")
    return rows


async def load_rows(dataset_id: str, *, field: str, datasetio: Any, roots: list[str], max_rows: int,
                    datasets: Any = None) -> list[dict]:
    """All rows of a registered dataset or a local file; raises DataError/PermissionError.
    Files are read in a worker thread, so the server keeps answering while a big one is read."""
    if is_local_file_reference(dataset_id):
        path = resolve_inside(dataset_id, roots, field)
        rows = await asyncio.to_thread(read_local_rows, path, field, max_rows, dataset_id)
    else:
        rows = await _read_registered(dataset_id, field=field, datasetio=datasetio, datasets=datasets,
                                      roots=roots, max_rows=max_rows)
    return await asyncio.to_thread(_check_loaded, rows, dataset_id, field, max_rows)


def _unreadable(field: str, dataset_id: str, exc: BaseException) -> DataError:
    return DataError(
        f"{field}: dataset '{dataset_id}' could not be read ({type(exc).__name__}: {exc}); register it with "
        "POST /v1beta/datasets or give a local .json/.jsonl path"
    )


def _read_source(source: Any, path: Path | None, max_rows: int) -> list[dict]:
    """What localfs's iterrows returns for these sources (pandas records), at most max_rows + 1 of them."""
    import pandas

    if source.type == "rows":
        frame = pandas.DataFrame(source.rows[: max_rows + 1])
    elif path is not None:
        read = pandas.read_csv if path.suffix == ".csv" else pandas.read_excel
        frame = read(path, nrows=max_rows + 1)
    else:  # a data: URI: its bytes are already in the registration
        from llama_stack.providers.utils.datasetio.url_utils import get_dataframe_from_uri

        frame = asyncio.run(get_dataframe_from_uri(source.uri)).head(max_rows + 1)
    return frame.to_dict("records")


async def _read_registered(dataset_id: str, *, field: str, datasetio: Any, datasets: Any, roots: list[str],
                           max_rows: int) -> list[dict]:
    if datasetio is None:
        raise DataError(f"{field}: '{dataset_id}' is not a local file and no datasetio provider is configured")
    source = None
    if datasets is not None:
        from llama_stack_api.datasets.models import GetDatasetRequest

        try:
            source = (await datasets.get_dataset(GetDatasetRequest(dataset_id=dataset_id))).source
        except Exception as exc:  # DatasetNotFoundError, or a routing-table error
            raise _unreadable(field, dataset_id, exc) from None
    path = None
    if source is not None and source.type == "uri":
        local = local_uri_path(source.uri)
        if local is not None:
            # a registered dataset is one more way to name a local file: the same roots apply, before any read
            path = resolve_inside(local, roots, f"{field} (dataset '{dataset_id}', source uri)")
            require_kind(path, field, local, "file")
    readable_here = source is not None and (
        source.type == "rows" or (path is not None and path.suffix in LOCALFS_SUFFIXES)
        or (source.type == "uri" and source.uri.startswith("data:")))
    if readable_here:
        try:
            return await asyncio.to_thread(_read_source, source, path, max_rows)
        except Exception as exc:
            raise _unreadable(field, dataset_id, exc) from None
    from llama_stack_api.datasetio.models import IterRowsRequest

    # Other sources (remote URIs, other providers) through datasetio, a page at a time; limit is
    # needed (localfs ignores start_index without it), and one row past max_rows detects "too many".
    rows: list[dict] = []
    while len(rows) <= max_rows:
        limit = min(REGISTERED_PAGE_ROWS, max_rows + 1 - len(rows))
        try:
            page = await datasetio.iterrows(IterRowsRequest(dataset_id=dataset_id, start_index=len(rows), limit=limit))
        except Exception as exc:  # the router raises ValueError/KeyError/ResourceNotFoundError for unknown ids
            raise _unreadable(field, dataset_id, exc) from None
        rows.extend(page.data)
        if len(page.data) < limit or not page.has_more:
            break
    return rows


def check_strings(value: Any, where: str, name_path: bool = False) -> None:
    """Every string in a value (dict keys included) must be encodable (no lone surrogates, which neither
    the tokenizer nor the job store's UTF-8 JSON can take), and the value no deeper than MAX_NESTING.
    Iterative: no recursion to exhaust. name_path: say where inside the value (`where.key[0]`)."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        at = where + path if name_path else where
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{at} has an unpaired surrogate (\\u{ord(item[exc.start]):04x}) at character "
                                f"{exc.start}, which is not valid Unicode text") from None
        elif isinstance(item, (list, dict)):
            if depth >= MAX_NESTING:
                raise DataError(f"{at} is nested more than {MAX_NESTING} levels deep")
            if isinstance(item, dict):
                stack.extend((k, depth + 1, path) for k in item)
                stack.extend((v, depth + 1, f"{path}.{k}") for k, v in item.items())
            else:
                stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(item))


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
    check_strings(value, where)  # messages are kept whole, extra keys included


def _check_text(row: dict, key: str, where: str) -> None:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(row[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(row[key]).__name__}")
    if not row[key].strip():
        raise DataError(f"{where}: field '{key}' is empty")
    check_strings(row[key], f"{where}: field '{key}'")


def _check_shared_prompt(row: dict, where: str) -> None:
    """Without a prompt, TRL takes the messages chosen and rejected begin with in common as the prompt;
    with none in common, or nothing left after it, the job would fail inside TRL (an IndexError)."""
    chosen, rejected = row["chosen"], row["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}: has no field 'prompt', and 'chosen' and 'rejected' do not begin with the same "
                        "message, so there is no prompt to extract; give the prompt in a 'prompt' field")
    if shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{where}: has no field 'prompt', and one of 'chosen' and 'rejected' is all prompt "
                        "(the other begins with all of it), leaving no answer to prefer")


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
            if not has_prompt:
                _check_shared_prompt(row, where)
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
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(f"the job's data snapshot could not be written to {path.parent}: "
                                   f"{os.strerror(exc.errno)}; free space under the provider's output_dir") from None
        raise


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
