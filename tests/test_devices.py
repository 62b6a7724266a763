"""A device this machine or this PyTorch build lacks (issue 21): every command that takes --device refuses it
with one line and exit code 2 before it writes anything, as it does --device cuda on a CPU-only machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onsft import cli
from onsft.errors import UserError
from onsft.runtime import device as device_module

ROW = {"prompt": "Copy ab.", "completion": "It is ab. \\boxed{ab}", "answer": "ab", "reference": "\\boxed{ab}"}


def argv(command: str, data: Path, out: Path, device: str) -> list[str]:
    model = ["--model", "organism", "--device", device, "--progress", "false"]
    if command == "compare":
        experiment = out.with_suffix(".yaml")
        experiment.write_text(json.dumps({"model": "organism", "train_data": str(data), "in_domain": str(data)}))
        return ["compare", "--config", str(experiment), "--out", str(out), *model]
    if command == "train":
        return ["train", "--data", str(data), "--output_dir", str(out), "--max_steps", "1", *model]
    if command == "data replay":
        return ["data", "replay", "--data", str(data), "--out", str(out / "replay.jsonl"), *model]
    if command == "pairs":
        return ["pairs", "--data", str(data), "--out", str(out / "pairs.jsonl"), *model]
    return [command, "--data", str(data), "--out", str(out), *model]


ABSENT = [name for name in ("cuda", "xpu", "mps", "cuda:3") if device_module.device_count(name.split(":")[0]) == 0]


@pytest.mark.parametrize("device", ABSENT)
@pytest.mark.parametrize("command", ["audit", "eval", "rewrite", "pairs", "data replay", "compare", "train"])
def test_an_absent_device_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capfd, command, device):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    out = tmp_path / "out"
    assert cli.main(argv(command, data, out, device)) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onsft: error: --device: "), err
    assert f"device `{device}` requested but no" in err and "Fix: use --device cpu" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["data.jsonl", *(["out.yaml"] * (command == "compare"))]
    )


def test_resolve_device_refuses_accelerators_this_torch_lacks(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="no Apple MPS device"):
        device_module.resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_module.resolve_device("mps") == torch.device("mps")
    with pytest.raises(UserError, match="has 1 Apple MPS device"):
        device_module.resolve_device("mps:1")
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
        with pytest.raises(UserError, match="no Intel XPU"):
            device_module.resolve_device("xpu")


SUMMARY = {
    "audit": "out/summary.json",
    "eval": "out/metrics.json",
    "pairs": "out/pairs.summary.json",
    "data replay": "out/replay.summary.json",
    "train": "out/train_summary.json",
}


@pytest.mark.parametrize("command", list(SUMMARY))
def test_every_summary_records_where_the_job_really_ran(tmp_path, command):
    """Issue 21: the device used is recorded truthfully, read from the loaded model, not from the option."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({**ROW, "id": i}) + "\n" for i in range(4)))
    extra = {"audit": ["--self_check", "0"], "train": ["--per_device_train_batch_size", "2"]}.get(command, [])
    extra += [] if command in ("audit", "train") else ["--max_new_tokens", "8"]
    extra += ["--keep_unfinished", "true"] if command == "data replay" else []
    assert cli.main(argv(command, data, tmp_path / "out", "cpu") + extra) == 0
    ran_on = json.loads((tmp_path / SUMMARY[command]).read_text())["ran_on"]
    assert ran_on["device"] == "cpu" and ran_on["dtype"] == "float32" and ran_on["processes"] == 1
    assert ran_on["torch"] == torch.__version__


def test_ran_on_reads_the_weights_not_the_request():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert device_module.ran_on(model) == {
        "device": "cpu",
        "dtype": "bfloat16",
        "processes": 1,
        "torch": torch.__version__,
    }
