"""Run fingerprints are forward compatible (issue 21): a run recorded before an option existed is the same run
when the option holds its default now, in the run guard, the stores' partial files and compare's caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fault_corpus
from onsft import cli
from onsft.errors import UserError
from onsft.pipeline.compare.sweep import _cached, measured
from onsft.runtime.fingerprints import changed_keys, config_defaults, same_settings
from onsft.runtime.records import ResumableJsonl
from onsft.runtime.runs import RunGuard
from tiny import tiny_tokenizer


def test_a_key_only_one_record_has_is_unchanged_when_it_holds_its_default():
    defaults = {"train": {"lr": 1e-5, "new": False, "group": {"a": 1, "b": [1, 2]}}}
    old = {"train": {"lr": 1e-5}, "data": "x"}
    assert same_settings(old, {"train": {"lr": 1e-5, "new": False}, "data": "x"}, defaults)
    assert changed_keys(old, {"train": {"lr": 1e-5, "new": True}, "data": "x"}, defaults=defaults) == ["train.new"]
    # A whole new group matches when each of its keys holds its default, (1, 2) and [1, 2] alike.
    assert same_settings(old, {"train": {"lr": 1e-5, "group": {"a": 1, "b": (1, 2)}}, "data": "x"}, defaults)
    assert changed_keys(old, {"train": {"lr": 1e-5, "group": {"a": 2}}, "data": "x"}, defaults=defaults) == [
        "train.group"
    ]
    # A key without a known default, or a value that differs where both records have it, is a change.
    assert changed_keys(old, {"train": {"lr": 1e-5}, "data": "x", "seed": 0}, defaults=defaults) == ["seed"]
    assert changed_keys(old, {"train": {"lr": 2e-5}, "data": "x"}, defaults=defaults) == ["train.lr"]
    assert changed_keys({"a": 1}, {"a": 1, "b": 0}) == ["b"]  # no defaults: exact, as before
    # Lists of records (compare's data steps) item by item.
    assert same_settings([{"a": 1}, "id"], [{"a": 1, "n": 3}, "id"], [{"n": 3}, None])
    assert not same_settings([{"a": 1}, "id"], [{"a": 1, "n": 4}, "id"], [{"n": 3}, None])


def test_config_defaults_reads_every_field_default_of_a_settings_dataclass():
    from onsft.formulas.weighting import LossConfig

    defaults = config_defaults(LossConfig(loss="idft", eaft_top_k=7))  # the class's defaults, not the instance's
    assert defaults["loss"] == LossConfig().loss and defaults["eaft_top_k"] == LossConfig().eaft_top_k


def guard(folder: Path, settings: dict, defaults: dict | None) -> RunGuard:
    return RunGuard(folder / "run.json", "t", settings, ["out.json"], folder / "out.json", defaults=defaults)


def test_the_guard_reuses_a_finished_run_recorded_before_an_option_existed(tmp_path):
    (tmp_path / "out.json").write_text('{"done": 1}')
    (tmp_path / "run.json").write_text(json.dumps({"command": "t", "settings": {"a": 1}, "finished": True}))
    defaults = {"new": "x"}
    assert guard(tmp_path, {"a": 1, "new": "x"}, defaults).claim() == {"done": 1}
    with pytest.raises(UserError, match=r"changed: new\)"):
        guard(tmp_path, {"a": 1, "new": "y"}, defaults).claim()
    with pytest.raises(UserError, match=r"changed: new\)"):
        guard(tmp_path, {"a": 1, "new": "x"}, None).claim()  # without defaults: exact, as before


def test_a_partial_file_written_before_an_option_existed_resumes(tmp_path):
    path = tmp_path / "rows.jsonl"
    store = ResumableJsonl(path, {"a": 1})
    store.append({"_index": 0, "v": 1})
    store.close()
    assert list(ResumableJsonl(path, {"a": 1, "new": 0}, defaults={"new": 0}).done) == [0]
    with pytest.raises(UserError, match="different settings"):
        ResumableJsonl(path, {"a": 1, "new": 5}, defaults={"new": 0})


def test_compare_caches_match_records_written_before_an_option_existed(tmp_path):
    point = tmp_path / "step-2.json"
    point.write_text(json.dumps({"step": 2, "settings": {"model": {"model": "m"}}}))
    defaults = {"model": {"dtype": "auto"}}
    assert _cached(point, {"model": {"model": "m", "dtype": "auto"}}, defaults)["step"] == 2
    assert _cached(point, {"model": {"model": "m", "dtype": "float16"}}, defaults) is None
    costs = tmp_path / "cost.json"
    costs.write_text(json.dumps({"train": {"wall_seconds": 9.0, "cpu_seconds": 8.0, "settings": {"a": 1}}}))
    _, cost = measured(costs, "train", {"a": 1, "new": 0}, dict, {"new": 0})
    assert cost == {"wall_seconds": 9.0, "cpu_seconds": 8.0}  # the recorded cost of the first run is kept


def test_a_resumed_trainings_earlier_seconds_count_in_its_measured_cost(tmp_path):
    """Issue 21: a run resumed after a kill counted only its resumed part in compare's compute columns."""
    resumed = {"cost_before_this_run": {"wall_seconds": 100.0, "cpu_seconds": 150.0}}
    _, cost = measured(tmp_path / "cost.json", "train", {"a": 1}, lambda: resumed)
    assert 100.0 <= cost["wall_seconds"] < 101.0 and 150.0 <= cost["cpu_seconds"] < 151.0
    assert json.loads((tmp_path / "cost.json").read_text())["train"]["wall_seconds"] == cost["wall_seconds"]


# ---------------------------------------------------------------------------------- end to end: onsft train


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    return fault_corpus.save(fault_corpus.talker(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("m") / "tiny")


def train_argv(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", model, "--data", str(data), "--output_dir", str(out), "--max_steps", "2",
        "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64", "--use_cpu", "true",
        "--progress", "false", *extra,
    ]  # fmt: skip


def test_a_finished_train_run_of_the_previous_version_is_reused_not_retrained(model, tmp_path, capfd):
    torch.set_num_threads(1)
    data = tmp_path / "d.jsonl"
    data.write_text(fault_corpus.jsonl(fault_corpus.good_rows(4)))
    out = tmp_path / "run"
    assert cli.main(train_argv(model, data, out)) == 0
    weights = (out / "model" / "model.safetensors").stat().st_mtime_ns
    # The previous version knew neither --eaft_alpha nor --replay_share: its record lacks them.
    record = json.loads((out / "run.json").read_text())
    del record["settings"]["loss"]["eaft_alpha"], record["settings"]["inputs"]["replay_share"]
    (out / "run.json").write_text(json.dumps(record))
    capfd.readouterr()
    assert cli.main(train_argv(model, data, out)) == 0
    assert "already holds this finished run" in capfd.readouterr().err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == weights  # not retrained
    # The same option at another value than its default is another run: refused, nothing touched.
    assert cli.main(train_argv(model, data, out, "--eaft_alpha", "0.5")) == 2
    err = capfd.readouterr().err
    assert "different settings" in err and "loss.eaft_alpha" in err and "Traceback" not in err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == weights
