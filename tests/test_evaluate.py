"""Evaluation: pass@k against brute force, aggregation pinned on hand-made rows, the full path on a tiny
model (answers equal to its own greedy outputs -> accuracy 1), KL drift against a naive computation,
resume after a kill, and user errors before any compute."""

import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import onsft.engine.kl
import onsft.pipeline.evaluate.evaluation
from onsft import cli
from onsft.data.chat import encode_prompt
from onsft.data.rows import Example, load_examples
from onsft.data.verify import VerifyConfig
from onsft.engine.decoding import SamplingConfig, generate
from onsft.engine.kl import kl_drift
from onsft.errors import UserError
from onsft.formulas.stats import kl_per_position, pass_at_k
from onsft.pipeline.evaluate.evaluation import aggregate, evaluate_model
from onsft.runtime.models import load_model
from onsft.runtime.records import partial_rows
from tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
PROMPTS = ["Add 2 and 3.", "Copy abc.", "Hi?", "Reverse xyz.", "Say yes.", "Count to 3."]


def talker(seed: int = 0, dtype=torch.float64) -> LlamaForCausalLM:
    """A tiny Llama that writes varied text. The tied head of tests/tiny.py makes a random model repeat its
    last input token (here a chat special, which decodes to nothing); an untied head gives varied
    characters. Chat specials other than EOS get zero logits, so they are (almost) never the argmax."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        model.lm_head.weight[[0, 2, 3, 4]] = 0.0
    return model


def save_talker(path, seed: int = 0):
    talker(seed).save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    return str(path)


def encode(text: str) -> list[int]:
    return encode_prompt(TOKENIZER, [{"role": "user", "content": text}])


def greedy_texts(model, max_new_tokens: int) -> list[str]:
    outputs = generate(model, TOKENIZER, [encode(p) for p in PROMPTS], SamplingConfig(max_new_tokens=max_new_tokens))
    return [g.text for g in outputs]


def examples_with(answers: list[str]) -> list[Example]:
    return [
        Example(i, i + 1, {"prompt": p, "task": f"t{i % 2}", "extra": i}, [{"role": "user", "content": p}], answer=a)
        for i, (p, a) in enumerate(zip(PROMPTS, answers))
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ pure metrics


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(200, 7, 1) == pytest.approx(7 / 200, abs=1e-12)  # pass@1 is the fraction correct
    assert pass_at_k(100, 0, 10) == 0.0 and pass_at_k(100, 95, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def sample(correct: bool) -> dict:
    return {"text": "x", "correct": correct, "finish_reason": "eos", "verify_method": "exact"}


def row(correct: bool, samples: list[bool], task: str | None = None) -> dict:
    out = {
        "correct": correct,
        "finish_reason": "eos",
        "verify_method": "exact",
        "samples": [sample(s) for s in samples],
    }
    if task is not None:
        out["task"] = task
    return out


def test_aggregate_always_right_always_wrong_and_mixed():
    right = aggregate([row(True, [True] * 4) for _ in range(3)], ks=[1, 2, 4])
    assert right["accuracy"] == 1.0 and right["sampled_accuracy"] == 1.0
    assert right["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    wrong = aggregate([row(False, [False] * 4) for _ in range(3)], ks=[1, 2, 4])
    assert wrong["accuracy"] == 0.0 and wrong["pass_at_k"] == {"1": 0.0, "2": 0.0, "4": 0.0}
    mixed = aggregate(
        [
            row(True, [True, False, False, False], "a"),
            row(False, [False] * 4, "a"),
            row(True, [True, True, True, False], "b"),
        ],
        ks=[1, 2],
    )
    assert mixed["accuracy"] == pytest.approx(2 / 3)
    assert mixed["sampled_accuracy"] == pytest.approx((0.25 + 0 + 0.75) / 3)
    # pass@2 with n=4: c=1 -> 1 - C(3,2)/C(4,2) = 1/2; c=0 -> 0; c=3 -> 1
    assert mixed["pass_at_k"]["2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert mixed["by_task"]["a"]["accuracy"] == 0.5 and mixed["by_task"]["b"]["pass_at_k"]["2"] == 1.0
    assert mixed["by_task"]["a"]["n"] == 2 and mixed["verify_methods"] == {"exact": 15}


def test_kl_per_position_against_float64_formula():
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    naive = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(kl_per_position(p, q).double(), naive, atol=1e-6)
    assert kl_per_position(p, p).abs().max() == 0


# ------------------------------------------------------------------------------------------- on a model


def test_evaluate_model_answers_equal_own_greedy_outputs_give_accuracy_one():
    model = talker()
    texts = greedy_texts(model, max_new_tokens=8)
    assert len(set(texts)) > 1 and all(texts)  # the model writes varied, non-empty text
    sampling = SamplingConfig(max_new_tokens=8, batch_size=4, temperature=1e-4)
    result = evaluate_model(
        model, TOKENIZER, examples_with(texts), sampling, VerifyConfig(verifier="exact"), samples=4, return_records=True
    )
    assert result["accuracy"] == 1.0
    # temperature -> 0 samples the argmax too: every sample is right, pass@k = 1
    assert result["sampled_accuracy"] == 1.0 and result["pass_at_k"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    assert result["by_task"]["t0"]["accuracy"] == 1.0 and result["by_task"]["t1"]["n"] == 3
    record = result["records"][2]
    assert record["extra"] == 2 and record["generation"] == texts[2] and len(record["samples"]) == 4
    wrong = evaluate_model(
        model,
        TOKENIZER,
        examples_with(["not this"] * len(PROMPTS)),
        SamplingConfig(max_new_tokens=8, batch_size=4),
        VerifyConfig(verifier="exact"),
    )
    assert wrong["accuracy"] == 0.0 and "pass_at_k" not in wrong


def naive_kl(base, tuned, prompt_ids, max_new_tokens):
    """One sequence at a time, no padding, full logits in float64."""
    continuation = generate(base, TOKENIZER, [prompt_ids], SamplingConfig(max_new_tokens=max_new_tokens))[0].token_ids
    ids = torch.tensor([prompt_ids + continuation])
    with torch.no_grad():
        lp = torch.log_softmax(base(ids).logits[0].double(), -1)
        lq = torch.log_softmax(tuned(ids).logits[0].double(), -1)
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    values = [float((lp[t].exp() * (lp[t] - lq[t])).sum()) for t in positions]
    return sum(values), len(values)


def test_kl_drift_is_zero_for_the_same_model_and_matches_naive_for_another():
    base, other = talker(0), talker(1)
    prompts = [encode(p) for p in PROMPTS]
    assert abs(kl_drift(base, base, TOKENIZER, prompts, max_new_tokens=10, batch_size=4)) < 1e-6
    mean, per_prompt = kl_drift(
        base,
        other,
        TOKENIZER,
        prompts,
        max_new_tokens=10,
        batch_size=4,
        max_logits=3 * 11 * len(TOKENIZER),
        return_per_prompt=True,
    )  # forces small batches
    naive = [naive_kl(base, other, p, 10) for p in prompts]
    for (s, n), (s_ref, n_ref) in zip(per_prompt, naive):
        assert n == n_ref and s == pytest.approx(s_ref, rel=1e-6)
    assert mean == pytest.approx(sum(s for s, _ in naive) / sum(n for _, n in naive), rel=1e-6)
    assert mean > 0.1


# ------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    path = save_talker(root / "model")
    texts = greedy_texts(load_model(path), max_new_tokens=6)
    data = write_jsonl(
        root / "data.jsonl",
        [
            {"id": f"q{i}", "prompt": p, "answer": a, "task": f"t{i % 2}", "note": "kept"}
            for i, (p, a) in enumerate(zip(PROMPTS, texts))
        ],
    )
    retention = write_jsonl(root / "old.jsonl", [{"prompt": p, "answer": "zzz"} for p in PROMPTS[:3]])
    return {"root": root, "model": path, "data": data, "retention": retention}


def run_eval(saved, out, *extra):
    return cli.main(
        [
            "eval",
            "--model",
            saved["model"],
            "--data",
            saved["data"],
            "--out",
            str(out),
            "--verifier",
            "exact",
            "--max_new_tokens",
            "6",
            "--batch_size",
            "2",
            *extra,
        ]
    )


def test_eval_command_outputs(saved, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    options = (
        "--samples",
        "2",
        "--retention_data",
        saved["retention"],
        "--base_model",
        saved["model"],
        "--kl_max_new_tokens",
        "5",
    )
    assert run_eval(saved, out, *options) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0 and metrics["n"] == len(PROMPTS)
    assert set(metrics["by_task"]) == {"t0", "t1"} and set(metrics["pass_at_k"]) == {"1", "2"}
    assert metrics["retention"]["accuracy"] == 0.0 and metrics["retention"]["n"] == 3
    assert abs(metrics["kl"]["mean_kl_per_token"]) < 1e-6 and metrics["kl"]["tokens"] > 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(PROMPTS))]
    assert all(r["note"] == "kept" and r["correct"] and len(r["samples"]) == 2 for r in rows)
    assert (out / "accuracy.png").stat().st_size > 1000
    assert not list(out.glob("*.partial"))
    # Rerunning a finished evaluation computes nothing.
    for module in (onsft.pipeline.evaluate.evaluation, onsft.engine.kl):
        monkeypatch.setattr(module, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert run_eval(saved, out, *options) == 0


def test_killed_run_resumes_without_loss_or_duplicates(saved, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "whole"
    # batch_size 4: chunks of 4 prompts (greedy batch of 4, then 4 x 2 samples); 6 prompts = 2 chunks
    resumable = ("--samples", "2", "--plot", "false", "--batch_size", "4")
    assert run_eval(saved, reference, *resumable) == 0
    assert "resuming" not in capsys.readouterr().err  # a fresh run says nothing about resuming
    real = onsft.pipeline.evaluate.evaluation.generate
    calls = []

    def dying(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:  # greedy + samples of chunk 1 are done, then the process "dies"
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(onsft.pipeline.evaluate.evaluation, "generate", dying)
    out = tmp_path / "resumed"
    assert run_eval(saved, out, *resumable) == 130
    assert not (out / "generations.jsonl").exists() and not (out / "metrics.json").exists()
    partial = (out / "generations.jsonl.partial").read_text().splitlines()
    assert len(partial_rows(partial[1:])) == 4  # after the fingerprint: the first chunk's four prompts
    calls.clear()
    monkeypatch.setattr(
        onsft.pipeline.evaluate.evaluation, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
    )
    capsys.readouterr()
    assert run_eval(saved, out, *resumable) == 0
    assert calls == [2, 4]  # only chunk 2 (2 greedy rows, then 2 samples x 2 prompts)
    resumed = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert resumed == [f"onsft eval: resuming: 4 of 6 done ({out / 'generations.jsonl.partial'})"]
    assert (out / "generations.jsonl").read_text() == (reference / "generations.jsonl").read_text()
    # A kill in the middle of writing a chunk (one of its rows on disk, the next torn) loses nothing either.
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "generations.jsonl.partial").write_text("\n".join(partial[:2]) + "\n" + partial[2][:25])
    calls.clear()
    assert run_eval(saved, torn, *resumable) == 0
    assert calls == [4, 8, 2, 4]
    assert (torn / "generations.jsonl").read_text() == (reference / "generations.jsonl").read_text()
    # A different setting must not be merged into an unfinished run's partial output.
    monkeypatch.setattr(onsft.pipeline.evaluate.evaluation, "generate", dying)
    calls.clear()
    other = tmp_path / "other"
    assert run_eval(saved, other, *resumable) == 130
    assert run_eval(saved, other, *resumable, "--temperature", "0.5") == 2


def test_user_errors_stop_before_any_compute(saved, tmp_path, capsys, monkeypatch):
    for module in (onsft.pipeline.evaluate.evaluation, onsft.engine.kl):
        monkeypatch.setattr(module, "generate", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "bad"
    assert run_eval(saved, out, "--verifier", "no_such_verifier") == 2
    assert "unknown verifier" in capsys.readouterr().err
    no_answer = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "Hi?", "answer": "x"}, {"prompt": "Yo?"}])
    assert cli.main(["eval", "--model", saved["model"], "--data", no_answer, "--out", str(out)]) == 2
    assert "no `answer`" in capsys.readouterr().err
    assert run_eval(saved, out, "--samples", "2", "--pass_k", "4") == 2
    assert run_eval(saved, out, "--greedy", "false") == 2
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(UserError, match="answer"):
        evaluate_model(talker(), TOKENIZER, examples_with([None] * len(PROMPTS)), SamplingConfig(), VerifyConfig())


def test_a_prompt_longer_than_the_context_names_its_line(saved, tmp_path):
    data = write_jsonl(
        tmp_path / "long.jsonl", [{"prompt": "Hi?", "answer": "x"}, {"prompt": "y" * 300, "answer": "x"}]
    )
    with pytest.raises(UserError, match="context is 256") as error:
        evaluate_model(
            talker(),
            TOKENIZER,
            load_examples(data, require_response=False),
            SamplingConfig(max_new_tokens=2),
            VerifyConfig(verifier="exact"),
        )
    assert error.value.line == 2


def test_overlong_drop_evaluates_the_other_rows_and_lists_the_dropped_lines(saved, tmp_path, capsys):
    rows = [{"prompt": "Hi?", "answer": "x"}, {"prompt": "y" * 300, "answer": "x"}, {"prompt": "Yo?", "answer": "x"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "out"
    base = ["eval", "--model", saved["model"], "--data", str(data), "--out", str(out), "--verifier", "exact"]
    base += ["--max_new_tokens", "2", "--plot", "false"]
    assert cli.main(base) == 2  # the default refuses, naming the line and the way out
    message = capsys.readouterr().err
    assert "long.jsonl:2:" in message and "--overlong drop" in message and "--limit" not in message
    assert not out.exists() or not any(out.iterdir())
    assert cli.main([*base, "--overlong", "drop", "--retention_data", str(data)]) == 0
    err = capsys.readouterr().err
    assert "1 row(s) with a prompt of 256+ tokens left out (line 2)" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["retention"]["n"] == 2
    assert metrics["overlong_dropped"] == {"data": [2], "retention_data": [2]}
    only_long = write_jsonl(tmp_path / "only_long.jsonl", rows[1:2])
    assert cli.main([*base[:4], str(only_long), "--out", str(tmp_path / "o2"), "--overlong", "drop"]) == 2
    assert "nothing is left to evaluate" in capsys.readouterr().err
