"""`onsft rewrite`: provenance logic (own / hinted / dropped) with a scripted verifier, scores against
float64 logits, hint templates, the command end to end, one-line errors with no output, resuming after
a simulated kill and after a real SIGKILL, two processes = one, and the organism's rewrites."""

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onsft import cli
from onsft.data.chat import encode_prompt, encode_response
from onsft.data.rows import load_examples, parse_example
from onsft.engine.hinted import HintedConfig
from onsft.errors import UserError
from onsft.formulas import ddt
from onsft.pipeline.rewrite import hint_profiles, hint_prompts, rewrite_config, rewrite_summary, rewriting
from onsft.runtime.models import load_model, load_tokenizer, read_model_info
from onsft.runtime.records import partial_rows
from tiny import tiny_model, tiny_tokenizer, untied_model

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = ROOT / "src" / "onsft" / "organism" / "model"


ROWS = [
    {
        "id": i,
        "prompt": f"What is {i} + {i}?",
        "answer": f"a{i}",
        "reference": f"{i} + {i} = \\boxed{{{2 * i}}}",
        "extra": [i],
    }
    for i in range(24)
]
# Correct iff a hash of (response, answer) says so: a deterministic mix of own / hinted / dropped rows.
VERIFIER = (
    "import hashlib\n\ndef check(response, answer):\n"
    "    return hashlib.sha256((response + answer).encode()).digest()[0] % 3 == 0\n"
)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewrite")
    untied_model().save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    write_jsonl(folder / "data.jsonl", ROWS[:10])
    write_jsonl(folder / "long.jsonl", ROWS)
    (folder / "verify.py").write_text(VERIFIER)
    return folder


def base_args(saved, data="data.jsonl"):
    return [
        "--model",
        saved / "model",
        "--data",
        saved / data,
        "--verifier",
        f"{saved / 'verify.py'}:check",
        "--max_new_tokens",
        10,
        "--own_samples",
        2,
        "--samples_per_prompt",
        2,
        "--beta_ladder",
        "1,3",
        "--chunk_size",
        3,
        # The random tiny model rarely ends a response within 10 tokens: keep cut responses (see
        # test_truncated_responses_are_dropped_unless_asked_for).
        "--keep_truncated",
        "true",
    ]


def run(args, capsys) -> tuple[int, str]:
    code = cli.main(["rewrite", "--progress", "false", *map(str, args)])
    return code, capsys.readouterr().err


def resolve_hint(config: rewriting.RewriteConfig, info: dict, hinted: HintedConfig | None = None, profile=None):
    """The hint settings a rewrite with these settings uses (the answer marker and beta are HintedConfig's)."""
    hinted = hinted or HintedConfig()
    return config.hint(hinted, info, profile)


# ------------------------------------------------------------------------------------------ templates


def test_hint_template_filling_and_messages():
    hint = hint_prompts.HintSettings("Q: {question}\nR: {reference} \\boxed{}", "SYS", "\\boxed{", "flag")
    # One pass: a question that itself says "{reference}" is not expanded; other braces (LaTeX) stay.
    assert hint_prompts.fill_hint(hint.template, "say {reference}", "x^{2}") == "Q: say {reference}\nR: x^{2} \\boxed{}"
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert hint_prompts.hinted_messages(prompt, "4", hint) == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Q: Be brief.\n\nWhat is 2+2?\nR: 4 \\boxed{}"},
    ]
    no_system = hint_prompts.HintSettings("{question}|{reference}", "", "", "flag")
    assert hint_prompts.hinted_messages([{"role": "user", "content": "q"}], "r", no_system) == [
        {"role": "user", "content": "q|r"}
    ]

    config = rewriting.RewriteConfig(data="d")
    organism_info = {"hint_template": "Rewrite.\n{question}\nReference: {reference}", "answer_marker": "@"}
    assert resolve_hint(config, organism_info) == hint_prompts.HintSettings(
        organism_info["hint_template"], "", "@", "onsft.json"
    )  # the learned format, no system turn added
    assert resolve_hint(config, {}) == hint_prompts.HintSettings(
        hint_prompts.DEFAULT_HINT_TEMPLATE, hint_prompts.DEFAULT_HINT_SYSTEM, "\\boxed{", "default"
    )
    analyze = rewriting.RewriteConfig(data="d", analyze_first=True)
    assert "# CoT" in resolve_hint(analyze, {}).system
    flags = rewriting.RewriteConfig(data="d", hint_template="{reference} / {question}", hint_system="")
    assert resolve_hint(flags, organism_info, HintedConfig(answer_marker="")) == hint_prompts.HintSettings(
        "{reference} / {question}", "", "", "flag"
    )
    with pytest.raises(UserError, match="no {reference} placeholder"):
        resolve_hint(rewriting.RewriteConfig(data="d", hint_template="{question} only"), {})


SMOLLM2 = hint_profiles.PROFILES[0]


def test_rewrite_profiles_are_found_by_name_path_or_chat_template():
    assert hint_profiles.find_profile(["smollm2-135m"], None) is SMOLLM2
    assert hint_profiles.find_profile(["HuggingFaceTB/SmolLM2-360M-Instruct"], None) is SMOLLM2
    # A fine-tuned copy in a folder of any name keeps its family's chat template.
    template = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
    assert hint_profiles.find_profile(["runs/idft/model", ""], template) is SMOLLM2
    assert hint_profiles.find_profile(["Qwen/Qwen2.5-1.5B-Instruct"], "<|im_start|>system\nYou are Qwen") is None
    # The organism and the tests' tiny models have no profile: their rewrites are as before.
    assert hint_profiles.model_profile("organism", tokenizer=load_tokenizer("organism")) is None
    assert hint_profiles.model_profile("tiny", tiny_model().config, tiny_tokenizer()) is None


def test_restate_form_is_the_plain_prompt_with_the_reference_as_an_earlier_answer():
    config = rewriting.RewriteConfig(data="d")
    hint = resolve_hint(config, {}, profile=SMOLLM2)
    assert hint == hint_prompts.HintSettings(
        hint_prompts.DEFAULT_HINT_TEMPLATE,
        "",
        "\\boxed{|answer is",
        "profile:smollm2",
        "restate",
        SMOLLM2.followup,
        1.0,
        True,
    )
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert hint_prompts.hinted_messages(prompt, "2+2 = 4", hint) == [
        *prompt,
        {"role": "assistant", "content": "2+2 = 4"},
        {"role": "user", "content": SMOLLM2.followup},
    ]
    # A hint system text replaces the prompt's own system turn.
    own = dataclasses.replace(hint, system="SYS")
    assert hint_prompts.hinted_messages(prompt, "4", own)[:2] == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    # Flags win over the profile: a beta, a marker, a follow-up, letting the hinted context stop.
    flagged = rewriting.RewriteConfig(data="d", hint_followup="Again.")
    hinted = HintedConfig(beta=2.5, answer_marker="@", marker_before_stop=False)
    got = resolve_hint(flagged, {}, hinted, profile=SMOLLM2)
    assert (got.form, got.followup, got.beta, got.answer_marker) == ("restate", "Again.", 2.5, "@")
    assert got.marker_before_stop is False
    # So do a template or system text of one's own, the model's onsft.json, and --hint_form instruction.
    for cfg, info in [
        (rewriting.RewriteConfig(data="d", hint_template="{question} {reference}"), {}),
        (rewriting.RewriteConfig(data="d", hint_system="S"), {}),
        (config, {"hint_template": "{question}/{reference}"}),
        (rewriting.RewriteConfig(data="d", hint_form="instruction"), {}),
    ]:
        got = resolve_hint(cfg, info, profile=SMOLLM2)
        assert got.form == "instruction" and not got.source.startswith("profile") and got.beta is None
        assert got.marker_before_stop is False
    # The restate form without a profile: the default follow-up, the plain system turn, \\boxed{, beta default.
    plain = resolve_hint(rewriting.RewriteConfig(data="d", hint_form="restate"), {})
    assert (plain.form, plain.system, plain.answer_marker, plain.beta) == ("restate", "", "\\boxed{", None)
    with pytest.raises(UserError, match="follow-up"):
        resolve_hint(rewriting.RewriteConfig(data="d", hint_form="restate", hint_followup=" "), {})


def test_marker_prefix_is_the_shortest_prefix_holding_the_marker():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("# Analyze\nok.\n# CoT\nsteps # CoT", add_special_tokens=False)["input_ids"]
    cut = rewriting.marker_prefix(tokenizer, ids, "# CoT")
    assert tokenizer.decode(ids[:cut]) == "# Analyze\nok.\n# CoT"
    assert rewriting.marker_prefix(tokenizer, ids[: cut - 1], "# CoT") is None


# ------------------------------------------------------------------------------------------ provenance


class Scripted:
    """A verifier that accepts given (answer, response) pairs and logs every call in order."""

    def __init__(self, accept=()):
        self.accept, self.calls = set(accept), []

    def __call__(self, response, answer):
        self.calls.append((answer, response))
        return (answer, response) in self.accept


def naive_mean_phi(model, tokenizer, prompt, text) -> float:
    """Mean phi of `text` after `prompt` from full float64 logits: the definition, not the streamed scorer."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = prompt_ids + encode_response(tokenizer, prompt, text, prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    stats = ddt.token_stats(logits[len(prompt_ids) - 1 : -1], torch.tensor(ids[len(prompt_ids) :]))
    return float(stats.phi.mean())


def test_provenance_own_hinted_dropped_with_a_scripted_verifier():
    model, tokenizer = untied_model(), tiny_tokenizer()
    rows = ROWS[:6]
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(rows)]
    k, tries = 2, 2
    config = rewriting.RewriteConfig(
        data="d", own_samples=k, samples_per_prompt=tries, chunk_size=6, keep_truncated=True, keep="first"
    )
    hinted_config = HintedConfig(max_new_tokens=10)

    def rewrite_with(verifier, **overrides):
        settings = rewriting.RewriteConfig(**{**config.__dict__, **overrides})
        return rewriting.rewrite_examples(model, tokenizer, examples, settings, hinted_config, verifier=verifier)

    # Pass A rejects everything: one chunk calls the verifier on the k own samples of every row (row
    # major), then on every row's hinted tries.
    first = Scripted()
    rewrite_with(first)
    own = [[first.calls[r * k + s][1] for s in range(k)] for r in range(6)]
    assert all(answer == f"a{r}" for r in range(6) for answer, _ in first.calls[r * k : (r + 1) * k])
    assert len(first.calls) == 6 * k + 6 * tries
    # Pass B accepts row 0's second own sample and row 1's first: only rows 2-5 are rewritten.
    accepted_own = {("a0", own[0][1]), ("a1", own[1][0])}
    second = Scripted(accepted_own)
    rewrite_with(second)
    assert second.calls[: 6 * k] == first.calls[: 6 * k]  # own samples do not depend on the verifier
    hinted = {r: [second.calls[6 * k + (r - 2) * tries + t][1] for t in range(tries)] for r in range(2, 6)}
    assert len(second.calls) == 6 * k + 4 * tries
    # Pass C also accepts row 2's first hinted try and row 3's second; rows 4 and 5 stay unverified.
    assert hinted[2][0] not in own[2] and hinted[3][1] not in own[3] and hinted[3][1] != hinted[3][0]
    third = Scripted(accepted_own | {("a2", hinted[2][0]), ("a3", hinted[3][1])})
    records = rewrite_with(third)
    assert len(third.calls) == 6 * k + 1 + 2 + 2 + 2  # row 2 stops after its verified first try

    assert [r["provenance"] for r in records] == ["own", "own", "hinted", "hinted", "dropped", "dropped"]
    assert [r["response"] for r in records] == [
        own[0][1],
        own[1][0],
        hinted[2][0],
        hinted[3][1],
        hinted[4][1],
        hinted[5][1],
    ]
    assert [r["verified"] for r in records] == [True, True, True, True, False, False]
    assert [r["hinted_tries"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert [r["own_correct"] for r in records] == [own[0].count(own[0][1]), own[1].count(own[1][0]), 0, 0, 0, 0]
    assert [r.get("drop_reason") for r in records] == [None] * 4 + ["not verified"] * 2
    for record, row in zip(records, rows):
        assert {key: record[key] for key in row} == row  # input fields untouched
        assert record["own_samples"] == k and (record["mean_lambda"] is None) == (record["provenance"] == "own")
        assert 1 <= record["n_tokens"] <= 10
    assert all(r["n_tokens"] <= r["generated_tokens"] <= k * 10 for r in records[:2])
    assert all(r["generated_tokens"] <= (k + tries) * 10 for r in records[2:])

    # Scores: the response's and the reference's mean phi under the plain context, against float64 logits.
    for record, example in zip(records, examples):
        assert record["mean_phi"] == pytest.approx(
            naive_mean_phi(model, tokenizer, example.prompt, record["response"]), abs=1e-4
        )
        assert record["reference_mean_phi"] == pytest.approx(
            naive_mean_phi(model, tokenizer, example.prompt, example.reference), abs=1e-4
        )
        assert record["p_value"] == pytest.approx(0.5 * math.erfc(-record["z"] / math.sqrt(2)), abs=1e-9)

    summary = rewrite_summary.summarize(records)
    assert (summary["own_correct"], summary["rewritten"], summary["dropped"], summary["kept"]) == (2, 2, 2, 4)
    assert summary["hinted_attempted"] == 4 and summary["hinted_success_rate"] == 0.5
    assert summary["mean_phi"]["rewritten"]["mean_phi"] == pytest.approx(
        (records[2]["mean_phi"] + records[3]["mean_phi"]) / 2
    )
    assert summary["mean_phi"]["references"]["mean_phi"] == pytest.approx(
        sum(r["reference_mean_phi"] for r in records) / 6
    )
    train = rewrite_summary.train_rows(records)
    assert [(t["prompt"], t["completion"], t["provenance"]) for t in train] == [
        (r["prompt"], r["response"], r["provenance"]) for r in records[:4]
    ]

    # keep_own false: verified own answers are counted but every prompt is rewritten.
    fourth = Scripted(third.accept)
    records = rewrite_with(fourth, keep_own=False)
    assert [r["own_correct"] > 0 for r in records] == [True, True, False, False, False, False]
    assert records[0]["provenance"] != "own" and records[0]["hinted_tries"] >= 1
    assert len(fourth.calls) > 6 * k + 7


def test_analyze_first_extends_the_hinted_context_or_drops_the_row():
    model, tokenizer = untied_model(), tiny_tokenizer()
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(ROWS[:3])]
    config = rewriting.RewriteConfig(
        data="d", own_samples=0, analyze_first=True, analyze_max_new_tokens=8, chunk_size=3, keep_truncated=True
    )
    hinted_config = HintedConfig(max_new_tokens=6)
    # A marker the random model cannot write: every row is dropped before hinted decoding.
    records = rewriting.rewrite_examples(
        model,
        tokenizer,
        examples,
        rewriting.RewriteConfig(**{**config.__dict__, "analyze_marker": "@@never@@"}),
        hinted_config,
        verifier=lambda r, a: True,
    )
    assert [r["drop_reason"] for r in records] == ["no analysis marker"] * 3
    assert all(r["response"] is None and len(r["analysis"]) > 0 for r in records)
    assert rewrite_summary.summarize(records)["hinted_attempted"] == 3
    # A one-character marker the analysis does contain: the text up to it joins the hinted context.
    analysis = records[0]["analysis"]
    marker = analysis[2]
    records = rewriting.rewrite_examples(
        model,
        tokenizer,
        examples,
        rewriting.RewriteConfig(**{**config.__dict__, "analyze_marker": marker}),
        hinted_config,
        verifier=lambda r, a: True,
    )
    assert records[0]["analysis"] == analysis[: analysis.index(marker) + 1]
    assert records[0]["provenance"] == "hinted" and records[0]["response"] is not None


def test_truncated_responses_are_dropped_unless_asked_for():
    """A verified response cut by the decoder (the token limit) is not a finished solution: not kept by
    default (own answers then go to hinted decoding, hinted ones are dropped as `truncated`), kept and marked
    with --keep_truncated; the finish reason is recorded as it was."""
    model, tokenizer = untied_model(), tiny_tokenizer()
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(ROWS[:8])]
    # Hinted tries end at a frequent character ('stop') or at the limit ('length'); own samples at the limit.
    hinted_config = HintedConfig(max_new_tokens=10, stop_strings=["`"])

    def rewrite_with(**overrides):
        config = rewriting.RewriteConfig(data="d", own_samples=2, chunk_size=8, **overrides)
        return rewriting.rewrite_examples(
            model, tokenizer, examples, config, hinted_config, verifier=lambda response, answer: True
        )

    records = rewrite_with()
    assert all(r["own_correct"] == 2 for r in records)  # verified, and counted, but cut: not kept
    reasons = [r["finish_reason"] for r in records]
    assert {"stop", "length"} <= set(reasons), reasons  # both cases occur on this data
    for record in records:
        ended = record["finish_reason"] in ("stop", "eos")
        assert (record["provenance"] != "dropped") == ended
        assert record["provenance"] != "own" or record["finish_reason"] == "eos"  # own samples have no stop string
        assert record["truncated"] is (not ended)
        assert record["response"].endswith("`") == (record["finish_reason"] == "stop")
        assert record.get("drop_reason") == (None if ended else "truncated")
    summary = rewrite_summary.summarize(records)
    assert summary["truncated"] == {"kept": 0, "dropped": reasons.count("length")}
    assert summary["drop_reasons"] == {"truncated": reasons.count("length")}
    assert len(rewrite_summary.train_rows(records)) == 8 - reasons.count("length")

    kept = rewrite_with(keep_truncated=True)
    assert [r["provenance"] for r in kept] == ["own"] * 8  # the first verified own sample, cut or not
    assert all(r["truncated"] is (r["finish_reason"] == "length") for r in kept)
    cut = sum(r["truncated"] for r in kept)
    assert cut >= 6 and rewrite_summary.summarize(kept)["truncated"] == {"kept": cut, "dropped": 0}


def test_step_check_flags_or_drops_responses_with_a_false_step(tmp_path):
    """--step_check flag keeps every verified row and lists its false steps; drop takes another verified try
    without one, or drops the row (`false step`); off checks nothing."""
    model, tokenizer = untied_model(), tiny_tokenizer()
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(ROWS[:8])]
    # A checker that calls any line holding a '7' false (frequent in the tiny model's text).
    (tmp_path / "steps.py").write_text(
        "def sevens(text):\n    return [line for line in text.splitlines() if '7' in line]\n"
    )

    def rewrite_with(mode):
        config = rewriting.RewriteConfig(
            data="d",
            own_samples=0,
            samples_per_prompt=2,
            keep="first",
            keep_truncated=True,
            chunk_size=8,
            step_check=mode,
            step_checker=f"{tmp_path / 'steps.py'}:sevens",
        )
        return rewriting.rewrite_examples(
            model, tokenizer, examples, config, HintedConfig(max_new_tokens=10), verifier=lambda r, a: True
        )

    flagged = rewrite_with("flag")
    assert [r["provenance"] for r in flagged] == ["hinted"] * 8 and all(r["hinted_tries"] == 1 for r in flagged)
    sevens = [r["response"] for r in flagged if "7" in r["response"]]
    assert 1 <= len(sevens) <= 6, sevens  # both cases occur
    for record in flagged:
        assert record["false_steps"] == [line for line in record["response"].splitlines() if "7" in line]
    summary = rewrite_summary.summarize(flagged)["step_check"]
    assert summary == {
        "rows_checked": 8,
        "steps_checked": summary["steps_checked"],
        "flagged": len(sevens),
        "dropped": 0,
    }
    train = rewrite_summary.train_rows(flagged)
    assert [t["false_steps"] for t in train] == [r["false_steps"] for r in flagged]

    dropped = rewrite_with("drop")
    for first, record in zip(flagged, dropped):
        if "7" not in first["response"]:
            assert record["response"] == first["response"] and record["hinted_tries"] == 1
        elif record["provenance"] == "hinted":  # the second try, sound
            assert record["hinted_tries"] == 2 and "7" not in record["response"] and record["false_steps"] == []
        else:
            assert record["drop_reason"] == "false step" and "7" in record["response"]
    reasons = [r.get("drop_reason") for r in dropped]
    assert rewrite_summary.summarize(dropped)["step_check"]["dropped"] == reasons.count("false step") >= 1
    assert rewrite_summary.summarize(dropped)["step_check"]["flagged"] == 0

    off = rewrite_with("off")
    assert [r["response"] for r in off] == [r["response"] for r in flagged]
    assert all(r["false_steps"] is None and r["steps_checked"] is None for r in off)
    assert "false_steps" not in rewrite_summary.train_rows(off)[0]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end_and_a_finished_rerun_does_nothing(saved, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run([*base_args(saved), "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["records.jsonl", "run.json", "summary.json", "train.jsonl"]
    records = rows_of(out / "records.jsonl")
    assert [r["id"] for r in records] == list(range(10))
    for record, row in zip(records, ROWS):
        assert {key: record[key] for key in row} == row
        assert set(rewrite_config.ADDED_FIELDS) - {"analysis", "drop_reason"} <= record.keys()
        assert record["provenance"] in rewrite_config.PROVENANCES
        assert record["verified"] == (record["provenance"] != "dropped")
    counts = {p: sum(r["provenance"] == p for r in records) for p in rewrite_config.PROVENANCES}
    assert min(counts.values()) >= 1, counts  # the hash verifier gives every outcome on this data

    train = rows_of(out / "train.jsonl")
    kept = [r for r in records if r["provenance"] != "dropped"]
    assert [(t["prompt"], t["completion"], t["id"]) for t in train] == [
        (r["prompt"], r["response"], r["id"]) for r in kept
    ]
    assert [e.response for e in load_examples(out / "train.jsonl")] == [r["response"] for r in kept]

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["own_correct"], summary["rewritten"], summary["dropped"]) == (
        counts["own"],
        counts["hinted"],
        counts["dropped"],
    )
    assert (
        summary["generated_tokens"]
        == summary["generated_tokens_this_run"]
        == sum(r["generated_tokens"] for r in records)
    )
    assert summary["tokens_per_second"] > 0 and summary["wall_seconds"] > 0
    assert summary["hint"]["source"] == "default" and summary["processes"] == 1

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run([*base_args(saved), "--out", out], capsys)
    assert code == 0 and "nothing to do" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A training file asked for elsewhere is written from the finished records, nothing decoded again.
    code, err = run([*base_args(saved), "--out", out, "--train_out", tmp_path / "elsewhere" / "kept.jsonl"], capsys)
    assert code == 0 and "nothing to do" in err
    assert (tmp_path / "elsewhere" / "kept.jsonl").read_bytes() == before["train.jsonl"]
    # A run recorded before --marker_before_stop existed is the same run with it off (the default here, or
    # given); turning it on is another run.
    recorded = json.loads((out / "run.json").read_text())
    del recorded["settings"]["hint"]["marker_before_stop"]
    (out / "run.json").write_text(json.dumps(recorded))
    for extra in ([], ["--marker_before_stop", "false"]):
        code, err = run([*base_args(saved), "--out", out, *extra], capsys)
        assert code == 0 and "nothing to do" in err
    code, err = run([*base_args(saved), "--out", out, "--marker_before_stop", "true"], capsys)
    assert code == 2 and "marker_before_stop" in err


BAD_INPUTS = {
    "no_answer": ([{"prompt": "a", "reference": "r"}], {}, "data.jsonl:1:", "answer"),
    "no_reference": (
        [{"prompt": "a", "answer": "1", "reference": "r"}, {"prompt": "b", "answer": "2"}],
        {},
        "data.jsonl:2:",
        "reference",
    ),
    "clashing_column": (
        [{"prompt": "a", "answer": "1", "reference": "r", "provenance": "x"}],
        {},
        "data.jsonl:1:",
        "provenance",
    ),
    "unknown_model": (
        [{"prompt": "a", "answer": "1", "reference": "r"}],
        {"model": "no-such-model-anywhere"},
        "no-such-model",
        "unknown model",
    ),
    "template_without_reference": (
        [{"prompt": "a", "answer": "1", "reference": "r"}],
        {"hint_template": "{question} only"},
        "hint template",
        "placeholder",
    ),
    "bad_verifier": (
        [{"prompt": "a", "answer": "1", "reference": "r"}],
        {"verifier": "nonsense"},
        "--verifier",
        "unknown verifier",
    ),
    "prompt_too_long": (
        [{"prompt": "a" * 60, "answer": "1", "reference": "r"}],
        {"max_length": 40},
        "data.jsonl:1:",
        "no room",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, saved, tmp_path, capsys):
    rows, overrides, where, what = BAD_INPUTS[case]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    args = {"model": saved / "model", "data": data, "out": out, "max_new_tokens": 4, **overrides}
    code, err = run([x for key, value in args.items() for x in (f"--{key}", value)], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("onsft: error:") and where in err, err
    assert what in err and "Fix:" in err
    assert not out.exists()


def test_a_rewrite_that_keeps_nothing_is_exit_2_without_a_training_file(saved, tmp_path, capsys, monkeypatch):
    (tmp_path / "never.py").write_text("def check(response, answer):\n    return False\n")
    out = tmp_path / "out"
    args = [*base_args(saved), "--verifier", f"{tmp_path / 'never.py'}:check", "--out", out]
    code, err = run(args, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onsft: error:"), err
    assert "kept 0 of 10 rows (10 not verified)" in err and "records.jsonl.partial" in err and "Fix:" in err
    assert "--samples_per_prompt" in err and "--hint_beta" in err and "--verifier" in err
    assert not (out / "train.jsonl").exists() and not (out / "summary.json").exists()
    assert not (out / "records.jsonl").exists()
    lines = (out / "records.jsonl.partial").read_text().splitlines()
    assert len(partial_rows(lines[1:])) == 10  # after the fingerprint: every row (and the time lines)
    # The same command decodes nothing again and fails the same way; a training file elsewhere is not made.
    chunks = []
    monkeypatch.setattr(rewriting.Rewriter, "chunk", lambda self, rows, progress=None: chunks.append(rows) or [])
    elsewhere = tmp_path / "kept.jsonl"
    code, again = run([*args, "--train_out", elsewhere], capsys)
    assert code == 2 and again == err and chunks == [] and not elsewhere.exists()


def test_resume_after_a_simulated_kill_and_refusal_of_other_settings(saved, tmp_path, capsys, monkeypatch):
    code, err = run([*base_args(saved), "--out", tmp_path / "reference"], capsys)
    assert code == 0, err
    assert "resuming" not in err  # a fresh run says nothing about resuming

    out = tmp_path / "resumed"
    chunks = []
    real_chunk = rewriting.Rewriter.chunk

    def killed_in_third_chunk(self, rows, progress=None):
        chunks.append([row.example.index for row in rows])
        if len(chunks) == 3:
            raise KeyboardInterrupt  # what Ctrl-C, or a kill between two chunks, leaves behind
        return real_chunk(self, rows, progress)

    monkeypatch.setattr(rewriting.Rewriter, "chunk", killed_in_third_chunk)
    assert run([*base_args(saved), "--out", out], capsys)[0] == 130
    partial = out / "records.jsonl.partial"
    assert not (out / "records.jsonl").exists() and len(partial_rows(partial.read_text().splitlines()[1:])) == 6
    clocks = [json.loads(line)["_clock"] for line in partial.read_text().splitlines() if '"_clock"' in line]
    with open(partial, "a") as handle:
        handle.write('{"id": 6, "prompt": "What is 6 + 6?", "answer": "a6", "refer')  # a torn last line
    code, err = run([*base_args(saved), "--out", out, "--beta", 1.0], capsys)
    assert code == 2 and "different settings" in err

    chunks.clear()
    monkeypatch.setattr(
        rewriting.Rewriter,
        "chunk",
        lambda self, rows, progress=None: (
            chunks.append([row.example.index for row in rows]),
            real_chunk(self, rows, progress),
        )[1],
    )
    code, err = run([*base_args(saved), "--out", out], capsys)
    assert code == 0, err
    assert chunks == [[6, 7, 8], [9]]  # only the chunks not already on disk were decoded
    resumed = [line for line in err.splitlines() if "resuming" in line]
    assert resumed == [f"onsft rewrite: resuming: 6 of 10 done ({partial})"]
    # The killed run's seconds (up to its last written chunk) count in the whole run's cost (issue 21).
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost_before_this_run"] == clocks[-1] and clocks[-1]["wall_seconds"] > 0
    assert summary["ran_on"]["device"] == "cpu" and summary["ran_on"]["processes"] == 1
    for name in ("records.jsonl", "train.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert not partial.exists()


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def rows_on_disk(partial) -> list[dict]:
    """The rows of a partial file a live process is writing (a torn last line is not one yet)."""
    raw = partial.read_bytes()
    return partial_rows(raw[: raw.rfind(b"\n") + 1].decode("utf-8").splitlines()[1:])


def test_sigkill_at_a_random_point_then_restart_gives_every_row_once(saved, tmp_path, capsys):
    args = [*base_args(saved, "long.jsonl"), "--max_new_tokens", 24, "--chunk_size", 2]
    code, err = run([*args, "--out", tmp_path / "reference"], capsys)
    assert code == 0, err

    out = tmp_path / "killed"
    partial = out / "records.jsonl.partial"
    rng = random.Random(1234)
    kill_after = rng.randint(1, 8)  # finished chunks before the kill; then a random extra moment
    command = [sys.executable, "-m", "onsft.cli", "rewrite", "--progress", "false", *map(str, args), "--out", str(out)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if partial.exists() and len(rows_on_disk(partial)) >= 2 * kill_after:
            time.sleep(rng.uniform(0, 0.05))
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
    assert not (out / "records.jsonl").exists()
    done_before = len(rows_on_disk(partial))
    assert 2 * kill_after <= done_before < len(ROWS)

    code, err = run([*args, "--out", out], capsys)
    assert code == 0, err
    records = rows_of(out / "records.jsonl")
    assert [r["id"] for r in records] == list(range(len(ROWS)))  # every input exactly once, in order
    for name in ("records.jsonl", "train.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def test_two_processes_give_the_same_output_as_one(saved, tmp_path, capsys):
    code, err = run([*base_args(saved), "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    # --standalone: with --master_port 0 this torch's workers wait forever for the store.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "onsft.cli",
        "rewrite",
        "--progress",
        "false",
        *map(str, base_args(saved)),
        "--out",
        str(tmp_path / "two"),
    ]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "records.jsonl",
        "run.json",
        "summary.json",
        "train.jsonl",
    ]
    for name in ("records.jsonl", "train.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["processes"] == 2
    assert {k: two[k] for k in ("rows", "own_correct", "rewritten", "dropped", "mean_phi")} == {
        k: one[k] for k in ("rows", "own_correct", "rewritten", "dropped", "mean_phi")
    }


# ------------------------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism():
    if not (ORGANISM / "config.json").is_file():
        pytest.skip("the organism checkpoint is not built (python -m onsft.organism.pretrain)")
    return load_model("organism"), load_tokenizer("organism"), read_model_info("organism")


def organism_rewrite(organism, rows, **overrides):
    from onsft.organism import tasks

    model, tokenizer, info = organism
    examples = [parse_example(r, i, i + 1, "rows", False) for i, r in enumerate(rows)]
    settings = {"data": "rows", "max_new_tokens": 64, "chunk_size": 64, **overrides}
    decoding = {f.name for f in dataclasses.fields(HintedConfig)}  # max_new_tokens, beta, ...
    config = rewriting.RewriteConfig(**{k: v for k, v in settings.items() if k not in decoding})
    hinted_config = HintedConfig(**{k: v for k, v in settings.items() if k in decoding})
    records = rewriting.rewrite_examples(model, tokenizer, examples, config, hinted_config, verifier="exact", info=info)
    rewritten = [r for r in records if r["provenance"] == "hinted"]
    assert all(tasks.is_correct(r["response"], r["answer"]) for r in rewritten)
    return records, rewritten


def test_organism_rewrites_foreign_references_of_old_skills_into_its_own_style(organism):
    """Foreign-style references of skills the organism has (hinted contexts it was pretrained on):
    the rewrites are correct, in the native style, and scored near phi = 0 where the references score
    far below (measured: references -6.9, rewrites -0.14 / 0.04 / 0.08 at beta 0 / 1 / 3, 53-60% of
    the 60 rows rewritten correctly)."""
    from onsft.organism import tasks

    rows = [
        {"prompt": r["question"], "answer": r["answer"], "reference": r["reference"], "task": r["task"]}
        for r in tasks.hinted_old_test(60)
    ]
    records, rewritten = organism_rewrite(organism, rows, own_samples=0, beta=3.0)
    assert read_model_info("organism")["hint_template"] == tasks.HINT_TEMPLATE
    assert len(rewritten) >= 20, rewrite_summary.summarize(records)
    assert sum(tasks.is_native_style(r["response"]) for r in rewritten) >= 0.9 * len(rewritten)
    reference_phi = sum(r["reference_mean_phi"] for r in rewritten) / len(rewritten)
    rewrite_phi = sum(r["mean_phi"] for r in rewritten) / len(rewritten)
    assert reference_phi < -3 and abs(rewrite_phi) < 0.5, (reference_phi, rewrite_phi)


def test_organism_rewrites_new_skill_teacher_data_closer_to_its_distribution(organism):
    """The new skill's teacher data (five styles): rewritten responses verify and score closer to
    phi = 0 than their references. Skipped while the checkpoint cannot rewrite the new skill at all."""
    from onsft.organism import tasks

    records, rewritten = organism_rewrite(organism, tasks.new_skill_train(n=8, seed=0), own_samples=2, beta=3.0)
    if not rewritten:
        pytest.skip(
            f"this organism checkpoint rewrote 0 of {len(records)} new-skill rows correctly "
            "(its hinted context does not carry the new skill's answers)"
        )
    reference_phi = sum(r["reference_mean_phi"] for r in rewritten) / len(rewritten)
    rewrite_phi = sum(r["mean_phi"] for r in rewritten) / len(rewritten)
    assert abs(rewrite_phi) < abs(reference_phi), (reference_phi, rewrite_phi)


def test_summary_reports_z_of_kept_rows_and_advises_on_a_low_marker_share():
    def record(provenance, z, handed):
        usable = provenance == "hinted"
        candidates = [
            {"sample": 0, "beta": 1.0, "usable": usable, "verified": usable, "handed_over": handed, "kept": True}
        ]
        return {
            "provenance": provenance,
            "z": z,
            "mean_phi": 0.1,
            "scored_tokens": 5,
            "own_correct": int(provenance == "own"),
            "own_samples": 1,
            "hinted_tries": int(provenance != "own"),
            "candidates": candidates if provenance != "own" else None,
            "finish_reason": "eos",
            "verify_method": "math",
            "generated_tokens": 5,
            "truncated": False,
            "reference_mean_phi": -1.0,
            "reference_z": -2.0,
        }

    records = [record("hinted", z, handed) for z, handed in [(2.0, False), (1.0, False), (-2.0, True)]]
    records += [record("own", 0.5, False), record("dropped", -5.0, False)]
    summary = rewrite_summary.summarize(records)
    z = summary["z"]["rewritten"]
    assert z["n"] == 3 and z["mean_z"] == pytest.approx(1 / 3) and z["std_z"] == pytest.approx((13 / 3) ** 0.5)
    assert z["share_below_-1.645"] == pytest.approx(1 / 3) and z["share_above_1.645"] == pytest.approx(1 / 3)
    assert summary["z"]["own"] == {
        "n": 1,
        "mean_z": 0.5,
        "std_z": 0.0,
        "share_below_-1.645": 0.0,
        "share_above_1.645": 0.0,
    }
    assert summary["answer_marker"]["share"] == pytest.approx(1 / 4)
    (note,) = rewrite_summary.advice(summary, {"form": "instruction", "answer_marker": "\\boxed{"})
    assert "25%" in note and "--hint_form restate" in note and "answer is" in note and "--hint_beta" in note
    assert "--marker_before_stop" in note
    # Settings in use are not suggested again; a share at or above one half gives no advice.
    (again,) = rewrite_summary.advice(summary, {"form": "restate", "answer_marker": "x", "marker_before_stop": True})
    assert "--hint_form" not in again and "--marker_before_stop" not in again
    for entry in [e for r in records for e in r["candidates"] or []][:2]:
        entry["handed_over"] = True
    assert rewrite_summary.advice(rewrite_summary.summarize(records), {"form": "restate"}) == []
    # A quarter of the candidates cut at the token limit while EOS was held until a marker: advice to raise the
    # limit or turn the hold off (nothing to say when the hold is off: those ran long by themselves).
    records[-1]["candidates"][0]["finish_reason"] = "length"
    summary = rewrite_summary.summarize(records)
    assert (summary["answer_marker"]["cut_before_marker"], summary["answer_marker"]["cut_share"]) == (1, 0.25)
    (cut,) = rewrite_summary.advice(summary, {"form": "restate", "marker_before_stop": True})
    assert "25%" in cut and "--max_new_tokens" in cut and "--marker_before_stop false" in cut
    assert rewrite_summary.advice(summary, {"form": "restate", "marker_before_stop": False}) == []
    # A candidate cut after its hand-over reached a marker: not counted.
    records[-1]["candidates"][0]["handed_over"] = True
    assert rewrite_summary.summarize(records)["answer_marker"]["cut_before_marker"] == 0
