"""`onsft train` end to end on a tiny model: outputs, bad input, and 2-process data parallelism."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from onsft.cli import main
from tiny import tiny_model, tiny_tokenizer

ROWS = [
    {"prompt": f"Copy {w}.", "completion": f"{w} \\boxed{{{w}}}"}
    for w in ["ab", "cde", "fg", "hij", "kl", "mno", "pq", "rst"]
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def train_args(model, data, out, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--disable_tqdm",
        "true",
        "--max_length",
        "64",
        *extra,
    ]


def test_train_writes_a_loadable_model_and_metrics(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out, "--loss", "idft")) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["loss"] == "idft" and summary["rows"] == 8
    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(tuned.lm_head.weight, base.lm_head.weight)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("mean_phi" in row and "frac_gamma_max" in row for row in logs)
    # Rerunning the finished command resumes from its last checkpoint and does no extra step.
    assert main(train_args(tiny_dir, data, out, "--loss", "idft")) == 0
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 3


def test_killed_after_its_last_checkpoint_resumes_to_the_same_model_without_an_extra_step(tmp_path, tiny_dir):
    """A run killed between its final checkpoint and its summary: the rerun must not train one step past
    max_steps (transformers would: it skips the seen batches of the epoch, then trains one more)."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)  # 8 rows, batch 2: 4 steps per epoch > max_steps
    out = tmp_path / "run"
    args = train_args(tiny_dir, data, out, "--max_steps", "2", "--per_device_train_batch_size", "2")
    assert main(args) == 0
    finished = AutoModelForCausalLM.from_pretrained(out / "model")
    loss = json.loads((out / "train_summary.json").read_text())["train_loss"]
    (out / "train_summary.json").unlink()  # what a kill after checkpoint-2 leaves
    shutil.rmtree(out / "model")
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["resumed_from"].endswith("checkpoint-2")
    assert summary["train_loss"] == pytest.approx(loss, rel=1e-6)
    # No step ran now: the run's training time is what checkpoint-2 saved of the first call's.
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]["TrainClock"]
    assert summary["cost_before_this_run"] == saved["args"] and saved["args"]["wall_seconds"] > 0
    assert summary["train_seconds"] == saved["args"]["wall_seconds"]
    resumed = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.equal(a, b) for a, b in zip(finished.state_dict().values(), resumed.state_dict().values()))


def test_an_epochs_run_resumed_from_a_middle_checkpoint_trains_its_remaining_steps(tmp_path, tiny_dir):
    """With --num_train_epochs (max_steps -1) a middle checkpoint is not mistaken for the last one."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)  # 8 rows, batch 4: 2 steps per epoch, 2 epochs = 4 steps
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_dir, data, out) if a not in ("--max_steps", "3")]
    args += ["--num_train_epochs", "2"]
    assert main(args) == 0
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
    (out / "train_summary.json").unlink()  # a kill after checkpoint-2, before checkpoint-4
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoint-4")
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    # The whole run's training time: checkpoint-2's saved clock plus this call's two steps.
    before = summary["cost_before_this_run"]
    assert before["wall_seconds"] > 0 and before["cpu_seconds"] > 0
    assert (
        before["wall_seconds"] < summary["train_seconds"] <= before["wall_seconds"] + summary["wall_seconds_this_run"]
    )


def test_a_checkpoint_saved_before_the_clock_resumes_with_no_earlier_time(tmp_path, tiny_dir):
    """Checkpoints written by an onsft without the training clock (or by plain transformers) hold no TrainClock
    entry; transformers' save fails on a missing entry, so the clock must add its own."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    args = [a for a in train_args(tiny_dir, data, out) if a not in ("--max_steps", "3")]
    args += ["--num_train_epochs", "2"]
    assert main(args) == 0
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoint-4")
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["stateful_callbacks"]["TrainClock"]
    state_file.write_text(json.dumps(state))
    assert main(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["cost_before_this_run"] == {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    assert "TrainClock" in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]


def test_lora_training_saves_adapter_and_merged_model(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "lora"
    assert main(train_args(tiny_dir, data, out, "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj")) == 0
    assert (out / "model" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    q = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


BAD_INPUTS = {
    "malformed_json": (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "comp'], "d.jsonl:2"),
    "missing_column": ([{"question": "a", "completion": "b"}], "neither `messages` nor `prompt`"),
    "empty_response": ([{"prompt": "a", "completion": "  "}], "response is empty"),
    "not_an_object": (["[1, 2]"], "not an object"),
    "no_assistant_turn": ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    "overlong": ([{"prompt": "a", "completion": "b" * 500}], "longer than max_length"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, tiny_dir, capsys, case):
    rows, expected = BAD_INPUTS[case]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Fix:" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "no/such-model-anywhere"], "no/such-model-anywhere"),
        (["--loss", "focal"], "unknown loss"),
        (["--learning_rat", "1"], "unknown option"),
    ],
)
def test_bad_options_exit_2(tmp_path, tiny_dir, capsys, args, expected):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    assert main(train_args(tiny_dir, data, out, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not out.exists()


def test_two_processes_follow_the_single_process_loss_trajectory(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate_cpu_2proc.yaml"

    def run(out, launcher, per_device):
        # Full-batch steps (every row, of different lengths, in every step): 1 and 2 processes shard rows
        # differently, so only then do both see the same global batch; what is tested is the token
        # normalisation across processes and the gradient averaging, not the sampler.
        args = train_args(
            tiny_dir, data, out, "--per_device_train_batch_size", str(per_device), "--max_steps", "3", "--loss", "idft"
        )
        done = subprocess.run(
            [*launcher, "-m", "onsft.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return [
            row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row
        ]

    with socket.socket() as probe:  # a free port: parallel test workers must not share accelerate's 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    one = run(tmp_path / "one", [sys.executable], 8)
    two = run(
        tmp_path / "two",
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--main_process_port",
            str(port),
        ],
        4,
    )
    assert len(one) == len(two) == 3 and one[0] != one[-1]
    assert one == pytest.approx(two, rel=1e-4)


@pytest.mark.parametrize("method", ["sft", "dpo", "simpo"])
def test_help_states_the_learning_rate_each_method_trains_with(method, capsys):
    """Issue 21: `train --help` showed 2e-05 while dpo / simpo trained with TRL's 1e-06."""
    from onsft.engine.preference import PreferenceTrainConfig, trainer_args
    from onsft.engine.trainer import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--method", method, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    used = (
        TrainConfig().learning_rate if method == "sft" else trainer_args(method, PreferenceTrainConfig()).learning_rate
    )
    shown = text.split("--learning-rate LEARNING_RATE ", 1)[1].split("(default: ", 1)[1].split(")")[0]
    assert float(shown) == used == {"sft": 2e-5, "dpo": 1e-6, "simpo": 1e-6}[method]
    # Whatever --method the help is asked for, it names the defaults of every method.
    for fragment in ("2e-05 for sft", "1e-06 for dpo and simpo", "--learning_rate 2e-05 (sft) or 1e-06 (dpo, simpo)"):
        assert fragment in text, fragment
