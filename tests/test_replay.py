"""Replay: `onsft data replay` writes the starting model's own answers, `onsft train --replay_data` puts the
configured share of them in every optimiser batch, and a resumed run keeps the mix."""

import json
from collections import Counter

import pytest

from onsft.cli import main
from onsft.data.replay import mixed_order, planned_steps, replay_rows_per_batch
from onsft.engine.decoding import OwnSamplingConfig, generate
from onsft.engine.trainer import OnPolicySFTTrainer
from onsft.errors import UserError
from onsft.runtime.models import ModelArguments, load_model, load_tokenizer
from test_train_cli import ROWS, train_args, write_jsonl
from tiny import tiny_tokenizer, untied_model

OTHER_PROMPTS = [{"prompt": f"Say {w} twice."} for w in ["ab", "cd", "ef", "gh", "ij", "kl"]]


def test_every_block_holds_the_share_and_rows_cycle_by_epoch():
    n_train, n_replay, batch, r, steps = 7, 3, 4, 1, 9
    order = mixed_order(n_train, n_replay, batch, r, steps, seed=0)
    assert len(order) == steps * batch
    blocks = [order[i : i + batch] for i in range(0, len(order), batch)]
    assert all(sum(i >= n_train for i in block) == r for block in blocks)
    train = [[i for i in block if i < n_train] for block in blocks]
    replay = [[i - n_train for i in block if i >= n_train] for block in blocks]
    # Training rows: whole epochs (7 blocks of 3 = 3 epochs of 7 rows), no row twice within an epoch, a new
    # order every epoch; replay rows cycle the same way (one per block, 3 blocks a pass).
    assert Counter(sum(train[:7], [])) == {i: 3 for i in range(7)}
    assert len(set(sum(train[:2], []))) == 6
    assert all(sorted(sum(replay[j : j + 3], [])) == [0, 1, 2] for j in (0, 3, 6))
    assert order == mixed_order(n_train, n_replay, batch, r, steps, seed=0)
    assert order != mixed_order(n_train, n_replay, batch, r, steps, seed=1)


def test_rows_per_batch_and_planned_steps():
    assert replay_rows_per_batch(0.25, 8) == 2 and replay_rows_per_batch(0.3, 4) == 1
    for share, batch in [(0.05, 4), (0.95, 4), (0.0, 8), (1.0, 8)]:
        with pytest.raises(UserError, match="replay_share"):
            replay_rows_per_batch(share, batch)
    assert planned_steps(5, 3.0, 100, 3) == 5  # max_steps wins
    assert planned_steps(-1, 2.0, 10, 3) == 7  # 2 epochs of 10 rows, 3 training rows a batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay_model")
    untied_model(seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def replay_set(model_dir, tmp_path, *extra, max_new_tokens=10):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = write_jsonl(tmp_path / "other.jsonl", OTHER_PROMPTS)
    out = tmp_path / "replay.jsonl"
    args = ["data", "replay", "--model", str(model_dir), "--data", str(prompts), "--out", str(out)]
    assert main([*args, "--max_new_tokens", str(max_new_tokens), "--batch_size", "4", *extra]) == 0
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def test_replay_rows_are_the_starting_models_own_answers(model_dir, tmp_path):
    out, rows = replay_set(model_dir, tmp_path / "greedy", "--temperature", "0", "--keep_unfinished", "true")
    model = load_model(ModelArguments(model=str(model_dir)))
    tokenizer = load_tokenizer(ModelArguments(model=str(model_dir)))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        for r in OTHER_PROMPTS
    ]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    greedy = generate(model, tokenizer, prompts, OwnSamplingConfig(temperature=0.0, max_new_tokens=10))
    assert [r["completion"] for r in rows] == [g.text for g in greedy]
    assert {r["replay_model"] for r in rows} == {str(model_dir)}
    assert [r["prompt"][0]["content"] for r in rows] == [r["prompt"] for r in OTHER_PROMPTS]
    # Sampled at temperature 1 (the default): deterministic for a seed, and unfinished answers are dropped.
    _, sampled = replay_set(model_dir, tmp_path / "sampled", max_new_tokens=150)
    summary = json.loads((tmp_path / "sampled" / "replay.summary.json").read_text())
    assert summary["rows"] == len(sampled) and summary["rows"] + sum(summary["dropped"].values()) == 6
    assert all(r["finish_reason"] in ("eos", "stop") for r in sampled) and summary["dropped"]
    _, again = replay_set(model_dir, tmp_path / "sampled_again", max_new_tokens=150)
    assert again == sampled


def test_no_usable_answer_is_said_in_words(model_dir, tmp_path, capsys):
    """Every answer cut at the token limit: one line that counts them in words (not a Python dict)."""
    prompts = write_jsonl(tmp_path / "other.jsonl", OTHER_PROMPTS)
    out = tmp_path / "replay.jsonl"
    args = ["data", "replay", "--model", str(model_dir), "--data", str(prompts), "--out", str(out)]
    assert main([*args, "--max_new_tokens", "1", "--temperature", "0"]) == 2
    err = capsys.readouterr().err
    assert "none of the 6 answers is usable (6 cut at --max_new_tokens)" in err and "{" not in err, err
    assert not out.exists()


ORIGINAL_COMPUTE_LOSS = OnPolicySFTTrainer.compute_loss


class Recorder:
    """Wraps OnPolicySFTTrainer.compute_loss: the unpadded rows of every training micro-batch, by step."""

    def __init__(self, monkeypatch, stop_after=None):
        self.batches, self.calls, self.stop_after = [], 0, stop_after
        original, recorder = ORIGINAL_COMPUTE_LOSS, self  # a new recorder replaces the previous one

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            if model.training:
                recorder.calls += 1
                if recorder.stop_after is not None and recorder.calls > recorder.stop_after:
                    raise KeyboardInterrupt  # a kill in the middle of the run
                ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
                rows = [tuple(t for t, m in zip(r, k) if m) for r, k in zip(ids, mask)]
                recorder.batches.append((trainer.state.global_step, rows))
            return original(trainer, model, inputs, *args, **kwargs)

        monkeypatch.setattr(OnPolicySFTTrainer, "compute_loss", compute_loss)

    def by_step(self):
        steps = {}
        for step, rows in self.batches:
            steps.setdefault(step, []).extend(rows)
        return steps


def encoded_rows(path, model_dir):
    from onsft.data.training_sets import sft_dataset

    table, _ = sft_dataset(load_tokenizer(ModelArguments(model=str(model_dir))), str(path), 64, "reject")
    return {tuple(r) for r in table["input_ids"]}


@pytest.fixture(scope="module")
def replay_file(model_dir, tmp_path_factory):
    out, _ = replay_set(model_dir, tmp_path_factory.mktemp("replay_data"), "--keep_unfinished", "true")
    return out


def test_every_optimiser_batch_holds_the_share_of_own_answers(model_dir, replay_file, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    recorder = Recorder(monkeypatch)
    args = train_args(model_dir, data, tmp_path / "run", "--replay_data", str(replay_file), "--replay_share", "0.25")
    # Optimiser batch of 2 x 2 accumulation = 4 rows, one of them replay; 3 steps.
    assert main([*args, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]) == 0
    replay, teacher = encoded_rows(replay_file, model_dir), encoded_rows(data, model_dir)
    steps = recorder.by_step()
    assert sorted(steps) == [0, 1, 2]
    for rows in steps.values():
        assert len(rows) == 4
        assert sum(r in replay for r in rows) == 1 and sum(r in teacher for r in rows) == 3
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["replay"]["replay_rows_per_batch"] == 1 and summary["replay"]["share"] == 0.25
    assert summary["global_step"] == 3


def test_resume_keeps_the_mix(model_dir, replay_file, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    extra = ["--replay_data", str(replay_file), "--replay_share", "0.5", "--max_steps", "5"]
    full = Recorder(monkeypatch)
    assert main(train_args(model_dir, data, tmp_path / "full", *extra)) == 0
    Recorder(monkeypatch, stop_after=3)  # killed during step 4 (checkpoint-2 is on disk)
    assert main(train_args(model_dir, data, tmp_path / "cut", *extra)) == 130  # the CLI's answer to an interrupt
    resumed = Recorder(monkeypatch)
    assert main(train_args(model_dir, data, tmp_path / "cut", *extra)) == 0
    assert json.loads((tmp_path / "cut" / "train_summary.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert resumed.by_step() == {s: rows for s, rows in full.by_step().items() if s >= 2}
    replay = encoded_rows(replay_file, model_dir)
    assert all(sum(r in replay for r in rows) == 2 for rows in full.by_step().values())
    with_replay = Counter(sum(r in replay for r in rows) for rows in full.by_step().values())
    assert with_replay == {2: 5}
    full_model = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "cut" / "model" / "model.safetensors").read_bytes() == full_model


@pytest.mark.parametrize(
    "case,expected",
    [
        ("dpo", "not into --method dpo"),
        ("overlap", "answer prompts of the training data"),
        ("other_model", "answered by `someone-else`"),
        ("share", "gives 0 replay rows"),
    ],
)
def test_bad_replay_settings_exit_2(model_dir, replay_file, tmp_path, capsys, case, expected):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    replay = replay_file
    extra = []
    if case == "dpo":
        extra = ["--method", "dpo"]
    elif case == "overlap":
        replay = write_jsonl(tmp_path / "r.jsonl", [{**ROWS[0], "replay_model": str(model_dir)}])
    elif case == "other_model":
        replay = write_jsonl(
            tmp_path / "r.jsonl", [{**OTHER_PROMPTS[0], "completion": "x", "replay_model": "someone-else"}]
        )
    else:
        extra = ["--replay_share", "0.1"]
    code = main(train_args(model_dir, data, tmp_path / "out", "--replay_data", str(replay), *extra))
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out" / "model").exists()
