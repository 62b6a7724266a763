"""reasoning-gym data source: deterministic rows, columns, references, task scorers vs math-verify, CLI."""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from onsft.cli import main  # noqa: E402
from onsft.data import gym, gym_references  # noqa: E402
from onsft.data.rows import load_examples  # noqa: E402
from onsft.data.verify import get_verifier  # noqa: E402
from onsft.errors import UserError  # noqa: E402
from onsft.pipeline.compare.experiment_data import materialize  # noqa: E402
from onsft.pipeline.data.stage import parse_options  # noqa: E402
from onsft.pipeline.rewrite.rewrite_summary import train_rows  # noqa: E402

SIMPLE = {"max_terms": 3, "max_digits": 2}  # chain_sum small enough for a small model
MATH = get_verifier("math", timeout_seconds=2)


def test_rows_are_deterministic_for_a_seed_and_grow_by_appending():
    a = gym.gym_rows("gsm_symbolic", 12, seed=3)
    assert a == gym.gym_rows("gsm_symbolic", 12, seed=3)
    assert gym.gym_rows("gsm_symbolic", 5, seed=3) == a[:5]
    other = gym.gym_rows("gsm_symbolic", 12, seed=4)
    assert [r["prompt"] for r in other] != [r["prompt"] for r in a]
    assert len({r["id"] for r in a}) == 12
    c = gym.gym_rows("chain_sum", 8, seed=1, options=SIMPLE)
    assert c == gym.gym_rows("chain_sum", 8, seed=1, options=SIMPLE)


def test_gsm_symbolic_columns_and_reference():
    rows = gym.gym_rows("gsm_symbolic", 20, seed=0)
    for i, row in enumerate(rows):
        assert set(row) == {"id", "task", "prompt", "answer", "reference", "completion", "reference_source", "metadata"}
        assert row["id"] == f"gsm_symbolic-0-{i}" and row["task"] == "gsm_symbolic"
        assert row["prompt"].endswith("\n\n" + gym.BOXED_INSTRUCTION)
        assert row["reference"] == row["completion"] and row["reference_source"] == "task"
        cot = row["metadata"]["answer_cot"]
        # The worked solution is the task's own, its `#### X` line replaced by the boxed gold answer.
        assert cot.strip().splitlines()[-1].startswith("####")
        body = "\n".join(cot.strip().splitlines()[:-1]).rstrip()
        assert row["reference"] == f"{body}\nThe final answer is \\boxed{{{row['answer']}}}."
        assert "####" not in row["reference"]
    raw = gym.gym_rows("gsm_symbolic", 3, seed=0, answer_format="raw", metadata=False)
    for r, b in zip(raw, rows):
        assert "metadata" not in r and gym.BOXED_INSTRUCTION not in r["prompt"]
        assert r["reference"] == b["metadata"]["answer_cot"].strip()


def test_chain_sum_reference_is_a_correct_running_sum():
    rows = gym.gym_rows("chain_sum", 30, seed=2, options=SIMPLE)
    for row in rows:
        assert row["reference_source"] == "derived"
        *steps, final = row["reference"].splitlines()
        assert final == f"The final answer is \\boxed{{{row['answer']}}}."
        terms = re.findall(r"-?\d+|[+-]", row["metadata"]["expression"].replace(" ", ""))
        assert len(steps) == row["metadata"]["num_terms"] - 1
        total = int(terms[0])
        for step in steps:
            a, op, b, c = re.fullmatch(r"(-?\d+) ([+-]) (\d+) = (-?\d+)", step).groups()
            assert int(a) == total and int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            total = int(c)
        assert str(total) == row["answer"]
    assert gym.chain_sum_reference("3 + -4", "-1") is None  # negated terms: no reference rather than a wrong one


def test_gcd_reference_is_the_euclidean_algorithm_and_reaches_the_gold_answer():
    rows = gym.gym_rows("gcd", 40, seed=3, options={"max_value": 100})
    for row in rows:
        assert row["reference_source"] == "derived"
        *steps, conclusion, final = row["reference"].splitlines()
        assert final == f"The final answer is \\boxed{{{row['answer']}}}."
        a, b = sorted(row["metadata"]["numbers"], reverse=True)
        for step in steps:  # every line a = q * b + r is true and continues the previous one
            x, q, y, r = map(int, re.fullmatch(r"(\d+) = (\d+) \* (\d+) \+ (\d+)", step).groups())
            assert (x, y) == (a, b) and x == q * y + r and 0 <= r < y
            a, b = b, r
        assert b == 0 and str(a) == row["answer"] and conclusion.endswith(f"GCD is {a}.")
    assert gym_references.gcd_reference([12, 8], "5") is None  # steps that miss the gold answer: no reference
    assert gym_references.gcd_reference([12, 8, 4], "4") is None  # three numbers: not this layout


def test_leg_counting_reference_counts_each_animal_then_sums():
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    rows = gym.gym_rows("leg_counting", 40, seed=3, options={"min_animals": 1, "max_animals": 3, "max_instances": 5})
    for row in rows:
        lines = row["reference"].splitlines()
        animals = row["metadata"]["animals"]
        totals = []
        for line, (name, count) in zip(lines, animals.items()):
            n, k, legs, total = map(int, re.fullmatch(r"(\d+) .+ (\d+) \* (\d+) = (\d+) legs\.", line).groups())
            assert n == k == count and legs == ANIMALS[name] and total == n * legs
            totals.append(total)
        assert sum(totals) == int(row["answer"])
        assert lines[-1] == f"The final answer is \\boxed{{{row['answer']}}}."
        assert (len(lines) == len(animals) + 1) == (len(animals) == 1)  # a sum line only for several kinds
    assert gym_references.leg_counting_reference({"cat": 2}, {"cat": 4}, "9") is None


def test_tasks_without_a_worked_solution_have_no_reference():
    for row in gym.gym_rows("basic_arithmetic", 5, seed=0):
        assert {"reference", "completion", "reference_source"}.isdisjoint(row)
        assert row["answer"] and row["task"] == "basic_arithmetic"


@pytest.mark.parametrize(
    "task, options", [("gsm_symbolic", {}), ("chain_sum", SIMPLE), ("basic_arithmetic", {"max_digits": 2})]
)
def test_task_scorer_and_math_verify_agree_on_gold_and_wrong_answers(task, options):
    score = get_verifier(f"onsft.data.gym:score_{task}")
    for row in gym.gym_rows(task, 25, seed=5, options=options):
        gold = row["answer"]
        assert score.check(f"\\boxed{{{gold}}}", gold).score == 1.0
        assert MATH(f"\\boxed{{{gold}}}", gold)
        if "reference" in row:  # the references verify under both, so they are usable training data
            assert score(row["reference"], gold) and MATH(row["reference"], gold)
        wrong = str(int(float(gold)) + 1)
        assert not score(f"\\boxed{{{wrong}}}", gold) and not MATH(f"\\boxed{{{wrong}}}", gold)


def test_gsm_gold_matches_the_number_the_solution_writes():
    # Some solutions end `#### 8.0` for a gold `8`: both verifiers must accept that spelling too.
    score = gym.scorer("gsm_symbolic")
    rows = gym.gym_rows("gsm_symbolic", 400, seed=0)
    decimal = [r for r in rows if r["metadata"]["answer_cot"].strip().splitlines()[-1].endswith(".0")]
    assert decimal, "seed 0 has no `#### X.0` solution any more; pick another seed"
    for row in decimal:
        written = row["metadata"]["answer_cot"].strip().splitlines()[-1].removeprefix("####").strip()
        assert written != row["answer"]
        assert score(f"\\boxed{{{written}}}", row["answer"]) == 1.0 and MATH(f"\\boxed{{{written}}}", row["answer"])


def test_answer_extraction_order():
    assert gym.extract_answer("<answer>1</answer> so \\boxed{2}") == "2"
    assert gym.extract_answer("<answer>1</answer> then <answer> 3 </answer>") == "3"
    assert gym.extract_answer("work\n#### 42") == "42"
    assert gym.extract_answer("The answer is 9") == "9"
    assert gym.extract_answer("  17 \n") == "17"
    assert gym.extract_answer("\\boxed{\\text{5 days}}") == "5 days"


def test_verifier_specs_and_errors():
    assert gym.score_chain_sum("\\boxed{5}", "5") == 1.0  # resolved on first access, then a module attribute
    with pytest.raises(UserError, match="score_<task>"):
        get_verifier("onsft.data.gym:score")
    with pytest.raises(UserError, match="unknown reasoning-gym task"):
        get_verifier("onsft.data.gym:score_no_such_task")
    # countdown's answer is any expression reaching a target: scoring needs the row's metadata.
    assert gym.needs_metadata("countdown") and not gym.needs_metadata("gsm_symbolic")
    with pytest.raises(UserError, match="metadata"):
        gym.scorer("countdown")
    row = gym.gym_rows("countdown", 1, seed=0)[0]
    assert gym.score_row(f"<answer>{row['answer']}</answer>", row) == 1.0
    assert gym.score_row("<answer>1+1</answer>", row) < 0.5
    with pytest.raises(AttributeError):
        gym.not_a_function  # noqa: B018


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="no option `max_termz`"):
        gym.gym_rows("chain_sum", 3, options={"max_termz": 3})
    with pytest.raises(UserError, match="rejects these settings"):
        gym.gym_rows("chain_sum", 3, options={"min_terms": 5, "max_terms": 2})
    with pytest.raises(UserError, match="did you mean gsm_symbolic"):
        gym.gym_rows("gsm", 3)
    with pytest.raises(UserError, match="size"):
        gym.gym_rows("chain_sum", 0)
    with pytest.raises(UserError, match="answer format"):
        gym.gym_rows("chain_sum", 1, answer_format="latex")


def test_parse_options_reads_yaml_scalars():
    assert parse_options(["a=3", "b=0.5", "c=true", "d=word", "e=[1, 2]"]) == {
        "a": 3,
        "b": 0.5,
        "c": True,
        "d": "word",
        "e": [1, 2],
    }
    with pytest.raises(UserError):
        parse_options(["novalue"])


def test_cli_gym_export_loads_as_training_data(tmp_path, capsys):
    out = tmp_path / "gsm.jsonl"
    assert main(["data", "gym", "--task", "gsm_symbolic", "--size", "6", "--seed", "7", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == gym.gym_rows("gsm_symbolic", 6, seed=7)
    examples = load_examples(out, require_answer=True, require_reference=True)
    assert [e.response for e in examples] == [r["reference"] for r in rows]
    assert examples[0].prompt == [{"role": "user", "content": rows[0]["prompt"]}]
    chain = tmp_path / "chain.jsonl"
    assert (
        main(
            [
                "data",
                "gym",
                "--task",
                "chain_sum",
                "--size",
                "4",
                "--options",
                "max_terms=3",
                "max_digits=2",
                "--out",
                str(chain),
            ]
        )
        == 0
    )
    assert [json.loads(x) for x in chain.read_text().splitlines()] == gym.gym_rows("chain_sum", 4, options=SIMPLE)
    assert "6 rows of gsm_symbolic (6 with a reference)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "nope", "--size", "2"], "unknown reasoning-gym task"),
        (["--task", "chain_sum", "--options", "max_termz=1"], "no option"),
        (["--task", "chain_sum", "--sise", "3"], "unknown option"),
    ],
)
def test_cli_gym_bad_input_exits_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "x.jsonl"
    assert main(["data", "gym", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_organism_writes_the_demo_data(tmp_path):
    from onsft.organism.tasks import write_demo_data

    sizes = ["--n_train", "20", "--n_test", "5", "--n_ood", "5", "--n_retention", "5"]
    assert main(["data", "organism", "--out", str(tmp_path / "a"), "--seed", "3", *sizes]) == 0
    expected = write_demo_data(tmp_path / "b", seed=3, n_train=20, n_test=5, n_ood=5, n_retention=5)
    for name, path in expected.items():
        assert (tmp_path / "a" / path.name).read_text() == path.read_text(), name
    assert main(["data", "nothing"]) == 2


def test_experiment_gym_data_and_rewrite_pipeline_rows(tmp_path):
    # The study's data as an experiment's gym draws (onsft.pipeline.compare.experiment_data), e.g. smollm2-gym.yaml's.
    values = {
        "train_data": [
            {"gym": "gsm_symbolic", "size": 6, "seed": 0},
            {"gym": "chain_sum", "size": 6, "seed": 0, "options": SIMPLE},
        ],
        "test_task": {"gym": "gsm_symbolic", "size": 5, "seed": 1, "exclude": "train_data"},
        "test_simple": {"gym": "chain_sum", "size": 5, "seed": 1, "options": SIMPLE, "exclude": "train_data"},
        "retention": {"gym": "products", "size": 4, "seed": 2, "options": {"max_digits": 1}},
    }

    def make_data(folder):
        paths = materialize(values, folder)
        return {key: [json.loads(line) for line in Path(path).read_text().splitlines()] for key, path in paths.items()}

    data = make_data(tmp_path / "a")
    assert [len(data[k]) for k in ("train_data", "test_task", "test_simple", "retention")] == [12, 5, 5, 4]
    assert all(r["reference"] == r["completion"] for r in data["train_data"])
    train_prompts = {r["prompt"] for r in data["train_data"]}
    assert not train_prompts & {r["prompt"] for k in ("test_task", "test_simple") for r in data[k]}
    assert data == make_data(tmp_path / "b")
    rows = data["train_data"][:3]
    # The rewrite pipeline's records (onsft.pipeline.rewrite.rewriting): row 0 had a correct own sample, row 1 a
    # verified rewrite, row 2 neither.
    records = [
        {**rows[0], "provenance": "own", "verified": True, "response": "mine", "mean_phi": None},
        {**rows[1], "provenance": "hinted", "verified": True, "response": "r1", "mean_phi": None},
        {**rows[2], "provenance": "dropped", "verified": False, "response": "r2", "mean_phi": None},
    ]
    kept = train_rows(records)
    # own-correct first, then a verified rewrite, and nothing for a row with neither
    assert [(k["completion"], k["provenance"]) for k in kept] == [("mine", "own"), ("r1", "hinted")]
    assert [k["id"] for k in kept] == [rows[0]["id"], rows[1]["id"]]
