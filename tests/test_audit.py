"""`onsft audit`: scores that do not depend on batching, calibration on the model's own samples,
the command end to end, one-line user errors, resuming after a kill, and two processes = one."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onsft import cli
from onsft.data.rows import Example, load_examples
from onsft.engine import scoring
from onsft.engine.decoding import sample_own
from onsft.engine.scoring import Item, Scorer, encode_items
from onsft.formulas import ddt
from onsft.runtime.records import partial_rows
from tiny import tiny_tokenizer, untied_model

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ROWS = [
    {"id": i, "prompt": f"What is {i} plus {i + 2}?", "completion": f"It is {2 * i + 2}." * (1 + i % 3), "extra": [i]}
    for i in range(9)
] + [
    {
        "id": 9,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue, like the sky at noon."},
        ],
        "extra": None,
    }
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny models (seeds 0 and 1) saved with the local tokenizer, and a small dataset."""
    folder = tmp_path_factory.mktemp("audit")
    tokenizer = tiny_tokenizer()
    for seed in (0, 1):
        model = untied_model(seed, head_std=0.5)
        model.save_pretrained(folder / f"model{seed}")
        tokenizer.save_pretrained(folder / f"model{seed}")
    write_jsonl(folder / "data.jsonl", ROWS)
    write_jsonl(folder / "other.jsonl", [{"prompt": r["prompt"], "completion": "zzzz qqqq"} for r in ROWS[:6]])
    return folder


def run(args, capsys) -> tuple[int, str]:
    code = cli.main(["audit", "--progress", "false", *map(str, args)])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------- scoring


def test_scores_do_not_depend_on_padding_batching_or_head_path():
    tokenizer, model = tiny_tokenizer(), untied_model(0, head_std=0.5)
    examples = [
        Example(
            index=i, line=i + 1, record=r, prompt=[{"role": "user", "content": r["prompt"]}], response=r["completion"]
        )
        for i, r in enumerate(ROWS[:9])
    ]
    items, _ = encode_items(tokenizer, examples, max_length=200)
    assert len({len(it.ids) for it in items}) > 3  # varied lengths, so batches really pad
    alone = Scorer(model, [1.0, 0.7], batch_size=1)
    batched = Scorer(model, [1.0, 0.7], batch_size=8, max_batch_tokens=10_000, vocab_chunk=7, row_chunk=5)
    full_logits = Scorer(model, [1.0, 0.7], batch_size=4)
    full_logits.head = None  # the fallback path: model(...).logits
    results = []
    for scorer in (alone, batched, full_logits):
        by_index = {}
        for batch, rows, phis in scorer.iter_scored(items):
            for i, row, phi in zip(batch, rows, phis):
                by_index[items[i].index] = (row, phi)
        results.append(by_index)
    for index in results[0]:
        reference_row, reference_phi = results[0][index]
        for other in results[1:]:
            row, phi = other[index]
            assert row.keys() == reference_row.keys()
            for key, value in reference_row.items():
                assert abs(float(row[key]) - float(value)) <= 1e-5 * max(1.0, abs(float(value))), key
            assert torch.allclose(phi, reference_phi, atol=1e-5)
    # Response positions: the scored tokens are exactly the response, checked against full float64 logits.
    item = items[4]
    with torch.no_grad():
        logits = model(torch.tensor([item.ids])).logits[0].double()
    expected = ddt.token_stats(logits[item.prompt_length - 1 : -1], torch.tensor(item.ids[item.prompt_length :]))
    assert torch.allclose(results[1][item.index][1].double(), expected.phi, atol=1e-5)
    assert results[1][item.index][0]["n_tokens"] == len(item.ids) - item.prompt_length


def test_own_samples_are_calibrated_and_another_models_text_is_not():
    tokenizer = tiny_tokenizer()
    own, other = untied_model(0, head_std=0.5), untied_model(1, head_std=0.5)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"question {i}"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        for i in range(20)
    ]
    prompts = [prompts[i % 20] for i in range(200)]
    scorer = Scorer(own, [1.0], batch_size=64, max_batch_tokens=100_000)

    def scores_of(model):
        samples = sample_own(model, tokenizer, prompts, max_new_tokens=30, seed=0)
        items = [Item(i, p + s.token_ids, len(p)) for i, (p, s) in enumerate(zip(prompts, samples))]
        return [row for _, rows, _ in scorer.iter_scored(items) for row in rows]

    rows = scores_of(own)
    n_tokens = sum(r["n_tokens"] for r in rows)
    assert n_tokens > 4000
    # Token-weighted mean phi within 3 standard errors of 0 (its s.e. is sqrt(sum Var) / tokens)...
    mean_phi = sum(r["sum_phi"] for r in rows) / n_tokens
    standard_error = math.sqrt(sum(r["sum_var"] for r in rows)) / n_tokens
    assert abs(mean_phi) < 3 * standard_error, (mean_phi, standard_error)
    # ...and per response too.
    per_response = [r["mean_phi"] for r in rows]
    assert abs(statistics.fmean(per_response)) < 3 * statistics.stdev(per_response) / math.sqrt(len(rows))
    z = [r["z"] for r in rows]
    assert 0.8 <= statistics.pstdev(z) <= 1.25, statistics.pstdev(z)
    assert abs(statistics.fmean(z)) < 3 / math.sqrt(len(z))
    assert 0.02 <= sum(r["p_value"] < 0.05 for r in rows) / len(rows) <= 0.1  # the stated false-alarm rate

    foreign = scores_of(other)
    assert sum(r["sum_phi"] for r in foreign) / sum(r["n_tokens"] for r in foreign) < -1.0
    assert sum(r["p_value"] < 0.05 for r in foreign) / len(foreign) > 0.9
    assert sum(r["ood"] for r in foreign) / len(foreign) > 0.9


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(
        [
            "--model",
            saved / "model0",
            "--data",
            saved / "data.jsonl",
            "--out",
            out,
            "--tau",
            "1.0",
            "0.7",
            "--self_check",
            6,
            "--self_check_max_new_tokens",
            8,
            "--keep",
            "out",
            "--keep_by",
            "pvalue",
            "--alpha",
            "0.01",
            "--per_token",
            "--compare_data",
            saved / "other.jsonl",
            "--compare_model",
            saved / "model1",
            "--worst",
            3,
        ],
        capsys,
    )
    assert code == 0, err
    for name in (
        "scores.jsonl",
        "self_check.jsonl",
        "compare_scores.jsonl",
        "kept.jsonl",
        "summary.json",
        "report.html",
        "plots/mean_phi.png",
        "plots/token_phi.png",
        "plots/phi_by_position.png",
        "plots/z_calibration.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.partial"))

    scores = rows_of(out / "scores.jsonl")
    assert [r["id"] for r in scores] == list(range(10))
    for row, source in zip(scores, ROWS):
        assert {k: row[k] for k in source} == source  # every input field kept as it was
        assert row["n_tokens"] == len(row["tokens"]) == len(row["token_phi"])
        response = source["completion"] if "completion" in source else source["messages"][-1]["content"]
        assert "".join(row["tokens"]) == response + "<eos>"  # exactly the response tokens were scored
        assert abs(statistics.fmean(row["token_phi"]) - row["mean_phi"]) < 1e-4
        assert row["p_value"] == pytest.approx(0.5 * math.erfc(-row["z"] / math.sqrt(2)), abs=1e-6)
        assert row["ood"] == (row["mean_phi"] < -0.1)
        assert {"z_tau0.7", "mean_phi_tau0.7", "p_value_tau0.7"} <= row.keys()
        assert "_index" not in row and "_token_phi" not in row
    kept = rows_of(out / "kept.jsonl")
    assert kept == [r for r in scores if r["p_value"] < 0.01]

    own = rows_of(out / "self_check.jsonl")
    assert len(own) == 6 and all(1 <= r["n_tokens"] <= 8 for r in own)
    assert load_examples(out / "self_check.jsonl")  # the samples are themselves a valid dataset
    compared = rows_of(out / "compare_scores.jsonl")
    assert len(compared) == 6 and compared[0]["completion"] == "zzzz qqqq"

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"scores", "self_check", "compare_scores"}
    main = summary["sets"]["scores"]
    assert main["n_responses"] == 10 and main["n_tokens"] == sum(r["n_tokens"] for r in scores)
    assert main["mean_phi_token_weighted"] == pytest.approx(
        sum(r["sum_phi"] for r in scores) / main["n_tokens"], abs=1e-9
    )
    assert main["fraction_ood"] == pytest.approx(sum(r["ood"] for r in scores) / 10)
    assert main["z_std"] == pytest.approx(statistics.pstdev([r["z"] for r in scores]), abs=1e-9)
    assert summary["kept"] == {"keep": "out", "by": "pvalue", "rows": len(kept), "of": 10}
    assert "0.7" in main["by_tau"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert page.count('class="tok"') >= 3 and "model's own samples" in page


BAD_INPUTS = {
    "malformed_json": (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], {}, "data.jsonl:2:"),
    "missing_column": ([{"question": "a", "completion": "b"}], {}, "data.jsonl:1:"),
    "empty_response": ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}], {}, "data.jsonl:2:"),
    "unknown_model": ([{"prompt": "a", "completion": "b"}], {"model": "no-such-model-anywhere"}, "no-such-model"),
    "overlong_row": (
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b" * 80}],
        {"max_length": 40},
        "data.jsonl:2:",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, saved, tmp_path, capsys):
    rows, overrides, where = BAD_INPUTS[case]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    args = {"model": saved / "model0", "data": data, "out": out, **overrides}
    code, err = run([x for k, v in args.items() for x in (f"--{k}", v)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("onsft: error:") and where in err, err
    assert "Fix:" in err
    assert not out.exists()


def test_resume_after_kill_gives_the_same_output(saved, tmp_path, capsys, monkeypatch):
    args = ["--model", saved / "model0", "--data", saved / "data.jsonl", "--score_batch_size", 2]
    code, err = run([*args, "--out", tmp_path / "reference"], capsys)
    assert code == 0, err

    out = tmp_path / "resumed"
    calls = []
    real_score = scoring.Scorer.score

    def killed_on_third_batch(self, items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between two writes) leaves behind
        return real_score(self, items)

    monkeypatch.setattr(scoring.Scorer, "score", killed_on_third_batch)
    assert run([*args, "--out", out], capsys)[0] == 130
    partial = out / "scores.jsonl.partial"
    assert not (out / "scores.jsonl").exists() and len(partial_rows(partial.read_text().splitlines()[1:])) == 4
    with open(partial, "a") as handle:
        handle.write('{"_index": 7, "id": 7, "mean_ph')  # a torn last line, as SIGKILL mid-write leaves
    # Different settings must not be mixed into the unfinished run.
    code, err = run([*args, "--out", out, "--tau", "0.5"], capsys)
    assert code == 2 and "different settings" in err

    calls.clear()
    monkeypatch.setattr(
        scoring.Scorer, "score", lambda self, items: (calls.append(len(items)), real_score(self, items))[1]
    )
    code, err = run([*args, "--out", out], capsys)
    assert code == 0, err
    assert sum(calls) == 10 - 4  # only the rows not already done were scored
    assert [line for line in err.splitlines() if "resuming" in line] == [
        f"onsft audit: resuming: 4 of 10 done ({partial})"
    ]
    assert (out / "scores.jsonl").read_bytes() == (tmp_path / "reference" / "scores.jsonl").read_bytes()
    assert not partial.exists()


def test_two_processes_give_the_same_scores_as_one(saved, tmp_path, capsys):
    args = [
        "--model",
        saved / "model0",
        "--data",
        saved / "data.jsonl",
        "--score_batch_size",
        3,
        "--self_check",
        7,
        "--self_check_max_new_tokens",
        10,
        "--tau",
        "1.0",
        "0.8",
    ]
    code, err = run([*args, "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "onsft.cli",
        "audit",
        "--progress",
        "false",
        *map(str, args),
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp_path / "two").glob("*.partial"))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    for name in ("scores.jsonl", "self_check.jsonl"):
        one, two = rows_of(tmp_path / "one" / name), rows_of(tmp_path / "two" / name)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float):
                    assert abs(value - b[key]) <= 1e-5 * max(1.0, abs(value)), (name, key)
                else:
                    assert value == b[key], (name, key)
