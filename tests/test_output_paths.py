"""No output replaces an input or a file onsft did not write (issue 21): every command, every flag that names an
output path, pointed at its input and at an existing foreign file, is refused in one line (exit 2), with the
file byte-identical and nothing written; `--overwrite` is what replaces a foreign file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onsft import cli

ROWS = [
    {
        "id": i,
        "prompt": f"Copy {w}.",
        "completion": f"It is {w}. \\boxed{{{w}}}",
        "answer": w,
        "reference": f"\\boxed{{{w}}}",
    }
    for i, w in enumerate(["ab", "cd", "ef"])
]
MODEL = ["--model", "organism", "--progress", "false"]

# (command argv with {data} and {out}, the flag naming an output path): every output flag of every command.
OUTPUT_FLAGS = {
    "audit --out": ["audit", *MODEL, "--data", "{data}", "--out", "{out}"],
    "eval --out": ["eval", *MODEL, "--data", "{data}", "--out", "{out}"],
    "rewrite --out": ["rewrite", *MODEL, "--data", "{data}", "--out", "{out}"],
    "rewrite --train_out": ["rewrite", *MODEL, "--data", "{data}", "--out", "{tmp}/rw", "--train_out", "{out}"],
    "pairs --out": ["pairs", *MODEL, "--data", "{data}", "--out", "{out}"],
    "train --output_dir": ["train", "--model", "organism", "--data", "{data}", "--output_dir", "{out}"],
    "data replay --out": ["data", "replay", *MODEL, "--data", "{data}", "--out", "{out}"],
    "data gym --out": ["data", "gym", "--task", "chain_sum", "--size", "3", "--out", "{out}"],
    "data organism --out": ["data", "organism", "--n_train", "3", "--n_test", "1", "--n_ood", "1",
                            "--n_retention", "1", "--out", "{out}"],
    "compare --out": ["compare", "--config", "{tmp}/exp.yaml", "--progress", "false", "--out", "{out}"],
    "demo --out": ["demo", "--steps", "1", "--progress", "false", "--out", "{out}"],
}  # fmt: skip
# Output folders and a file named like one of each command's outputs, put there by the user.
FOLDER_OUTPUTS = {
    "audit --out": "scores.jsonl",
    "eval --out": "metrics.json",
    "rewrite --out": "train.jsonl",
    "train --output_dir": "model",
    "data organism --out": "new_skill_test.jsonl",
}


def setup(tmp_path: Path) -> tuple[Path, Path]:
    """The data file, a foreign file, and a one-cell experiment reading the data (for `compare`)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": "not onsft\'s"}\n', encoding="utf-8")
    experiment = {"model": "organism", "train_data": str(data), "in_domain": str(data), "methods": ["sft"]}
    (tmp_path / "exp.yaml").write_text(json.dumps({**experiment, "train": {"max_steps": 1}}), encoding="utf-8")
    return data, foreign


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["input", "foreign"])
@pytest.mark.parametrize("name", list(OUTPUT_FLAGS))
def test_an_output_flag_never_replaces_an_input_or_a_foreign_file(name, target, tmp_path, capsys):
    data, foreign = setup(tmp_path)
    out = data if target == "input" else foreign
    argv = [a.format(data=data, out=out, tmp=tmp_path) for a in OUTPUT_FLAGS[name]]
    before = files(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("onsft: error:") and " Fix: " in err[0], err
    assert files(tmp_path) == before  # the file untouched, nothing written beside it


def test_data_gym_reruns_do_nothing_refuse_other_sizes_and_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "chain.jsonl"
    argv = ["data", "gym", "--task", "chain_sum", "--size", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().err and out.read_bytes() == first
    assert cli.main([*argv[:-3], "4", "--out", str(out)]) == 2  # other sizes into the same file
    err = capsys.readouterr().err
    assert "different settings" in err and "size" in err and out.read_bytes() == first
    assert cli.main([*argv[:-3], "4", "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("name", list(FOLDER_OUTPUTS))
def test_a_foreign_file_inside_an_output_folder_is_refused(name, tmp_path, capsys):
    data, _ = setup(tmp_path)
    folder = tmp_path / "out"
    mine = folder / FOLDER_OUTPUTS[name]
    if name.startswith("train"):
        (mine / "weights.bin").parent.mkdir(parents=True)
        (mine / "weights.bin").write_bytes(b"my own model")
    else:
        folder.mkdir()
        mine.write_text('{"mine": 1}\n', encoding="utf-8")
    argv = [a.format(data=data, out=folder, tmp=tmp_path) for a in OUTPUT_FLAGS[name]]
    before = files(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no recorded onsft run wrote" in err and "--overwrite" in err, err
    assert files(tmp_path) == before
