"""Preference pairs from own samples, and DPO / SimPO training through TRL on a tiny model."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

import onsft.engine.preference
from onsft import cli
from onsft.commands import train
from onsft.commands.train import TrainArguments
from onsft.data.chat import encode_prompt, encode_response
from onsft.data.rows import Example
from onsft.data.training_sets import preference_dataset as load_pairs
from onsft.data.verify import get_verifier
from onsft.engine.lora import LoraArguments
from onsft.engine.preference import PreferenceTrainConfig
from onsft.errors import UserError
from onsft.pipeline.pairs.pairing import make_pairs
from onsft.runtime.models import ModelArguments, load_model
from onsft.runtime.runs import RunArguments
from onsft.runtime.settings import parse_command
from test_evaluate import PROMPTS, TOKENIZER, save_talker, write_jsonl

EXACT = get_verifier("exact")


def sample(text: str, correct: bool) -> dict:
    return {"text": text, "correct": correct, "finish_reason": "length", "verify_method": "exact"}


def example(answer="A", index=0, **record) -> Example:
    return Example(index, index + 1, {"id": "q", **record}, [{"role": "user", "content": "Q?"}], answer=answer)


# --------------------------------------------------------------------------------------------- pairing


def test_make_pairs_prefers_own_correct_samples_and_uses_distinct_wrong_ones():
    row = {"samples": [sample("A", True), sample("B", False), sample("B", False), sample("C", False)]}
    pairs, outcome = make_pairs(row, example(task="t"), [("reference", "A")], EXACT, pairs_per_prompt=3)
    assert outcome == "pair_from_own_sample"
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("A", "B"), ("A", "C")]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Q?"}] and pairs[0]["chosen"][0]["role"] == "assistant"
    assert pairs[0]["chosen_source"] == "own_sample" and pairs[0]["n_correct"] == 1 and pairs[0]["n_samples"] == 4
    assert pairs[0]["id"] == "q" and pairs[0]["task"] == "t" and pairs[0]["answer"] == "A"


def test_make_pairs_fallbacks_are_verified_in_order():
    wrong = {"samples": [sample("B", False), sample("C", False)]}
    pairs, outcome = make_pairs(wrong, example(), [("rewrite", "nope"), ("reference", "A")], EXACT, 1)
    assert outcome == "pair_from_reference" and pairs[0]["chosen"][0]["content"] == "A"
    pairs, _ = make_pairs(wrong, example(), [("rewrite", "A"), ("reference", "A")], EXACT, 1)
    assert pairs[0]["chosen_source"] == "rewrite"
    assert make_pairs(wrong, example(), [("reference", "not A")], EXACT, 1) == ([], "no_correct_response")
    right = {"samples": [sample("A", True)] * 3}
    assert make_pairs(right, example(), [], EXACT, 1) == ([], "all_samples_correct")


def test_standard_format_renders_the_chat_template():
    row = {"samples": [sample("A", True), sample("B", False)]}
    (pair,), _ = make_pairs(row, example(), [], EXACT, 1, TOKENIZER, "standard")
    assert pair["prompt"] == "<user>Q?<assistant>" and pair["chosen"] == "A" and pair["rejected"] == "B"


# ------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rows = [
        {"id": f"q{i}", "prompt": p, "completion": f"ok {i}", "answer": f"ok {i}", "task": f"t{i % 2}"}
        for i, p in enumerate(PROMPTS)
    ]
    (root / "checks.py").write_text(
        "def even(response, answer):\n    return len(response) % 2 == 0\n"
        "def always(response, answer):\n    return True\n"
    )
    return {
        "root": root,
        "model": save_talker(root / "model"),
        "data": write_jsonl(root / "data.jsonl", rows),
        "checks": str(root / "checks.py"),
    }


def run_pairs(setup, out, *extra):
    return cli.main(
        [
            "pairs",
            "--model",
            setup["model"],
            "--data",
            setup["data"],
            "--out",
            str(out),
            "--samples",
            "4",
            "--max_new_tokens",
            "9",
            "--batch_size",
            "8",
            *extra,
        ]
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_from_own_samples_are_valid(setup):
    out = setup["root"] / "own.jsonl"
    assert run_pairs(setup, out, "--verifier", f"{setup['checks']}:even", "--pairs_per_prompt", "2") == 0
    pairs = read_jsonl(out)
    assert pairs
    even = get_verifier(f"{setup['checks']}:even")
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert even(chosen, "") and not even(rejected, "") and chosen != rejected
        assert pair["prompt"] == [{"role": "user", "content": PROMPTS[pair["source_index"]]}]
        assert pair["n_correct"] <= 3  # at least one wrong sample
        if pair["n_correct"]:
            assert pair["chosen_source"] == "own_sample"
        else:  # the reference "ok i" has an even length, so it verifies
            assert pair["chosen_source"] == "reference" and chosen == f"ok {pair['source_index']}"
    samples = read_jsonl(setup["root"] / "own.samples.jsonl")
    assert len(samples) == len(PROMPTS) and all(len(s["samples"]) == 4 for s in samples)
    summary = json.loads((setup["root"] / "own.summary.json").read_text())
    assert summary["pairs"] == len(pairs) and sum(summary["outcomes"].values()) == len(PROMPTS)
    dataset, stats = load_pairs(str(out), TOKENIZER, max_length=256)
    assert len(dataset) == len(pairs) and stats["rows"] == len(pairs)


def test_rewrites_then_references_are_chosen_when_no_own_sample_is_right(setup):
    rewrites = write_jsonl(
        setup["root"] / "rewrites.jsonl",
        [
            {"id": "q0", "prompt": PROMPTS[0], "completion": "ok 0"},  # verifies: used
            {"id": "q1", "prompt": PROMPTS[1], "completion": "wrong"},  # fails: reference instead
            {"prompt": PROMPTS[2], "completion": "ok 2"},
        ],
    )  # matched by prompt text
    out = setup["root"] / "fallback.jsonl"
    assert run_pairs(setup, out, "--verifier", "exact", "--rewrites", rewrites) == 0
    pairs = {p["id"]: p for p in read_jsonl(out)}
    assert set(pairs) == {f"q{i}" for i in range(len(PROMPTS))}  # random text never equals "ok i"
    assert [pairs[f"q{i}"]["chosen_source"] for i in range(4)] == ["rewrite", "reference", "rewrite", "reference"]
    assert all(p["chosen"][0]["content"] == p["answer"] and p["n_correct"] == 0 for p in pairs.values())


def test_no_pairs_is_a_user_error_and_writes_no_pairs_file(setup, capsys):
    out = setup["root"] / "none.jsonl"
    assert run_pairs(setup, out, "--verifier", f"{setup['checks']}:always") == 2
    message = capsys.readouterr().err
    assert f"no preference pairs from {len(PROMPTS)} prompts ({len(PROMPTS)} with every sample right)" in message
    assert "{" not in message  # the outcomes in words, not a Python dict
    # Nothing that looks like a finished run: no pairs, no summary; the samples kept as the resumable .partial.
    assert not out.exists() and not (setup["root"] / "none.summary.json").exists()
    assert (setup["root"] / "none.samples.jsonl.partial").exists()
    assert not (setup["root"] / "none.samples.jsonl").exists()
    # The same command resumes the samples (nothing sampled again) and fails the same way; --overwrite with other
    # settings starts over.
    assert run_pairs(setup, out, "--verifier", f"{setup['checks']}:always") == 2
    assert "no preference pairs" in capsys.readouterr().err
    assert run_pairs(setup, out, "--verifier", "exact", "--overwrite") == 0
    assert out.exists() and (setup["root"] / "none.summary.json").exists()


def test_bad_pairs_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no pairs"):
        load_pairs(str(empty), TOKENIZER, 128)
    missing = write_jsonl(
        tmp_path / "missing.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    )
    with pytest.raises(UserError, match="rejected") as error:
        load_pairs(missing, TOKENIZER, 128)
    assert error.value.line == 2
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
        ],
    )
    with pytest.raises(UserError, match="mix"):
        load_pairs(mixed, TOKENIZER, 128)
    long = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "x" * 50}],
                "rejected": [{"role": "assistant", "content": "y"}],
            }
        ]
        * 2,
    )
    with pytest.raises(UserError, match="2 of 2 pairs are longer"):
        load_pairs(long, TOKENIZER, 20)
    with pytest.raises(UserError, match="no pairs left"):
        load_pairs(long, TOKENIZER, 20, overlong="drop")
    assert len(load_pairs(long, TOKENIZER, 20, overlong="truncate")[0]) == 2


# ------------------------------------------------------------------------------------------- training


def one_pair_file(tmp_path):
    pair = {
        "prompt": [{"role": "user", "content": "Copy abc."}],
        "chosen": [{"role": "assistant", "content": "abc"}],
        "rejected": [{"role": "assistant", "content": "a totally wrong answer"}],
    }
    return write_jsonl(tmp_path / "pair.jsonl", [pair]), pair


def train_args(model, data, out, *extra):
    return [
        "--model",
        model,
        "--data",
        data,
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "1",
        "--learning_rate",
        "0.01",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--max_length",
        "128",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def train_preference(argv: list[str]) -> dict:
    """`onsft train --method dpo|simpo` from Python: the flags parsed as preference training, the summary returned."""
    inputs, model_args, lora, args, run_args = parse_command(
        argv, TrainArguments, ModelArguments, LoraArguments, PreferenceTrainConfig, RunArguments, prog="onsft train"
    )
    return train.run(inputs, model_args, lora, args, None, run_args)


def weights(path):
    return {k: v.clone() for k, v in load_model(path).state_dict().items()}


def first_loss(out):
    return next(r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r)


class DieAfterCheckpoint(TrainerCallback):
    """Ends the process (as a kill would) right after checkpoint-`step` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_dpo_trains_from_log2_changes_the_model_and_resumes(setup, tmp_path, monkeypatch):
    data, _ = one_pair_file(tmp_path)
    out = tmp_path / "dpo"
    assert cli.main(["train", "--method", "dpo", *train_args(setup["model"], data, out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trainer"] == "DPOTrainer" and summary["global_step"] == 2 and summary["beta"] == 0.1
    # At the first step the policy is the reference: every log-ratio is 0 and the loss is log 2.
    assert first_loss(out) == pytest.approx(math.log(2), abs=1e-6)
    before, after = weights(setup["model"]), weights(out / "model")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4
    # Other settings (more steps) into the finished run's folder are refused (RunGuard); the run stays as it is.
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="max_steps"):
        train_preference(["--method", "dpo", *train_args(setup["model"], data, out), "--max_steps", "3"])
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    # A 3-step run killed after checkpoint-2 resumes from it when the same command is run again.
    longer = ["--method", "dpo", *train_args(setup["model"], data, tmp_path / "dpo3"), "--max_steps", "3"]
    real = onsft.engine.preference.DPOTrainer
    with monkeypatch.context() as patch:
        patch.setattr(
            onsft.engine.preference, "DPOTrainer", lambda *a, **k: real(*a, callbacks=[DieAfterCheckpoint(2)], **k)
        )
        with pytest.raises(KeyboardInterrupt):
            train_preference(longer)
    out = tmp_path / "dpo3"
    assert not (out / "model").exists() and (out / "checkpoint-2").is_dir()
    more = train_preference(longer)
    assert more["global_step"] == 3 and more["resumed_from"].endswith("checkpoint-2")
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = train_preference(longer)
    assert again["global_step"] == 3 and (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def naive_simpo_loss(model_path, pair, beta, gamma):
    """-log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), response tokens incl. EOS."""
    model = load_model(model_path)
    prompt_ids = encode_prompt(TOKENIZER, pair["prompt"])
    means = []
    for turn in (pair["chosen"], pair["rejected"]):
        response = encode_response(TOKENIZER, pair["prompt"], turn[0]["content"], prompt_ids)
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        token_logp = logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
        means.append(token_logp.mean().item())
    return -torch.nn.functional.logsigmoid(torch.tensor(beta * (means[0] - means[1]) - gamma)).item()


def test_simpo_is_reference_free_length_normalised_and_changes_the_model(setup, tmp_path):
    data, pair = one_pair_file(tmp_path)
    out = tmp_path / "simpo"
    summary = train_preference(
        ["--method", "simpo", *train_args(setup["model"], data, out), "--beta", "2.5", "--simpo_gamma", "0.3"]
    )
    assert summary["trainer"] == "SimPOTrainer" and summary["global_step"] == 2
    # Its token count (compute-matched readings use it) is DPO's: chosen and rejected, prompt included.
    dpo = train_preference(["--method", "dpo", *train_args(setup["model"], data, tmp_path / "dpo-tokens")])
    assert summary["tokens_seen"] == dpo["tokens_seen"] > 0
    assert summary["beta"] == 2.5 and summary["simpo_gamma"] == 0.3
    assert first_loss(out) == pytest.approx(naive_simpo_loss(setup["model"], pair, 2.5, 0.3), rel=1e-5)
    before, after = weights(setup["model"]), weights(out / "model")
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 1e-4


def test_bad_training_input_stops_before_training(setup, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "dpo", *train_args(setup["model"], str(empty), out)]) == 2
    assert "no pairs" in capsys.readouterr().err and not (out / "model").exists()
    data, _ = one_pair_file(tmp_path)
    with pytest.raises(UserError, match="precompute_ref_log_probs"):
        train_preference(
            ["--method", "simpo", *train_args(setup["model"], data, out), "--precompute_ref_log_probs", "true"]
        )
    with pytest.raises(UserError, match="not a preference method"):
        train_preference(["--method", "sft", *train_args(setup["model"], data, out)])
    assert not (out / "model").exists() and not list(out.glob("checkpoint-*"))
