"""The writers every file of onsft goes through (onsft.runtime.records): a temporary file or folder renamed into
place, nothing left behind when a write fails, the old file kept until the new one is complete."""

import json

import pytest

from onsft.errors import UserError
from onsft.runtime.records import (
    ResumableJsonl,
    atomic_directory,
    atomic_open,
    open_for_append,
    partial_rows,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_whole_files_are_renamed_into_place_and_leave_no_temporary_file(tmp_path):
    write_text_atomic(tmp_path / "sub" / "a.md", "old")
    write_text_atomic(tmp_path / "sub" / "a.md", "héllo\n")
    write_bytes_atomic(tmp_path / "sub" / "b.png", b"\x89PNG")
    write_json_atomic(tmp_path / "sub" / "c.json", {"x": float("nan"), "p": tmp_path})
    write_jsonl_atomic(tmp_path / "sub" / "d.jsonl", [{"a": 1}, {"b": "é"}])
    folder = tmp_path / "sub"
    assert (folder / "a.md").read_text(encoding="utf-8") == "héllo\n"
    assert (folder / "b.png").read_bytes() == b"\x89PNG"
    assert json.loads((folder / "c.json").read_text()) == {"x": None, "p": str(tmp_path)}
    assert (folder / "d.jsonl").read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["a.md", "b.png", "c.json", "d.jsonl"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "table.md"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write("half")
        assert (tmp_path / ".table.md.tmp").is_file()
        raise RuntimeError("killed mid-write")
    with pytest.raises(UserError, match="cannot write output") as error, atomic_open(path, "wb") as handle:
        raise OSError(28, "No space left on device")
    assert str(path) in str(error.value)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]
    with pytest.raises(ValueError, match="whole file"), atomic_open(path, "a"):
        pass


def test_append_only_records_append(tmp_path):
    path = tmp_path / "rows.jsonl.partial"
    for text in ("1\n", "2\n"):
        with open_for_append(path) as handle:
            handle.write(text)
    assert path.read_text() == "1\n2\n"


def test_atomic_directory_replaces_or_keeps_an_existing_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        assert tmp.name == ".model.building"
        (tmp / "weights").write_text("1")
    with atomic_directory(target, unique=True) as tmp:
        assert tmp.name.startswith(".model.") and tmp.name.endswith(".building") and tmp.name != ".model.building"
        (tmp / "weights").write_text("2")
    assert (target / "weights").read_text() == "2"
    with atomic_directory(target, unique=True, keep_existing=True) as tmp:  # another process finished first
        (tmp / "weights").write_text("3")
    assert (target / "weights").read_text() == "2"
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "other", unique=True) as tmp:
        raise RuntimeError("failed while saving")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_resumed_store_knows_what_its_earlier_runs_cost_and_its_final_file_holds_rows_only(tmp_path):
    """Issue 21: a resumed data step counted only its resumed part. Each write records the seconds so far."""
    path = tmp_path / "rows.jsonl"
    first = ResumableJsonl(path, {"a": 1})
    assert first.seconds_before == {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    sum(range(200_000))  # some CPU time
    first.append_many([{"_index": 0, "x": "a"}, {"_index": 1, "x": "b"}])
    first.close()  # a kill after the first chunk
    lines = (tmp_path / "rows.jsonl.partial").read_text().splitlines()
    saved = json.loads(lines[-1])["_clock"]
    assert saved["wall_seconds"] > 0 and saved["cpu_seconds"] > 0
    assert partial_rows(lines[1:]) == [{"_index": 0, "x": "a"}, {"_index": 1, "x": "b"}]
    again = ResumableJsonl(path, {"a": 1})
    assert again.seconds_before == saved and set(again.done) == {0, 1}
    again.append({"_index": 2, "x": "c"})
    assert again.elapsed()["wall_seconds"] >= saved["wall_seconds"]
    assert again.finalize(range(3)) == [{"x": "a"}, {"x": "b"}, {"x": "c"}]
    assert path.read_text().count("_clock") == 0
