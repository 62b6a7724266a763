"""What the command line says (issue 21): the help of `--no_*` switches and of the losses, a mistyped model
alias, the offline message, negative numbers as values, and a reader that closes stdout early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onsft import cli
from onsft.errors import UserError
from onsft.formulas.weighting import LOSS_TYPES
from onsft.runtime import hub, models

ROOT = Path(__file__).resolve().parents[1]


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_no_switches_say_what_they_turn_off(capsys):
    text = help_text(["eval"], capsys)
    assert "--no_progress, --no-progress Do not: show progress bars with rate and ETA (on stderr). (same as " \
        "--progress false)" in text  # fmt: skip
    negation = text.split("--no_progress, --no-progress ", 1)[1].split(" --", 1)[0]
    assert "default" not in negation  # a switch has no default of its own
    assert "Do not: resume from the last checkpoint" in help_text(["train"], capsys)


def test_every_loss_is_listed_in_the_help(capsys):
    assert cli.main(["--help"]) == 0
    overview = capsys.readouterr().out
    train = help_text(["train"], capsys)
    for loss in LOSS_TYPES:
        assert loss in overview.split("train", 1)[1].splitlines()[0], loss
        assert f"|{loss}" in train or f"{loss}|" in train, loss


@pytest.mark.parametrize("typo,alias", [("organsim", "organism"), ("smolm2-135m", "smollm2-135m")])
def test_a_mistyped_alias_is_named_without_trying_the_hub(monkeypatch, typo, alias):
    monkeypatch.setattr(hub, "snapshot", lambda *a, **k: pytest.fail("tried the Hub"))
    with pytest.raises(UserError, match=f"did you mean {alias}\\?") as error:
        models.resolve_model_path(typo)
    assert "network" not in str(error.value)


def test_the_offline_message_closes_its_backticks(monkeypatch):
    def not_cached(*args, **kwargs):
        raise FileNotFoundError

    monkeypatch.setattr(hub, "_download", not_cached)
    with pytest.raises(UserError) as error:
        models.resolve_model_path("someone/not-cached", offline=True)
    message = str(error.value)
    assert "`hf download someone/not-cached`" in message and message.count("`") % 2 == 0


def test_a_list_starting_with_a_negative_number_is_a_value_not_a_flag(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Copy ab.", "completion": "ab", "answer": "ab", "reference": "ab"}) + "\n")
    out = tmp_path / "out"
    for given in (["--beta_ladder", "-1,2"], ["--beta_ladder=-1,2"]):
        assert cli.main(["rewrite", "--model", "organism", "--data", str(data), "--out", str(out), *given]) == 2
        err = capsys.readouterr().err
        assert "`beta_ladder` entry `-1` is not a finite number >= 0" in err and "expected one argument" not in err
    assert not out.exists()


def test_a_reader_that_closes_stdout_early_ends_the_command_quietly():
    """`onsft data gym --list_tasks | head -1`: here the reader is gone before the first write, every time."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "onsft.cli", "data", "gym", "--list_tasks"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr
