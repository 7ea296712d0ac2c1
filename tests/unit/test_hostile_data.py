"""Hostile and broken data caught before a job is accepted: each a DataError/PermissionError
(400/403) naming the field and row, or a 507 for a full disk; and the readers stop early."""

import asyncio
import errno
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from llama_stack_provider_trl.data import (
    DataError,
    StorageFullError,
    load_rows,
    local_uri_path,
    preference_format,
    read_local_rows,
    sft_format,
    write_jsonl,
)
from llama_stack_provider_trl.lora_targets import SafetensorsError, linear_modules

F = "training_config.data_config.dataset_id"
ROW = {"prompt": "Q?", "chosen": "good", "rejected": "bad"}


def test_jsonl_reader_stops_at_the_row_limit_without_reading_the_rest(tmp_path):
    # lines after row max_rows + 1 are not JSON: reading them would give "not valid JSON" instead
    path = tmp_path / "big.jsonl"
    path.write_text((json.dumps(ROW) + "\n") * 11 + "{broken\n" * 1000)
    with pytest.raises(DataError, match="more than 10 rows"):
        read_local_rows(path, F, max_rows=10)
    assert len(read_local_rows(_write(tmp_path, "ok.jsonl", 10), F, max_rows=10)) == 10


def _write(tmp_path: Path, name: str, n: int) -> Path:
    path = tmp_path / name
    path.write_text((json.dumps(ROW) + "\n") * n)
    return path


@pytest.mark.parametrize("layout", ["list", "data"])
def test_json_reader_stops_at_the_row_limit_without_decoding_the_rest(tmp_path, layout):
    body = ", ".join([json.dumps(ROW)] * 11) + ", {broken"
    text = f"[{body}]" if layout == "list" else f'{{"data": [{body}]}}'
    (tmp_path / "big.json").write_text(text)
    with pytest.raises(DataError, match="more than 10 rows"):
        read_local_rows(tmp_path / "big.json", F, max_rows=10)
    # the same layouts within the limit read whole, an empty list included
    ok = ", ".join([json.dumps(ROW)] * 3)
    (tmp_path / "ok.json").write_text(f"[{ok}]" if layout == "list" else f'{{"data": [{ok}]}}')
    assert read_local_rows(tmp_path / "ok.json", F, max_rows=10) == [ROW] * 3
    (tmp_path / "none.json").write_text("[ ]" if layout == "list" else '{"data": []}')
    assert read_local_rows(tmp_path / "none.json", F, max_rows=10) == []


def test_json_with_other_keys_still_parses(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"data": [ROW], "version": 2}))
    assert read_local_rows(tmp_path / "x.json", F) == [ROW]


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_data_nested_100000_levels_is_a_400(tmp_path, name):
    (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=f"{F}: deep.*nested too deeply"):
        read_local_rows(tmp_path / name, F)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    os.mkfifo(tmp_path / "data.jsonl")
    done = []
    worker = threading.Thread(target=lambda: done.append(_raises(read_local_rows, tmp_path / "data.jsonl", F)),
                              daemon=True)
    worker.start()
    worker.join(10)  # opening a FIFO for reading blocks until a writer comes: it would still be waiting
    assert done and isinstance(done[0], DataError) and "FIFO" in str(done[0])


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - handed to the test to inspect
        return exc
    return None


def test_lone_surrogates_are_named_by_row_and_field():
    with pytest.raises(DataError, match=r"row 1: field 'chosen' has an unpaired surrogate \(\\ud800\)"):
        preference_format([ROW, {**ROW, "chosen": "ok \ud800"}], F)
    dialog = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\udfff"}]}
    with pytest.raises(DataError, match="row 0: field 'messages' has an unpaired surrogate"):
        sft_format([dialog], F, None)
    with pytest.raises(DataError, match="row 0: field 'completion' has an unpaired surrogate"):
        sft_format([{"prompt": "p", "completion": "c\ud83d"}], F, None)
    assert preference_format([{**ROW, "chosen": "ok \U0001f600"}], F) == "standard"  # a paired one is fine


def test_deeply_nested_extra_keys_in_messages_are_a_400():
    deep: list = []
    for _ in range(40):
        deep = [deep]
    dialog = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "x": deep}]}
    with pytest.raises(DataError, match="row 0: field 'messages' is nested more than"):
        sft_format([dialog], F, None)


def conv(*contents):
    roles = ["user", "assistant"] * 4
    return [{"role": roles[i], "content": c} for i, c in enumerate(contents)]


def test_conversational_rows_without_a_shared_prompt_are_a_400():
    ok = {"chosen": conv("Q?", "good"), "rejected": conv("Q?", "bad")}
    assert preference_format([ok], F) == "conversational"
    with pytest.raises(DataError, match="row 1: has no field 'prompt'.*do not begin with the same message"):
        preference_format([ok, {"chosen": conv("Q?", "good"), "rejected": conv("Other?", "bad")}], F)
    with pytest.raises(DataError, match="row 0: has no field 'prompt'.*no answer"):
        preference_format([{"chosen": conv("Q?", "good"), "rejected": conv("Q?", "good")}], F)


def test_a_full_disk_while_snapshotting_is_a_507(tmp_path, monkeypatch):
    from llama_stack.core.exceptions.translation import translate_exception

    real_open = Path.open

    def full_disk_open(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            def write(_text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            handle.write = write
        return handle

    monkeypatch.setattr(Path, "open", full_disk_open)
    with pytest.raises(StorageFullError) as caught:
        write_jsonl([ROW], tmp_path / "job" / "data" / "train.jsonl")
    http = translate_exception(caught.value)
    assert http.status_code == 507
    assert "No space left on device" in http.detail and "data snapshot" in http.detail
    assert list((tmp_path / "job" / "data").iterdir()) == []  # no half-written file is left behind


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"abcd"), "4 bytes, too short"),
    (lambda p: p.write_bytes((2**62).to_bytes(8, "little") + b"{}"), "declares a 4611686018427387904-byte header"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}"), "no valid JSON header"),
    (lambda p: p.write_bytes((2).to_bytes(8, "little") + b"[]"), "no valid JSON header"),
])
def test_broken_safetensors_headers_are_named(tmp_path, make, message):
    make(tmp_path / "model.safetensors")
    result = []
    worker = threading.Thread(target=lambda: result.append(_raises(linear_modules, tmp_path)), daemon=True)
    worker.start()
    worker.join(10)  # a FIFO opened for reading would block here
    assert result and isinstance(result[0], SafetensorsError), result
    assert "model.safetensors" in str(result[0]) and message in str(result[0])


@pytest.mark.parametrize("uri, expected", [
    ("/tmp/x.csv", "/tmp/x.csv"), ("rel/x.csv", "rel/x.csv"), ("file:///tmp/x.csv", "/tmp/x.csv"),
    ("file://localhost/tmp/a%20b.csv", "/tmp/a b.csv"), ("file:/tmp/x.csv", "/tmp/x.csv"),
    ("data:text/csv;base64,YQ==", None), ("https://example.com/x.csv", None), ("huggingface://x", None),
])
def test_which_source_uris_name_local_files(uri, expected):
    assert local_uri_path(uri) == expected


class FakeDatasets:
    def __init__(self, source):
        self.source = source

    async def get_dataset(self, request):
        return SimpleNamespace(source=self.source)


class FakeDatasetIO:
    """Pages over n rows like localfs does when given start_index and limit."""

    def __init__(self, n):
        self.n, self.calls = n, []

    async def iterrows(self, request):
        self.calls.append((request.start_index, request.limit))
        end = min(self.n, request.start_index + request.limit)
        return SimpleNamespace(data=[dict(ROW) for _ in range(request.start_index, end)], has_more=end < self.n)


def load_registered(source, tmp_path, datasetio=None, max_rows=100):
    return asyncio.run(load_rows("registered", field=F, datasetio=datasetio or FakeDatasetIO(3),
                                 datasets=FakeDatasets(source), roots=[str(tmp_path / "root")], max_rows=max_rows))


@pytest.mark.parametrize("uri", ["{outside}/secret.csv", "file://{outside}/secret.csv", "{root}/link.csv"])
def test_registered_local_sources_outside_the_roots_are_a_403_before_any_read(tmp_path, uri):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.csv").write_text("secret_column,other_secret\n1,2\n")
    (tmp_path / "root" / "link.csv").symlink_to(tmp_path / "outside" / "secret.csv")
    datasetio = FakeDatasetIO(3)
    source = SimpleNamespace(type="uri", uri=uri.format(outside=tmp_path / "outside", root=tmp_path / "root"))
    with pytest.raises(PermissionError, match="outside the allowed roots") as caught:
        load_registered(source, tmp_path, datasetio)
    assert "secret_column" not in str(caught.value)
    assert datasetio.calls == []


def test_registered_sources_read_like_localfs_with_the_row_limit(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "rows.csv").write_text("prompt,chosen,rejected\n" + "Q?,good,bad\n" * 5)
    csv = SimpleNamespace(type="uri", uri=str(root / "rows.csv"))
    assert load_registered(csv, tmp_path) == [ROW] * 5
    with pytest.raises(DataError, match="more than 4 rows"):
        load_registered(csv, tmp_path, max_rows=4)
    inline = SimpleNamespace(type="rows", rows=[ROW] * 3)
    assert load_registered(inline, tmp_path) == [ROW] * 3
    data_uri = SimpleNamespace(type="uri", uri="data:text/csv;base64,cHJvbXB0LGNob3NlbixyZWplY3RlZApRPyxnb29kLGJhZAo=")
    assert load_registered(data_uri, tmp_path) == [ROW]


def test_other_registered_sources_are_read_in_pages_up_to_one_past_the_limit(tmp_path, monkeypatch):
    import llama_stack_provider_trl.data as data

    monkeypatch.setattr(data, "REGISTERED_PAGE_ROWS", 4)
    remote = SimpleNamespace(type="uri", uri="https://example.com/rows.csv")
    datasetio = FakeDatasetIO(1000)
    with pytest.raises(DataError, match="more than 10 rows"):
        load_registered(remote, tmp_path, datasetio, max_rows=10)
    assert datasetio.calls == [(0, 4), (4, 4), (8, 3)]  # never past row 11
    datasetio = FakeDatasetIO(6)
    assert len(load_registered(remote, tmp_path, datasetio, max_rows=10)) == 6
