"""`onsft compare` end to end on a tiny model: grid, cache, table, and early failure on bad settings."""

import json

import pytest
import yaml

from onsft.cli import main
from tiny import tiny_model, tiny_tokenizer

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tiny_model(tied=False).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    teacher = [
        {
            "prompt": f"Copy {w}.",
            "completion": f"It is {w}. \\boxed{{{w}}}",
            "answer": w,
            "reference": f"It is {w}. \\boxed{{{w}}}",
        }
        for w in WORDS
    ]
    tests = [{"prompt": f"Copy {w}.", "answer": w} for w in WORDS[:4]]
    experiment = {
        "model": str(root / "model"),
        "train_data": write_jsonl(root / "train.jsonl", teacher),
        "in_domain": write_jsonl(root / "test.jsonl", tests),
        "retention": write_jsonl(root / "keep.jsonl", tests),
        "methods": ["sft", "idft", "dpo"],
        "seeds": [0, 1],
        "kl_limit": 4,
        "train": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "use_cpu": True,
            "logging_steps": 1,
            "max_length": 64,
        },
        "method_train": {"dpo": {"learning_rate": 0.001}},
        # The tiny model verifies no rewrite: the pairs take their chosen answers from its own samples alone.
        "pairs": {"samples": 2, "max_new_tokens": 6, "verifier": "exact", "rewrites": False},
        "eval": {"max_new_tokens": 6, "verifier": "exact", "batch_size": 8},
        "curve_every": 1,
        "curve_limit": 2,
    }
    return root, experiment


def run(root, experiment, name, *extra):
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**experiment, "out": str(root / name)}))
    return main(["compare", "--config", str(config), *extra])


def test_compare_runs_the_grid_writes_table_and_caches_cells(setup):
    root, experiment = setup
    assert run(root, experiment, "grid") == 0
    out = root / "grid"
    results = json.loads((out / "results.json").read_text())
    assert [(c["method"], c["seed"]) for c in results["cells"]] == [
        ("sft", 0),
        ("sft", 1),
        ("idft", 0),
        ("idft", 1),
        ("dpo", 0),
        ("dpo", 1),
    ]
    for cell in results["cells"]:
        for key in ("in_domain", "retention"):
            assert 0.0 <= cell[key] <= 1.0
        assert cell["kl_drift"] > 0  # the tuned model moved away from the base
        assert cell["steps"] == 2 and cell["tokens"] > 0
        assert [p["step"] for p in cell["curve"]] == [0, 1, 2]
    table = (out / "table.md").read_text()
    for method in ("base (no tuning)", "sft", "idft", "dpo"):
        assert f"| {method} | " in table
    assert (out / "table.csv").read_text().count("\n") == 5  # header, base, 3 methods
    for plot in ("skill_vs_retention.png", "curves.png", "training.png"):
        assert (out / plot).stat().st_size > 1000
    # Mean and std over the two seeds in the table rows match the cells.
    sft = [c["in_domain"] for c in results["cells"] if c["method"] == "sft"]
    row = next(r for r in results["rows"] if r["method"] == "sft")
    assert row["in_domain"][0] == pytest.approx(sum(sft) / 2)
    # A rerun finds every cell cached: nothing is trained again.
    stamps = {p: p.stat().st_mtime for p in out.glob("cells/*/eval.json")}
    assert run(root, experiment, "grid") == 0
    assert stamps == {p: p.stat().st_mtime for p in out.glob("cells/*/eval.json")}


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"methods": ["sft", "ppo"]}, "unknown method `ppo`"),
        ({"train": {"learning_rat": 0.1}}, "unknown option `--learning_rat`"),
        ({"bogus_key": 1}, "unknown experiment key"),
        ({"train": {"max_steps": "four"}}, "(train options of sft): option `max_steps`: invalid int value: 'four'"),
        ({"eval": {"max_new_tokens": "many"}}, "eval option `max_new_tokens`: invalid int value: 'many'"),
        ({"methods": ["rewrite+idft"], "train_data": None}, "required"),
    ],
)
def test_bad_settings_fail_before_any_training(setup, capsys, change, expected):
    root, experiment = setup
    broken = {k: v for k, v in {**experiment, **change}.items() if v is not None}
    assert run(root, broken, "bad") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (root / "bad" / "cells").exists()


def test_missing_answer_column_fails_early(setup, capsys):
    root, experiment = setup
    no_answer = write_jsonl(root / "noanswer.jsonl", [{"prompt": "Copy ab."}])
    assert run(root, {**experiment, "in_domain": no_answer}, "noans") == 2
    assert "answer" in capsys.readouterr().err
    assert not (root / "noans").exists()


def test_an_unknown_method_given_by_flag_is_blamed_on_the_flag(setup, capsys):
    root, experiment = setup
    assert run(root, experiment, "flag", "--methods", "sft", "sfx") == 2
    err = capsys.readouterr().err
    assert err.startswith("onsft: error: --methods: unknown method `sfx`") and "flag.yaml" not in err
    assert not (root / "flag").exists()


def test_the_preference_pairs_do_not_depend_on_the_other_methods_run(setup, tmp_path, monkeypatch):
    """DPO's chosen answers are the verified rewrites whether or not a rewrite method runs beside it, so a grid
    run method by method (`--methods dpo`) reuses the same pairs as the whole grid."""
    from onsft.pipeline.compare import stage
    from onsft.pipeline.compare.experiment import experiment_from_dict

    _, experiment = setup
    rewritten = {"files": {"train": "rewritten.jsonl"}, "wall_seconds": 0.0}
    given = []
    monkeypatch.setattr(stage.rewrite_stage, "run", lambda config, *rest: rewritten)
    monkeypatch.setattr(stage.pairs_stage, "run", lambda config, *rest: given.append(config.rewrites) or {})
    with_rewrites = {**experiment, "pairs": {k: v for k, v in experiment["pairs"].items() if k != "rewrites"}}
    for methods in (["dpo"], ["dpo", "rewrite+sft"], ["simpo"]):
        exp = experiment_from_dict({**with_rewrites, "methods": methods}, "x.yaml")
        stage.prepare_shared_data(exp, tmp_path / "-".join(methods))
    assert given == ["rewritten.jsonl"] * 3
    assert experiment["pairs"]["rewrites"] is False
    stage.prepare_shared_data(experiment_from_dict({**experiment, "methods": ["dpo"]}, "x.yaml"), tmp_path / "plain")
    assert given[-1] is None
