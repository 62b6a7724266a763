"""Rows that used to change silently (issue 21): a chat whose last question has no answer is refused with its
file and line; a JSON object repeating a key is read as json reads it, with one warning naming the line."""

from __future__ import annotations

import json

import pytest

from onsft import cli
from onsft.data.rows import load_examples
from onsft.errors import UserError

GOOD = {"messages": [{"role": "user", "content": "Copy ab."}, {"role": "assistant", "content": "\\boxed{ab}"}]}
TRAILING = {
    "messages": [
        {"role": "user", "content": "Copy ab."},
        {"role": "assistant", "content": "\\boxed{ab}"},
        {"role": "user", "content": "And cd?"},
    ],
    "answer": "cd",
}


def write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("require_response", [True, False])
def test_a_user_turn_after_the_last_assistant_turn_is_refused_with_its_line(tmp_path, require_response):
    data = write(tmp_path / "chat.jsonl", [GOOD, TRAILING])
    with pytest.raises(UserError) as caught:
        load_examples(data, require_response=require_response)
    error = caught.value
    assert (error.where, error.line) == (data, 2)
    assert "end with a user turn after the last assistant turn" in error.message
    assert "drop the trailing turn" in error.fix and "add the assistant's answer" in error.fix
    # A trailing system note after the answer is not a question: still read, the answer is the response.
    note = {"messages": [*GOOD["messages"], {"role": "system", "content": "graded"}]}
    assert load_examples(write(tmp_path / "note.jsonl", [note]))[0].response == "\\boxed{ab}"


def test_the_cli_refuses_it_in_one_line_and_writes_nothing(tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", [GOOD, TRAILING])
    before = (tmp_path / "chat.jsonl").read_bytes()
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", "organism", "--data", data, "--out", str(out), "--progress", "false"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"onsft: error: {data}:2: `messages` end with a user turn")
    assert "Fix: drop the trailing turn(s)" in err[0]
    assert not out.exists() and (tmp_path / "chat.jsonl").read_bytes() == before


def test_a_repeated_key_warns_once_naming_the_first_line_and_the_count(tmp_path, capsys):
    row = '{"prompt": "first", "prompt": "Copy %s.", "completion": "\\\\boxed{%s}", "answer": "%s"}'
    one = write(tmp_path / "one.jsonl", [GOOD, row % ("ab", "ab", "ab")])
    examples = load_examples(one)
    assert examples[1].prompt == [{"role": "user", "content": "Copy ab."}]  # json's rule: the last value wins
    assert capsys.readouterr().err.splitlines() == [
        f"onsft: warning: {one}:2: a JSON object repeats the key `prompt`; only its last value is read"
    ]
    nested = '{"prompt": [{"role": "user", "content": "x", "content": "Copy %s."}], "completion": "c"}'
    many = write(tmp_path / "many.jsonl", [GOOD, nested % "ab", GOOD, row % ("cd", "cd", "cd"), nested % "ef"])
    assert len(load_examples(many)) == 5
    assert capsys.readouterr().err.splitlines() == [
        f"onsft: warning: {many}:2: a JSON object repeats the key `content`; only its last value is read "
        "(3 lines have repeated keys; this is the first)"
    ]
    array = tmp_path / "rows.json"
    array.write_text('[{"prompt": "a", "completion": "b", "completion": "c"}]', encoding="utf-8")
    assert load_examples(str(array))[0].response == "c"
    assert capsys.readouterr().err.splitlines() == [
        f"onsft: warning: {array}: a JSON object repeats the key `completion`; only its last value is read"
    ]
    load_examples(write(tmp_path / "clean.jsonl", [GOOD, row.replace('"prompt": "first", ', "") % ("a", "a", "a")]))
    assert capsys.readouterr().err == ""
