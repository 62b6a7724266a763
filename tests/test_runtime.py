"""The runtime: every command asks the one device probe, Hub names are fetched once then read from the cache,
the run guard refuses mixed runs, settings are declared once and parsed strictly."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import onsft.runtime.device as device_module
from onsft.cli import main
from onsft.errors import UserError
from onsft.runtime import hub
from onsft.runtime.runs import RunGuard, changed_keys
from onsft.runtime.settings import configs_from_dict, parse_command
from tiny import tiny_tokenizer, untied_model

WORDS = ["ab", "cd", "ef", "gh"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    untied_model().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rows = [
        {
            "prompt": f"Copy {w}.",
            "completion": f"It is {w}. \\boxed{{{w}}}",
            "answer": w,
            "reference": f"It is {w}. \\boxed{{{w}}}",
        }
        for w in WORDS
    ]
    return root, write_jsonl(root / "data.jsonl", rows)


# ------------------------------------------------------------------------------------------ the device probe


class FakeAccelerator:
    """Stands in for a GPU: the probe answers a device of its own (`cpu:0`, which computes like the CPU), and
    every model moved there is counted, so a command that loads a model without asking the probe shows."""

    def __init__(self, monkeypatch):
        self.device = torch.device("cpu", 0)
        self.asked = 0
        self.moved = 0
        monkeypatch.setattr(device_module, "accelerator", self.probe)
        original = torch.nn.Module.to

        def to(module, *args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, torch.device) and target == self.device and target.index == 0:
                self.moved += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "to", to)

    def probe(self):
        self.asked += 1
        return self.device


@pytest.mark.parametrize("command", ["eval", "pairs", "rewrite", "audit"])
def test_commands_that_load_a_model_ask_the_device_probe(setup, tmp_path, monkeypatch, command):
    root, data = setup
    fake = FakeAccelerator(monkeypatch)
    common = ["--model", str(root / "model"), "--data", data]
    argv = {
        "eval": [
            "eval",
            *common,
            "--out",
            str(tmp_path / "eval"),
            "--max_new_tokens",
            "4",
            "--verifier",
            "exact",
            "--plot",
            "false",
            "--progress",
            "false",
        ],
        "pairs": [
            "pairs",
            *common,
            "--out",
            str(tmp_path / "pairs.jsonl"),
            "--samples",
            "2",
            "--max_new_tokens",
            "4",
            "--verifier",
            "exact",
            "--progress",
            "false",
        ],
        "rewrite": [
            "rewrite",
            *common,
            "--out",
            str(tmp_path / "rewrite"),
            "--max_new_tokens",
            "4",
            "--own_samples",
            "1",
            "--verifier",
            "exact",
            "--progress",
            "false",
        ],
        "audit": ["audit", *common, "--out", str(tmp_path / "audit"), "--progress", "false"],
    }[command]
    code = main(argv)
    assert code in (0, 2)  # pairs may find no pair on a random model: the device question came first anyway
    assert fake.asked >= 1 and fake.moved >= 1, (command, fake.asked, fake.moved)


def test_compare_asks_the_device_probe_for_every_model(setup, tmp_path, monkeypatch):
    root, data = setup
    fake = FakeAccelerator(monkeypatch)
    experiment = {
        "model": str(root / "model"),
        "train_data": data,
        "in_domain": data,
        "methods": ["sft"],
        "seeds": [0],
        "kl_limit": 2,
        "out": str(tmp_path / "grid"),
        "train": {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": 64},
        "eval": {"max_new_tokens": 4, "verifier": "exact"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    assert main(["compare", "--config", str(path)]) == 0
    # The base model (evaluator) and the tuned model each went to the probe's device; training asked too.
    assert fake.asked >= 3 and fake.moved >= 2, (fake.asked, fake.moved)


def test_device_and_dtype_resolution():
    assert device_module.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert device_module.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="unknown device"):
        device_module.resolve_device("tpu")
    with pytest.raises(UserError, match="unknown dtype"):
        device_module.resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            device_module.resolve_device("cuda")
    # One stream per (job, stage, seed, first row); stable across processes and runs.
    seeds = {
        device_module.stream_seed(j, s, seed, start)
        for j in ("eval", "rewrite")
        for s in ("a", "b")
        for seed in (0, 1)
        for start in (0, 16)
    }
    assert len(seeds) == 16
    assert device_module.stream_seed("rewrite", "hinted", 0, 0) == device_module.stream_seed("rewrite", "hinted", 0, 0)


# ------------------------------------------------------------------------------------------ the Hub


class FakeHub:
    """`huggingface_hub.snapshot_download` with a cache: a download writes the repository into `cache`
    (a tiny model, or a JSONL dataset) and is counted; local_files_only reads the cache or raises."""

    def __init__(self, root: Path, model_source: Path, rows: str):
        self.root, self.model_source, self.rows = root, model_source, rows
        self.downloads: list[str] = []

    def __call__(
        self, repo_id, *, repo_type=None, revision=None, local_files_only=False, allow_patterns=None, **kwargs
    ):
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        folder = self.root / (repo_type or "model") / repo_id.replace("/", "--")
        if folder.is_dir():
            return str(folder)
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} is not cached")
        if "missing" in repo_id:
            response = SimpleNamespace(headers={}, request=None, status_code=404)
            raise RepositoryNotFoundError(f"404 {repo_id}", response=response)
        self.downloads.append(f"{repo_type}:{repo_id}")
        folder.mkdir(parents=True)
        if repo_type == "dataset":
            (folder / "train.jsonl").write_text(Path(self.rows).read_text())
        else:
            for file in self.model_source.iterdir():
                (folder / file.name).write_bytes(file.read_bytes())
        return str(folder)


def test_hub_model_and_dataset_are_fetched_once_then_read_from_the_cache(setup, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    root, data = setup
    fake = FakeHub(tmp_path / "hub", root / "model", data)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = ["audit", "--model", "someone/tiny-model", "--data", "someone/tiny-data", "--progress", "false"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    fetched = ["dataset:someone/tiny-data", "model:someone/tiny-model"]
    assert sorted(fake.downloads) == fetched
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert sorted(fake.downloads) == fetched  # no second download
    first = (tmp_path / "a" / "scores.jsonl").read_text()
    assert first == (tmp_path / "b" / "scores.jsonl").read_text() and len(first.splitlines()) == len(WORDS)
    # Cached: offline works too.
    assert main([*argv, "--out", str(tmp_path / "c"), "--offline", "true"]) == 0
    capsys.readouterr()
    # Not cached and offline: one line, exit 2, nothing written.
    code = main(
        ["audit", "--model", "someone/other-model", "--data", data, "--out", str(tmp_path / "d"), "--offline", "true"]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "someone/other-model" in lines[0] and "offline" in lines[0], lines
    assert not (tmp_path / "d").exists()
    # An unknown repository: one line naming it.
    code = main(["audit", "--model", "someone/missing-model", "--data", data, "--out", str(tmp_path / "e")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("onsft: error: someone/missing-model:") and "no model" in lines[-1]
    assert fake.downloads[-1:] != ["model:someone/missing-model"]


def test_hub_names_and_local_paths_are_told_apart():
    for name in ("Qwen/Qwen2.5-1.5B-Instruct", "gpt2", "openai/gsm8k"):
        assert hub.looks_like_repo_id(name), name
    for name in ("data/train.jsonl", "./model", "/abs/model", "~/m", "a/b/c", "train.parquet", "x.gguf"):
        assert not hub.looks_like_repo_id(name), name
    assert hub.offline_requested(True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert hub.offline_requested(False)


# ------------------------------------------------------------------------------------------ the run guard


def guard(folder: Path, settings: dict, **kw) -> RunGuard:
    return RunGuard(
        folder / "run.json",
        "test",
        settings,
        ["out.txt", "ckpt-*"],
        folder / "summary.json",
        untracked=["ckpt-*"],
        **kw,
    )


def test_run_guard_resumes_the_same_settings_and_refuses_others(tmp_path):
    first = guard(tmp_path, {"lr": 0.1, "data": "a"})
    assert first.claim() is None
    (tmp_path / "out.txt").write_text("partial")
    first.release()  # killed before finishing: the record stays, the lock goes
    assert not first.lock.exists() and (tmp_path / "run.json").exists()
    again = guard(tmp_path, {"lr": 0.1, "data": "a"})
    assert again.claim() is None  # resume
    (tmp_path / "summary.json").write_text('{"done": 1}')
    again.finish()
    assert guard(tmp_path, {"lr": 0.1, "data": "a"}).claim() == {"done": 1}  # finished: reused
    with pytest.raises(UserError, match=r"different settings \(test; changed: lr\)"):
        guard(tmp_path, {"lr": 0.2, "data": "a"}).claim()
    assert (tmp_path / "out.txt").read_text() == "partial"  # refused: nothing touched
    fresh = guard(tmp_path, {"lr": 0.2, "data": "a"}, overwrite=True)
    assert fresh.claim() is None and not (tmp_path / "out.txt").exists()
    fresh.release()
    assert changed_keys({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0}) == ["b.c", "d"]


def test_run_guard_refuses_a_live_second_writer_and_unknown_runs(tmp_path):
    owner = guard(tmp_path / "x", {"k": 1})
    assert owner.claim() is None
    with pytest.raises(UserError, match="another onsft process"):
        guard(tmp_path / "x", {"k": 1}).claim()
    owner.release()
    # A stale lock (its process is gone) is taken over.
    os.symlink(f"{socket.gethostname()}:{2**22 + 12345}", tmp_path / "x" / ".run.json.lock")
    assert guard(tmp_path / "x", {"k": 1}).claim() is None
    # Outputs without any record (a run of unknown settings) are refused too.
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "ckpt-1").mkdir()
    with pytest.raises(UserError, match="no recorded onsft run wrote"):
        guard(tmp_path / "y", {"k": 1}).claim()
    # A run that fails before writing anything leaves the folder as it found it.
    empty = guard(tmp_path / "z", {"k": 1})
    empty.claim()
    empty.release()
    assert not (tmp_path / "z" / "run.json").exists()


# ------------------------------------------------------------------------------------------ settings


@dataclass
class Knobs:
    rate: float = field(default=0.5, metadata={"help": "a float"})
    steps: int = field(default=3, metadata={"help": "an int"})
    names: list[str] = field(default_factory=list, metadata={"help": "a list"})
    flag: bool = field(default=False, metadata={"help": "a bool"})
    maybe: float | None = field(default=None, metadata={"help": "optional"})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_numbers_are_refused_at_parse_time(value, tmp_path):
    with pytest.raises(UserError, match="must be a finite number"):
        parse_command([f"--rate={value}"], Knobs)
    with pytest.raises(UserError, match="finite"):
        parse_command([f"--maybe={value}"], Knobs)
    config = tmp_path / "c.yaml"
    config.write_text(f"rate: {value}\n")
    with pytest.raises(UserError) as error:
        parse_command(["--config", str(config)], Knobs)
    assert str(config) in str(error.value)


def test_configs_from_dict_coerces_yaml_values_and_names_unknown_keys():
    (knobs,) = configs_from_dict({"rate": "2e-4", "steps": 4.0, "names": ["a"], "flag": "true"}, Knobs)
    assert (knobs.rate, knobs.steps, knobs.names, knobs.flag) == (2e-4, 4, ["a"], True)
    assert isinstance(knobs.steps, int) and math.isclose(knobs.rate, 2e-4)
    with pytest.raises(UserError, match="did you mean `steps`"):
        configs_from_dict({"step_s": 1}, Knobs)
    with pytest.raises(UserError, match="finite"):
        configs_from_dict({"maybe": float("nan")}, Knobs)


def test_a_renamed_flag_keeps_working_with_one_note(capsys):
    """Hinted decoding's beta is --hint_beta (train's --beta is DPO's); --beta still sets it, with a one-line
    note, and the setting keeps its recorded name `beta`."""
    from onsft.engine.hinted import HintedConfig

    (old,) = parse_command(["--beta", "2"], HintedConfig)
    err = capsys.readouterr().err
    assert old.beta == 2.0 and len(err.strip().splitlines()) == 1 and "use --hint_beta" in err
    (new,) = parse_command(["--hint_beta", "2"], HintedConfig)
    assert new.beta == 2.0 and capsys.readouterr().err == ""
    assert configs_from_dict({"beta": 2.0}, HintedConfig)[0].beta == 2.0  # experiment files keep `beta`


def test_an_optional_bool_flag_alone_means_true():
    from onsft.engine.trainer import TrainConfig
    from onsft.runtime.settings import parse_command

    # `bf16: bool | None` (None: decided from the hardware) takes `--bf16` alone like every other switch.
    assert parse_command(["--bf16"], TrainConfig)[0].bf16 is True
    assert parse_command(["--bf16", "false"], TrainConfig)[0].bf16 is False
    assert parse_command(["--bf16", "--learning_rate", "0.1"], TrainConfig)[0].learning_rate == 0.1
