"""A sweep in `onsft compare` end to end on a tiny model: the grid, every checkpoint evaluated, the cache (a rerun
trains and evaluates nothing), resume of deleted parts, curves, plots and frontier.md."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

import onsft
from onsft.cli import main
from onsft.errors import UserError
from onsft.formulas.frontier import best_setting, reading_at_level
from onsft.pipeline.compare.experiment import Experiment, experiment_from_dict, load_experiment
from onsft.pipeline.compare.experiment_eval import Evaluator
from onsft.pipeline.compare.frontier_readings import settings_for_more_seeds
from onsft.pipeline.compare.frontier_report import write_frontier
from onsft.pipeline.compare.stage import check_options
from onsft.pipeline.compare.sweep import grid
from onsft.pipeline.train import stage as train_stage
from tiny import tiny_model, tiny_tokenizer

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def counted(monkeypatch):
    """Counts of `onsft train` runs that trained (not a finished run found again) and of model evaluations."""
    counts = {"train": 0, "eval": 0}
    real_train, real_full = train_stage.run, Evaluator.full

    def train(inputs, model_args, lora, trainer, *rest):
        counts["train"] += not (Path(trainer.output_dir) / "train_summary.json").exists()
        return real_train(inputs, model_args, lora, trainer, *rest)

    def full(self, model, limit=0):
        counts["eval"] += 1
        return real_full(self, model, limit)

    monkeypatch.setattr(train_stage, "run", train)
    monkeypatch.setattr(Evaluator, "full", full)
    return counts


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tiny_model(tied=False).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    teacher = [{"prompt": f"Copy {w}.", "completion": f"It is {w}. \\boxed{{{w}}}", "answer": w} for w in WORDS]
    tests = [{"prompt": f"Copy {w}.", "answer": w} for w in WORDS[:4]]
    spec = {
        "model": str(root / "model"),
        "train_data": write_jsonl(root / "train.jsonl", teacher),
        "in_domain": write_jsonl(root / "test.jsonl", tests),
        "ood": write_jsonl(root / "ood.jsonl", tests[:2]),
        "retention": write_jsonl(root / "keep.jsonl", tests),
        "methods": ["sft", "idft"],
        "seeds": [0],
        "method_seeds": {"sft": [0, 1]},
        "sweep": {"learning_rate": [0.01, 0.001]},
        "eval_every": 1,
        "curve_limit": 0,
        "matched": {"in_domain": 0.5, "retention": 0.5},
        "contrasts": [["idft", "sft"]],
        "kl_limit": 2,
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "max_length": 64},
        "eval": {"max_new_tokens": 6, "verifier": "exact", "batch_size": 8},
        "out": str(root / "out"),
    }
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump(spec))
    return root, config


def test_sweep_grid_cache_resume_and_frontier(experiment, counted, capsys):
    root, config = experiment
    out = root / "out"
    assert main(["compare", "--config", str(config)]) == 0
    # stdout ends by naming where the reports went (issue 21).
    written = capsys.readouterr().out.split("Written:\n", 1)[1].split()
    for name in ("results.json", "table.md", "frontier.md", "curves.csv", "frontier_in_domain.png", "curves.png"):
        assert str(out / name) in written, name
    assert all(Path(path).is_file() for path in written)
    # sft: 2 lrs x 2 seeds, idft: 2 lrs x 1 seed; each trained once; the base, 2 points per cell.
    assert counted == {"train": 6, "eval": 1 + 6 * 2}
    results = json.loads((out / "results.json").read_text())
    assert [(c["method"], c["setting"], c["seed"]) for c in results["cells"]] == [
        ("sft", "lr=0.01", 0),
        ("sft", "lr=0.01", 1),
        ("sft", "lr=0.001", 0),
        ("sft", "lr=0.001", 1),
        ("idft", "lr=0.01", 0),
        ("idft", "lr=0.001", 0),
    ]
    for cell in results["cells"]:
        assert [p["step"] for p in cell["curve"]] == [0, 1, 2]
        assert cell["curve"][0]["kl_drift"] == 0.0  # the base model against itself
        assert cell["curve"][-1]["kl_drift"] > 0 and cell["tokens"] > 0 and cell["train_cpu_seconds"] > 0
        for point in cell["curve"]:
            assert all(0.0 <= point[k] <= 1.0 for k in ("in_domain", "ood", "retention"))
        # The final point is the cell's result.
        assert cell["in_domain"] == cell["curve"][-1]["in_domain"]
    assert (out / "cells" / "sft-lr0.01-s1" / "points" / "step-1.json").is_file()
    with open(out / "curves.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 3 and {r["opt_learning_rate"] for r in rows} == {"0.01", "0.001"}
    # The frontier summary holds what the formulas give on the curves.
    summary = results["frontier"]
    for method in ("sft", "idft"):
        mine = [c for c in results["cells"] if c["method"] == method]
        by_setting = {}
        for c in mine:
            curve = ([p["in_domain"] for p in c["curve"]], [p["retention"] for p in c["curve"]])
            by_setting.setdefault(c["setting"], {})[c["seed"]] = reading_at_level(*curve, 0.5)
        expected = by_setting[best_setting(by_setting)]  # one setting for every seed
        matched = summary["methods"][method]["matched"]["in_domain"]
        assert {int(k): v for k, v in matched["values"].items()} == expected
        assert summary["methods"][method]["runs"] == len(mine)
    assert {(c["a"], c["b"]) for c in summary["contrasts"]} == {("idft", "sft")}
    text = (out / "frontier.md").read_text()
    for part in ("| sft | 4 |", "| idft | 2 |", "retention @ in-domain 50%", "in-domain @ retention 50%"):
        assert part in text
    assert "## Pareto set: in-domain vs retention" in text and "## Pareto set: OOD vs retention" in text
    for plot in ("frontier_in_domain.png", "frontier_ood.png", "curves.png", "skill_vs_retention.png"):
        assert (out / plot).stat().st_size > 1000
    # Finished cells keep their checkpoints' weights, not their optimiser state.
    checkpoint = out / "cells" / "sft-lr0.01-s0" / "train" / "checkpoint-1"
    assert any(checkpoint.glob("*.safetensors")) and not (checkpoint / "optimizer.pt").exists()

    # A rerun trains nothing and evaluates nothing: every cell and point is cached.
    counted.update(train=0, eval=0)
    assert main(["compare", "--config", str(config)]) == 0
    assert counted == {"train": 0, "eval": 0}
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]

    # Resume: a deleted cell is trained and evaluated again; a cell whose result alone is gone is rebuilt from
    # its finished training and cached points; a deleted point is evaluated again.
    shutil.rmtree(out / "cells" / "idft-lr0.001-s0")
    (out / "cells" / "sft-lr0.001-s1" / "eval.json").unlink()
    (out / "cells" / "idft-lr0.01-s0" / "eval.json").unlink()
    (out / "cells" / "idft-lr0.01-s0" / "points" / "step-1.json").unlink()
    counted.update(train=0, eval=0)
    assert main(["compare", "--config", str(config)]) == 0
    assert counted == {"train": 1, "eval": 2 + 1}
    again = json.loads((out / "results.json").read_text())["cells"]

    def measured(cells):  # the time an evaluation took is not a measurement of the model
        return [[{k: v for k, v in p.items() if k != "eval_seconds"} for p in c["curve"]] for c in cells]

    assert measured(again[:4]) == measured(results["cells"][:4])  # untouched or rebuilt from cached points
    for new, old in zip(sum(measured(again), []), sum(measured(results["cells"]), [])):
        assert new == pytest.approx(old, abs=1e-5)  # re-evaluated: the same numbers


def test_sweep_settings_are_checked_before_training(experiment, capsys):
    root, config = experiment
    spec = yaml.safe_load(config.read_text())
    for change, expected in [
        ({"sweep": {"learning_rat": [0.1]}}, "unknown option `--learning_rat`"),
        ({"sweep": {"learning_rate": []}}, "non-empty list"),
        ({"method_seeds": {"ppo": [0]}}, "unknown method `ppo`"),
        ({"matched": {"in_domain": 1.5}}, "level in [0, 1]"),
        ({"contrasts": [["sft", "dpo"]]}, "two of the experiment's methods"),
    ]:
        bad = root / "bad.yaml"
        bad.write_text(yaml.safe_dump({**spec, **change, "out": str(root / "bad")}))
        assert main(["compare", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not (root / "bad" / "cells").exists()


def test_frontier_report_on_synthetic_curves(tmp_path):
    def cell(method, lr, seed, points):
        curve = [{"step": 100 * i, "in_domain": x, "retention": y, "kl_drift": 0.0} for i, (x, y) in enumerate(points)]
        return {
            "method": method,
            "setting": f"lr={lr}",
            "options": {"learning_rate": lr},
            "seed": seed,
            "curve": curve,
            "tokens": 1000,
            "train_cpu_seconds": 2.0,
            "train_seconds": 1.0,
            "eval_seconds": 0.5,
            **curve[-1],
        }

    cells = [
        cell("idft", 0.1, 0, [(0.0, 0.96), (0.4, 0.9), (0.8, 0.7)]),  # retention 0.8 at 0.6; in-domain 0.6 at 0.8
        cell("idft", 0.1, 1, [(0.0, 0.96), (0.4, 0.9), (0.8, 0.5)]),  # 0.7 at 0.6; 0.5 at 0.8
        cell("idft", 0.01, 0, [(0.0, 0.96), (0.2, 0.95)]),  # reaches neither level
        cell("dpo", 0.1, 0, [(0.0, 0.96), (0.3, 0.8), (0.5, 0.6)]),  # never in-domain 0.6; exactly 0.8 at step 1
    ]
    exp = Experiment(methods=["idft", "dpo"], matched={"in_domain": 0.6, "retention": 0.8}, contrasts=[["idft", "dpo"]])
    costs = {"pairs": {"cpu_seconds": 5.0, "wall_seconds": 4.0}, "rewrite": {"cpu_seconds": 3.0, "wall_seconds": 2.0}}
    report = write_frontier(exp, {"in_domain": 0.0, "retention": 0.96}, cells, costs, tmp_path)
    a, b = (report["summary"]["methods"][m]["matched"] for m in ("idft", "dpo"))
    assert a["in_domain"]["values"] == {"0": pytest.approx(0.8), "1": pytest.approx(0.7)}
    assert a["in_domain"]["interval"]["mean"] == pytest.approx(0.75)
    assert (a["in_domain"]["interval"]["low"], a["in_domain"]["interval"]["high"]) == pytest.approx((0.7, 0.8))
    assert a["retention"]["values"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.5)}
    assert a["in_domain"]["setting"] == "lr=0.1"  # one setting for both seeds (lr=0.01 reaches neither level)
    assert b["in_domain"] == {"interval": None, "reached": 0, "seeds": 1, "values": {"0": None}, "setting": None}
    assert b["retention"]["values"] == {"0": pytest.approx(0.3)}
    contrasts = {c["axis"]: c["difference"] for c in report["summary"]["contrasts"]}
    assert contrasts["in_domain"] is None and contrasts["retention"]["mean"] == pytest.approx(0.3)
    front = report["summary"]["pareto"]["in_domain"]
    assert sorted((p["in_domain"], p["retention"]) for p in front) == [
        (0.0, 0.96),
        (0.2, 0.95),
        (0.4, 0.9),
        (0.4, 0.9),
        (0.8, 0.7),
    ]
    text = (tmp_path / "frontier.md").read_text()
    assert "| idft | 3 | 75.0 [70.0, 80.0] at lr=0.1 | 55.0 [50.0, 60.0] at lr=0.1 | 1k | 2 | 0 | 1 | 0 |" in text
    assert "| dpo | 1 | not reached (0/1 seeds) | 30.0 [30.0, 30.0] | 1k | 2 | 8 | 1 | 0 |" in text  # pairs + rewrite
    assert "| idft | lr=0.01 | 1 | not reached: stays below | not reached: stays above |" in text
    assert "| idft | dpo | in-domain @ retention 80% | +30.0 [+30.0, +30.0] |" in text
    assert (tmp_path / "frontier_in_domain.png").stat().st_size > 1000
    assert len((tmp_path / "curves.csv").read_text().splitlines()) == 1 + 3 + 3 + 2 + 3


def test_variants_run_the_experiment_once_each_and_compare_them(experiment):
    root, config = experiment
    spec = yaml.safe_load(config.read_text())
    other = [{"prompt": f"Copy {w}.", "completion": f"{w} \\boxed{{{w}}}", "answer": w} for w in WORDS]
    spec.update(
        out=str(root / "variants"),
        methods=["sft", "idft"],
        method_seeds={},
        sweep={"learning_rate": [0.01]},
        eval_every=0,  # curves of two points: the base model and the final one
        audit={},
        variants={
            "long": {"train_data": spec["train_data"]},
            "short": {"train_data": write_jsonl(root / "o.jsonl", other)},
        },
    )
    path = root / "variants.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(path)]) == 0
    out = root / "variants"
    summary = json.loads((out / "variants.json").read_text())
    assert list(summary) == ["long", "short"]
    for name in summary:
        audit = json.loads((out / name / "audit" / "summary.json").read_text())
        assert summary[name]["mean_phi"] == audit["sets"]["scores"]["mean_phi_token_weighted"]
        assert (out / name / "frontier.md").is_file()
    assert summary["long"]["mean_phi"] != summary["short"]["mean_phi"]
    text = (out / "variants.md").read_text()
    assert "| long |" in text and "| short |" in text and "idft - sft" in text
    assert (out / "variants.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["organism-frontier", "organism-frontier-300", "organism-styles", "smollm2-gym"])
def test_shipped_studies_load_and_their_options_validate(name, tmp_path):
    exp = load_experiment(str(Path(onsft.__file__).parent / "experiments" / f"{name}.yaml"), {})
    variants = [exp.variant(v) for v in exp.variants] or [exp]
    for variant in variants:
        check_options(variant, tmp_path)  # every method's train options with every swept value
    cells = [c for v in variants for c in grid(v)]
    assert (
        len(cells)
        == {"organism-frontier": 78, "organism-frontier-300": 102, "organism-styles": 60, "smollm2-gym": 38}[name]
    )  # as sized in the file's header (the full grid; `more_seeds: chosen` runs the first seeds and part of the rest)
    if exp.more_seeds == "chosen":
        assert sum(c.seed == exp.seeds_of(c.method)[0] for c in cells) == 38  # organism-frontier-300's first pass
    assert len({(v.out, c.name) for v in variants for c in grid(v)}) == len(cells)  # one folder each


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"seeds": 3}, "variant `a`: `seeds` must be a list"),
        ({"sweep": {"learning_rate": 1e-4}}, "variant `a`: `sweep"),
    ],
)
def test_a_variant_is_checked_as_the_experiment_it_becomes(variant, message):
    base = {
        "model": "organism",
        "train_data": "organism:new_skill_train.native",
        "in_domain": "organism:new_skill_test",
        "retention": "organism:retention_test",
        "methods": ["sft"],
        "seeds": [0],
    }
    with pytest.raises(UserError, match=message):
        experiment_from_dict({**base, "variants": {"a": variant}}, "x.yaml")
    ok = experiment_from_dict({**base, "variants": {"a": {"train_data": "organism:new_skill_train.mild"}}}, "x.yaml")
    assert ok.variant("a").train_data == "organism:new_skill_train.mild"


def test_methods_override_keeps_only_the_contrasts_between_the_chosen_methods(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "organism",
                "train_data": "organism:new_skill_train.native",
                "in_domain": "organism:new_skill_test",
                "methods": ["sft", "idft", "rewrite+sft"],
                "contrasts": [["idft", "sft"], ["rewrite+sft", "sft"]],
            }
        )
    )
    assert load_experiment(str(path), {"methods": ["sft", "idft"]}).contrasts == [["idft", "sft"]]
    assert "1 contrast(s)" in capsys.readouterr().err
    assert len(load_experiment(str(path), {"methods": None}).contrasts) == 2
    with pytest.raises(UserError, match="must be two of the experiment's methods"):  # the file itself is still checked
        load_experiment(str(path), {"methods": None, "contrasts": [["dpo", "sft"]]})


def test_seeds_override_replaces_method_seeds(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    raw = {
        "model": "organism",
        "train_data": "organism:new_skill_train.native",
        "in_domain": "organism:new_skill_test",
        "methods": ["sft", "idft"],
        "seeds": [0],
        "method_seeds": {"sft": [0, 1, 2]},
    }
    path.write_text(yaml.safe_dump(raw))
    assert load_experiment(str(path), {"seeds": None}).seeds_of("sft") == [0, 1, 2]
    quick = load_experiment(str(path), {"seeds": [1]})
    assert quick.seeds_of("sft") == [1] and quick.seeds_of("idft") == [1]
    assert "--seeds replaces the `method_seeds`" in capsys.readouterr().err


def synthetic_cell(method, lr, seed, test, validation, tokens=1000, kl=None):
    """A cell result as the sweep writes it, from (in-domain, retention) pairs along its test and validation curves
    (and the KL drift at each point, when given)."""
    curve = [
        {"step": 10 * i, "in_domain": x, "retention": y, "validation_in_domain": vx, "validation_retention": vy}
        for i, ((x, y), (vx, vy)) in enumerate(zip(test, validation))
    ]
    for point, drift in zip(curve, kl or ()):
        point["kl_drift"] = drift
    return {"method": method, "setting": f"lr={lr}", "options": {"learning_rate": lr}, "seed": seed,
            "curve": curve, "tokens": tokens, "train_cpu_seconds": 1.0, "train_seconds": 1.0,
            "eval_seconds": 0.1, **curve[-1]}  # fmt: skip


# On the test sets lr=0.4 keeps more retention at in-domain 50%; on the validation draws lr=0.1 does.
SLOW_TEST, SLOW_VAL = [(0.0, 0.9), (0.5, 0.6), (0.8, 0.5)], [(0.0, 0.9), (0.5, 0.85), (0.8, 0.8)]
FAST_TEST, FAST_VAL = [(0.0, 0.9), (0.5, 0.8), (0.9, 0.7)], [(0.0, 0.9), (0.5, 0.7), (0.9, 0.6)]


def test_later_seeds_go_to_the_setting_the_first_seeds_validation_readings_choose():
    first = [synthetic_cell("sft", 0.1, 0, SLOW_TEST, SLOW_VAL), synthetic_cell("sft", 0.4, 0, FAST_TEST, FAST_VAL)]
    first.append(synthetic_cell("idft", 0.1, 0, SLOW_TEST, SLOW_VAL))  # one setting: its seeds all run there
    exp = Experiment(methods=["sft", "idft"], matched={"in_domain": 0.5}, more_seeds="chosen")
    assert settings_for_more_seeds(exp, first) == {"sft": {"lr=0.1"}, "idft": {"lr=0.1"}}
    # Without validation draws the first seed's test readings choose (lr=0.4 is better there).
    for cell in first:
        for point in cell["curve"]:
            del point["validation_in_domain"], point["validation_retention"]
    assert settings_for_more_seeds(exp, first)["sft"] == {"lr=0.4"}
    # Two matched readings may choose two settings: the later seeds run at both.
    exp.matched = {"in_domain": 0.5, "retention": 0.65}
    assert settings_for_more_seeds(exp, first)["sft"] == {"lr=0.1", "lr=0.4"}


def test_more_seeds_chosen_trains_the_later_seeds_at_the_chosen_setting_only(experiment, counted, tmp_path):
    root, config = experiment
    spec = {**yaml.safe_load(config.read_text()), "more_seeds": "chosen", "out": str(tmp_path / "out")}
    spec.update(methods=["sft"], method_seeds={"sft": [0, 1]}, contrasts=[], matched={"in_domain": 0.0})
    path = tmp_path / "chosen.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    first = [c for c in results["cells"] if c["seed"] == 0]
    chosen = settings_for_more_seeds(load_experiment(str(path), {}), first)["sft"]
    assert len(first) == 2 and len(chosen) == 1  # one matched reading: one setting
    assert [(c["setting"], c["seed"]) for c in results["cells"] if c["seed"] == 1] == [(next(iter(chosen)), 1)]
    assert counted["train"] == 3
    with pytest.raises(UserError, match="more_seeds"):
        experiment_from_dict({**spec, "more_seeds": "some"}, "x.yaml")


def test_frontier_chooses_the_setting_on_validation_and_reads_compute_matched(tmp_path):
    cell = synthetic_cell
    slow_test, slow_val, fast_test, fast_val = SLOW_TEST, SLOW_VAL, FAST_TEST, FAST_VAL
    kl = {0.1: [0.0, 0.1, 0.3], 0.4: [0.0, 0.2, 0.5]}
    cells = [cell("sft", lr, s, *curves, kl=kl[lr]) for s in (0, 1) for lr, curves in ((0.1, (slow_test, slow_val)),
                                                                                      (0.4, (fast_test, fast_val)))]  # fmt: skip
    # idft trains on half the tokens: the compute-matched reading is at its 500 tokens, sft's step 10 of 20.
    # Seed 1 of idft drifts twice as far as seed 0 on its way to the in-domain level.
    cells += [cell("idft", 0.1, s, slow_test, slow_val, tokens=500, kl=[0.0, 0.3 * (s + 1), 0.6]) for s in (0, 1)]
    exp = Experiment(methods=["sft", "idft"], matched={"in_domain": 0.5}, contrasts=[["idft", "sft"]])
    summary = write_frontier(exp, {"in_domain": 0.0, "retention": 0.9}, cells, {}, tmp_path)["summary"]
    sft = summary["methods"]["sft"]["matched"]["in_domain"]
    assert sft["setting"] == "lr=0.1" and sft["values"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.6)}
    assert summary["chosen_on"] == {"in_domain": "validation"}
    compute = summary["compute_matched"]
    assert compute["tokens"] == 500
    assert compute["methods"]["sft"]["in_domain"]["mean"] == pytest.approx(0.5)  # sft lr=0.1 at step 10
    assert compute["methods"]["idft"]["in_domain"]["mean"] == pytest.approx(0.8)  # idft's last checkpoint
    text = (tmp_path / "frontier.md").read_text()
    assert "chosen on the validation draws" in text and "## Compute-matched: after 500 training tokens" in text
    assert "| sft | lr=0.1 | 50.0 [50.0, 50.0] | 60.0 [60.0, 60.0] |" in text
    assert "validation_in_domain" in (tmp_path / "curves.csv").read_text().splitlines()[0]
    # KL drift at matched skill: read where in-domain reaches 50% (step 10 here), at the retention reading's lr.
    drift = summary["drift"]
    assert drift["methods"]["sft"]["setting"] == "lr=0.1"
    assert drift["methods"]["sft"]["interval"]["mean"] == pytest.approx(0.1)
    assert drift["methods"]["idft"]["interval"]["mean"] == pytest.approx(0.45)
    assert drift["contrasts"][0]["difference"]["mean"] == pytest.approx(0.35)  # (0.2 + 0.5) / 2
    assert "## KL drift at matched skill (in-domain 50%)" in text and "| idft | sft | +0.350 [+0.200, +0.500] |" in text
    # Without validation draws the choice falls back to the test readings, and the report says so.
    for c in cells:
        for p in c["curve"]:
            p.pop("validation_in_domain"), p.pop("validation_retention")
    summary = write_frontier(exp, {"in_domain": 0.0, "retention": 0.9}, cells, {}, tmp_path)["summary"]
    assert summary["methods"]["sft"]["matched"]["in_domain"]["setting"] == "lr=0.4"
    assert "chosen on these test readings themselves" in (tmp_path / "frontier.md").read_text()
