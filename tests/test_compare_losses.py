"""`onsft compare` runs eaft, asft and sft+replay end to end on a tiny model (the replay set built in the
shared-data step from `replay_prompts`), and refuses a replay method without replay prompts before training."""

import json

import yaml

from onsft.cli import main
from test_compare import WORDS, write_jsonl
from tiny import tiny_model, tiny_tokenizer


def experiment(root):
    tiny_model(tied=False).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    teacher = [{"prompt": f"Copy {w}.", "completion": f"It is {w}. \\boxed{{{w}}}", "answer": w} for w in WORDS]
    tests = [{"prompt": f"Copy {w}.", "answer": w} for w in WORDS[:4]]
    return {
        "model": str(root / "model"),
        "train_data": write_jsonl(root / "train.jsonl", teacher),
        "in_domain": write_jsonl(root / "test.jsonl", tests),
        "retention": write_jsonl(root / "keep.jsonl", tests),
        "replay_prompts": write_jsonl(root / "other.jsonl", [{"prompt": f"Say {w}."} for w in WORDS]),
        "methods": ["eaft", "asft", "sft+replay"],
        "seeds": [0],
        "kl_limit": 4,
        "train": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "use_cpu": True,
            "logging_steps": 1,
            "max_length": 64,
        },
        "method_train": {"sft+replay": {"replay_share": 0.5}},
        "replay": {"max_new_tokens": 8, "keep_unfinished": True},
        "eval": {"max_new_tokens": 6, "verifier": "exact", "batch_size": 8},
    }


def run(root, exp, name):
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**exp, "out": str(root / name)}))
    return main(["compare", "--config", str(config)])


def test_compare_runs_eaft_asft_and_replay(tmp_path, capsys):
    exp = experiment(tmp_path)
    assert run(tmp_path, exp, "grid") == 0
    out = tmp_path / "grid"
    results = json.loads((out / "results.json").read_text())
    assert [c["method"] for c in results["cells"]] == ["eaft", "asft", "sft+replay"]
    for cell in results["cells"]:
        assert cell["steps"] == 2 and 0.0 <= cell["in_domain"] <= 1.0 and cell["kl_drift"] > 0
    logs = {
        m: json.loads((out / "cells" / f"{m}-s0" / "train" / "train_summary.json").read_text()) for m in exp["methods"]
    }
    assert logs["eaft"]["loss"] == "eaft" and logs["asft"]["loss"] == "asft"
    assert logs["sft+replay"]["loss"] == "nll" and logs["sft+replay"]["replay"]["replay_rows_per_batch"] == 2
    assert logs["eaft"]["replay"] is None
    # The replay set: the base model's own answers to the replay prompts, built once in the shared step.
    replay = [json.loads(line) for line in (out / "data" / "replay.jsonl").read_text().splitlines()]
    assert results["data"]["replay"] == str(out / "data" / "replay.jsonl")
    assert {r["replay_model"] for r in replay} == {exp["model"]} and len(replay) == len(WORDS)
    assert results["data_prep_seconds"]["replay"] > 0
    for method in ("eaft", "asft", "sft+replay"):
        assert f"| {method} | " in (out / "table.md").read_text()
    # Without replay prompts (and no replay_data of its own) sft+replay is refused before anything runs.
    capsys.readouterr()
    assert run(tmp_path, {k: v for k, v in exp.items() if k != "replay_prompts"}, "bad") == 2
    assert "needs the base model's answers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
