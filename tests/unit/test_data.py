"""Row loading and validation: every refusal names the row and the field."""

import asyncio
import json

import pytest

from llama_stack_provider_trl.data import (
    DataError,
    load_rows,
    preference_format,
    preference_rows,
    resolve_inside,
    sft_format,
    sft_rows,
)

STANDARD = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "Q?"}],
    "chosen": [{"role": "assistant", "content": "good"}],
    "rejected": [{"role": "assistant", "content": "bad"}],
}
IMPLICIT = {  # hh-rlhf "trl-style": full conversations, no prompt
    "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
    "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
}
F = "training_config.data_config.dataset_id"


def test_formats_are_detected():
    assert preference_format([STANDARD, STANDARD], F) == "standard"
    assert preference_format([CONVERSATIONAL], F) == "conversational"
    assert preference_format([IMPLICIT], F) == "conversational"


def test_only_trl_columns_are_kept_and_prompt_is_never_merged_into_answers():
    rows = preference_rows([{**STANDARD, "id": 7}], "standard")
    assert rows == [STANDARD]
    assert preference_rows([IMPLICIT], "conversational") == [IMPLICIT]


@pytest.mark.parametrize("row,expected", [
    ({"prompt": "Q", "chosen": "a"}, "row 1: missing field 'rejected'"),
    ({"prompt": "Q", "chosen": 3, "rejected": "b"}, "row 1: field 'chosen' must be a string, got int"),
    ({"chosen": "a", "rejected": "b"}, "row 1: missing field 'prompt'"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "row 1: field 'prompt' is empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": None}, "row 1: missing field 'rejected'"),
])
def test_bad_standard_rows_are_named(row, expected):
    with pytest.raises(DataError, match=expected):
        preference_format([STANDARD, row], F)


@pytest.mark.parametrize("row,expected", [
    ({**CONVERSATIONAL, "chosen": [{"role": "robot", "content": "x"}]}, r"row 1: field 'chosen'\[0\].role"),
    ({**CONVERSATIONAL, "rejected": [{"role": "assistant", "content": 5}]}, r"row 1: field 'rejected'\[0\].content"),
    ({**CONVERSATIONAL, "chosen": []}, "row 1: field 'chosen' must be a non-empty list"),
    ({**CONVERSATIONAL, "chosen": "text"}, "row 1: field 'chosen' must be a non-empty list"),
])
def test_bad_conversational_rows_are_named(row, expected):
    with pytest.raises(DataError, match=expected):
        preference_format([CONVERSATIONAL, row], F)


def test_conversational_prompts_are_all_or_nothing():
    with pytest.raises(DataError, match="row 1: has no field 'prompt' but row 0 has one"):
        preference_format([CONVERSATIONAL, IMPLICIT], F)
    with pytest.raises(DataError, match="row 1: has field 'prompt' but row 0 has none"):
        preference_format([IMPLICIT, CONVERSATIONAL], F)


def test_sft_formats_and_aliases():
    rows = [{"question": "Q", "answer": "A"}, {"input": "I", "output": "O"}, {"prompt": "P", "completion": "C"}]
    assert sft_format(rows, F, None) == "instruct"
    assert sft_rows(rows, "instruct") == [
        {"prompt": "Q", "completion": "A"}, {"prompt": "I", "completion": "O"}, {"prompt": "P", "completion": "C"}]
    dialog = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert sft_format(dialog, F, None) == "dialog"
    with pytest.raises(DataError, match="row 0 fits no format.*accepted"):
        sft_format([{"text": "x"}], F, None)
    with pytest.raises(DataError, match="row 1 is dialog data but the dataset is instruct"):
        sft_format([rows[0], dialog[0]], F, None)
    with pytest.raises(DataError, match="no assistant message"):
        sft_format([{"messages": [{"role": "user", "content": "hi"}]}], F, None)


def load(dataset_id, roots, max_rows=100):
    return asyncio.run(load_rows(dataset_id, field=F, datasetio=None, roots=roots, max_rows=max_rows))


def test_local_files_in_every_layout(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"data": [STANDARD]}))
    (tmp_path / "b.json").write_text(json.dumps([STANDARD, STANDARD]))
    (tmp_path / "c.jsonl").write_text(json.dumps(STANDARD) + "\n\n" + json.dumps(STANDARD) + "\n")
    assert len(load(str(tmp_path / "a.json"), [str(tmp_path)])) == 1
    assert len(load(str(tmp_path / "b.json"), [str(tmp_path)])) == 2
    assert len(load(f"file://{tmp_path / 'c.jsonl'}", [str(tmp_path)])) == 2


def test_local_file_problems(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"data": []}))
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "many.jsonl").write_text((json.dumps(STANDARD) + "\n") * 5)
    (tmp_path / "scalar.jsonl").write_text("3\n")
    roots = [str(tmp_path)]
    with pytest.raises(DataError, match="has no rows"):
        load(str(tmp_path / "empty.json"), roots)
    with pytest.raises(DataError, match="not valid JSON"):
        load(str(tmp_path / "bad.json"), roots)
    with pytest.raises(DataError, match="more than 4 rows"):
        load(str(tmp_path / "many.jsonl"), roots, max_rows=4)
    with pytest.raises(DataError, match="row 0 is a int"):
        load(str(tmp_path / "scalar.jsonl"), roots)
    with pytest.raises(DataError, match="no such file"):
        load(str(tmp_path / "missing.json"), roots)
    with pytest.raises(DataError, match="no datasetio provider"):
        load("registered-id", roots)


def test_paths_must_stay_inside_roots_even_through_symlinks(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps([STANDARD]))
    (root / "link.json").symlink_to(outside / "secret.json")
    with pytest.raises(PermissionError, match="outside the allowed roots"):
        resolve_inside(str(root / "link.json"), [str(root)], F)
    with pytest.raises(PermissionError):
        resolve_inside(str(root / ".." / "outside" / "secret.json"), [str(root)], F)
    assert resolve_inside(str(root / "x.json"), [str(root)], F) == (root / "x.json").resolve()
