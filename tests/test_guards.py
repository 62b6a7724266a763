"""Issue 15 outside the fault corpus: a real concurrent writer, inputs the run guard protects, valid JSON
always, what the terminal shows (quiet libraries, results on stdout, training progress on stderr), and the
checks that need no model (raw text budget, unknown tokens, flags given at their default value)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_corpus
from onsft import cli
from onsft.commands import train as train_command
from onsft.data.chat import char_budget, check_known_text, encode_examples, longest_token
from onsft.data.rows import parse_example
from onsft.errors import UserError
from onsft.formulas.weighting import LossConfig
from onsft.runtime.given import given_values
from onsft.runtime.records import ResumableJsonl, dumps, write_json_atomic, write_jsonl_atomic
from onsft.runtime.runs import RunGuard
from onsft.runtime.settings import given_options
from tiny import tiny_tokenizer


def strict(text: str):
    """json.loads that refuses NaN / Infinity, as every JSON reader but Python's does."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    return fault_corpus.save(fault_corpus.talker(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): outputs are then bitwise comparable
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- a concurrent writer


def command(name: str, model: str, data: Path, out: Path) -> list[str]:
    if name == "eval":
        return [
            "eval", "--model", model, "--data", str(data), "--out", str(out), "--batch_size", "2", "--samples", "2",
            "--max_new_tokens", "16", "--verifier", "exact", "--plot", "false",
        ]  # fmt: skip
    return [
        "train", "--model", model, "--data", str(data), "--output_dir", str(out), "--max_steps", "40",
        "--save_steps", "20", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--max_length", "64",
        "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "3", "--logging_steps", "4",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eval", "train"])
def test_a_second_writer_is_refused_while_the_first_finishes_intact(name, model, tmp_path, capfd):
    importlib.import_module(f"onsft.commands.{name}")  # the second writer must not spend its time importing
    data = tmp_path / "data.jsonl"
    data.write_text(fault_corpus.jsonl(fault_corpus.good_rows(24)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen(
        [sys.executable, "-m", "onsft.cli", *command(name, model, data, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lock = out / ".run.json.lock"
    deadline = time.time() + 120
    while not lock.is_symlink() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert lock.is_symlink(), first.communicate()[1].decode()[-2000:]
    capfd.readouterr()
    assert cli.main(command(name, model, data, out)) == 2  # the second writer, while the first runs
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another onsft process (pid {first.pid} " in err[0] and "Fix:" in err[0], err
    assert first.poll() is None, "the first run had already finished: the test proves nothing"
    assert os.readlink(lock).endswith(f":{first.pid}")  # its lock is still its own
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr.decode()[-3000:]
    assert json.loads((out / "run.json").read_text())["finished"] and not lock.is_symlink()
    # Intact: the same bytes as an uninterrupted run alone.
    reference = tmp_path / "reference"
    assert cli.main(command(name, model, data, reference)) == 0
    output = "generations.jsonl" if name == "eval" else "model/model.safetensors"
    assert (out / output).read_bytes() == (reference / output).read_bytes()


# ---------------------------------------------------------------------------------- inputs are never outputs


def make_guard(folder: Path, inputs: dict, files=()) -> RunGuard:
    return RunGuard(folder / "run.json", "t", {"k": 1}, ["out.jsonl", "parts*", "model"], folder / "s.json",
                    inputs=inputs, files=files)  # fmt: skip


def test_the_guard_refuses_inputs_that_an_output_would_replace(tmp_path):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "out.jsonl").write_text("data\n")
    (out / "model" / "config.json").write_text("{}")
    elsewhere = tmp_path / "data.jsonl"
    elsewhere.write_text("data\n")
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    refused = [
        {"--data": str(out / "out.jsonl")},  # named like an output of the folder
        {"--model": str(out / "model")},  # an output folder
        {"--data": str(out / "model" / "config.json")},  # inside an output folder
        {"--data": str(tmp_path / "link" / "out.jsonl")},  # reached through a link
        {"--data": str(out / "." / ".." / "out" / "out.jsonl")},  # another spelling
    ]
    for inputs in refused:
        with pytest.raises(UserError, match="also an output of this run") as error:
            make_guard(out, inputs).claim()
        assert list(inputs)[0] in str(error.value)
    with pytest.raises(UserError, match="given to --data"):
        make_guard(tmp_path / "other", {"--data": str(elsewhere)}, files=[elsewhere]).claim()
    assert not (out / "run.json").exists() and not (tmp_path / "other").exists()  # refused before any write
    # Not outputs: a file of another name in the folder, a same-named file elsewhere, a Hub name, nothing.
    (out / "notes.jsonl").write_text("x\n")
    fine = make_guard(out, {"--data": str(out / "notes.jsonl"), "--b": str(elsewhere), "--c": "org/name", "--d": None})
    # (The outputs already there were written by no recorded run: refused as not onsft's, not as inputs.)
    with pytest.raises(UserError, match="no recorded onsft run wrote"):
        fine.claim()
    fine = make_guard(out, {"--data": str(out / "notes.jsonl"), "--b": str(elsewhere), "--c": "org/name", "--d": None})
    fine.untracked = []
    assert fine.claim() is None
    fine.release()


# ---------------------------------------------------------------------------------- valid JSON, always


def test_every_json_writer_writes_valid_json(tmp_path):
    import numpy as np

    value = {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": torch.tensor([1.0, -math.inf])}
    write_json_atomic(tmp_path / "x.json", value)
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": None, "d": [1.0, None]}
    write_jsonl_atomic(tmp_path / "x.jsonl", [value, {"e": 2}])
    assert [strict(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()][1] == {"e": 2}
    store = ResumableJsonl(tmp_path / "r.jsonl", fingerprint={"t": 1})
    store.append({"_index": 0, "score": float("nan")})
    store.finalize(order=[0])
    assert strict((tmp_path / "r.jsonl").read_text()) == {"score": None}
    assert strict(dumps({"loss": float("-inf")})) == {"loss": None}


# ---------------------------------------------------------------------------------- the terminal


def train_argv(model, data, out, *extra):
    return [
        "train", "--model", model, "--data", str(data), "--output_dir", str(out), "--max_steps", "4",
        "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
        "--use_cpu", "true", *extra,
    ]  # fmt: skip


def test_train_shows_progress_and_step_lines_on_stderr_and_only_its_result_on_stdout(model, tmp_path, capfd):
    data = tmp_path / "d.jsonl"
    data.write_text(fault_corpus.jsonl(fault_corpus.good_rows(4)))
    assert cli.main(train_argv(model, data, tmp_path / "run")) == 0
    captured = capfd.readouterr()
    assert [strict(line) for line in captured.out.splitlines()] == [
        {"global_step": 4, "train_loss": pytest.approx(json.loads(captured.out)["train_loss"])}
    ]
    err = captured.err.replace("\r", "\n")
    steps = [line.split()[1] for line in err.splitlines() if line.startswith("step ")]
    assert steps == ["1/4", "2/4", "3/4", "4/4"] and "loss" in err
    assert "train: 100%" in err and "4/4" in err  # the bar: step count, rate, ETA
    for noise in ("Loading weights", "Writing model shards", "{'loss'", "Warning"):
        assert noise not in captured.err + captured.out, noise
    # --verbose brings the libraries' bars back.
    assert cli.main(train_argv(model, data, tmp_path / "loud", "--verbose")) == 0
    assert "Loading weights" in capfd.readouterr().err
    # --progress false hides the bar, not the step lines.
    assert cli.main(train_argv(model, data, tmp_path / "quiet", "--progress", "false")) == 0
    err = capfd.readouterr().err
    assert "train:" not in err and "step 4/4" in err


def test_verbose_is_read_from_the_command_line_or_its_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("verbose: true\n")
    assert cli._verbose(["--verbose"]) and cli._verbose(["--verbose", "true"]) and cli._verbose(["--verbose=yes"])
    assert cli._verbose(["--config", str(config)]) and not cli._verbose(["--config", str(config), "--verbose", "no"])
    assert not cli._verbose([]) and not cli._verbose(["--config", str(tmp_path / "missing.yaml")])


def test_options_given_at_their_default_value_are_still_given(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("idft_beta: 1.0\nlearning_rate: 0.1\n")
    assert given_options(["--loss", "idft", "--x", "1"], LossConfig) == ["loss"]
    assert given_options(["--config", str(config), "--loss=nll"], LossConfig) == ["loss", "idft_beta"]


def test_one_reader_of_given_options_serves_cli_train_and_compare(tmp_path):
    """onsft.runtime.given.given_values reads --verbose (cli), --method (train), the model's options (compare)
    and LossConfig's (train): flags in any form, the --config file's keys, a flag over the file."""
    config = tmp_path / "c.yaml"
    config.write_text("method: dpo\nverbose: true\n")
    both = given_values(["--method", "simpo", "--config", str(config)], ["method", "verbose"])
    assert both == {"method": "simpo", "verbose": True}
    assert given_values(["--config", str(config)], ["method"], config_file=False) == {}
    flags = ["--config", "x.yaml", "--model=organism", "--offline", "--seeds", "0", "1"]
    assert given_values(flags, ["model", "offline", "dtype"], config_file=False) == {
        "model": "organism",
        "offline": True,
    }
    assert train_command.method_of(["--config", str(config)]) == "dpo" and train_command.method_of([]) == "sft"


# ---------------------------------------------------------------------------------- checks before tokenising


def test_the_character_budget_refuses_rows_that_cannot_fit_without_tokenising_them(monkeypatch):
    tokenizer = tiny_tokenizer()
    assert longest_token(tokenizer) == len("<assistant>")
    budget = char_budget(tokenizer, 64)
    rows = [{"prompt": "Copy a.", "completion": "a"}, {"prompt": "Copy b.", "completion": "b" * (budget + 1)}]
    examples = [parse_example(r, i, i + 1, "d.jsonl", True) for i, r in enumerate(rows)]
    calls = []
    original = type(tokenizer).apply_chat_template

    def counting(self, messages, **kw):
        calls.append(sum(len(m["content"]) for m in messages))
        return original(self, messages, **kw)

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counting)
    with pytest.raises(UserError, match=r"d.jsonl:2: 1 of 2 rows are longer than max_length=64 \(first: [\d,]+ char"):
        encode_examples(tokenizer, examples, 64, "reject", "d.jsonl")
    assert max(calls) < budget  # the long row was never rendered
    encoded, stats = encode_examples(tokenizer, examples, 64, "drop", "d.jsonl")
    assert len(encoded) == 1 and stats["dropped"] == 1
    calls.clear()
    encoded, stats = encode_examples(tokenizer, examples, 64, "truncate", "d.jsonl")
    assert stats["truncated"] == 1 and len(encoded[1].input_ids) == 64 and max(calls) <= budget
    # A response cut before tokenising gives the same tokens as the whole response cut after.
    whole = encode_examples(tokenizer, examples, 10**9, "truncate", "d.jsonl")[0][1]
    assert encoded[1].input_ids == whole.input_ids[:64] and len(whole.input_ids) > 64


def test_rows_of_unknown_tokens_are_counted(capsys):
    tokenizer = tiny_tokenizer()  # printable ASCII only, no unknown token: other characters vanish
    assert check_known_text(tokenizer, ["abc", "漢字", "a漢"], [1, 2, 3], "d.jsonl", "response") == 1
    assert "d.jsonl: 1 of 3 responses map to nothing but unknown tokens" in capsys.readouterr().err
    with pytest.raises(UserError, match="every response"):
        check_known_text(tokenizer, ["漢字", "кот"], [1, 2], "d.jsonl", "response")


def test_ctrl_c_prints_its_message_once_on_its_own_line_after_the_bars(monkeypatch, capfd):
    """Issue 21: a bar left open by Ctrl-C ran into the message and redrew itself after it."""
    from onsft.commands import eval as eval_command
    from onsft.runtime.progress import progress

    def interrupted(argv):
        bar = progress(10, "eval", unit="prompt")
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_command, "main", interrupted)
    assert cli.main(["eval"]) == 130
    import gc

    gc.collect()  # a bar still open would draw itself again when collected
    lines = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "onsft: interrupted; rerun the same command to resume."
    assert sum("interrupted" in line for line in lines) == 1 and "3/10" in lines[-2]
