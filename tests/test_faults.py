"""Reliability (issue 8): hostile inputs, killed runs and numeric faults, tried the way a user meets them.

1. Hostile inputs: tests/fault_corpus.py builds ~65 cases over train, audit, rewrite, eval, pairs and
   compare. They run in ONE subprocess (tests/fault_runner.py calls `onsft.cli.main` per case with fds 1
   and 2 captured; one import of torch/transformers/TRL instead of ~65), started under a private mount
   namespace where one is allowed so that a full disk is a real full tmpfs. A sample of cases (one per
   command) also runs as real `python -m onsft.cli` processes, which must print the very same line and
   exit 2: that ties the in-process runner to what a user sees.
2. Killed runs: audit, eval, rewrite and train are SIGKILLed twice at random points (seeded), each time
   restarted with the same command, then finished; the outputs must equal an uninterrupted run's byte
   for byte (training: the final weights, bitwise, fp32). The single-kill tests of test_rewrite.py and
   the simulated kills of test_audit.py / test_evaluate.py / test_trainer.py are not repeated here.
3. Numeric faults: NaN loss under `--nonfinite skip` (counted) and `stop` (a corpus case); bf16 against
   fp32 on the organism (audit mean phi, a short training run's loss).

With ONSFT_RELIABILITY_DOC=<path> (tests/fault_table.py sets it) the results are written there as markdown.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_corpus
import fault_report
from onsft import cli

ROOT = Path(__file__).resolve().parents[1]
REPORT: dict = {}
# Cases still failing for a reason outside this suite's files: (case, why). The test requires that they
# still fail, so whoever fixes one is told to move it back among the normal cases.
KNOWN_GAPS: dict[str, str] = {}
# One case per command, also run as a real subprocess.
SUBPROCESS_SAMPLE = (
    "truncated_last_line",
    "invalid_utf8",
    "lone_surrogate",
    "duplicate_ids",
    "id_wrong_type",
    "experiment_eval_typo",
)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report():
    """Tiny models run fastest on one thread (and the in-process references must use the same thread count
    as the subprocesses to be bitwise comparable). Writes the report at the end when asked."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    target = os.environ.get("ONSFT_RELIABILITY_DOC")
    if target and REPORT:
        Path(target).write_text(fault_report.render(REPORT), encoding="utf-8")


def namespaces_work() -> bool:
    if os.environ.get("ONSFT_FAULTS_NO_NAMESPACE") == "1":
        return False
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# ------------------------------------------------------------------------------------- hostile inputs


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


def judge(case: fault_corpus.Case, result: dict, results: dict | None = None) -> list[str]:
    """Everything wrong with one result (empty: as promised)."""
    from fnmatch import fnmatch

    problems = []
    lines = error_lines(result["stderr"])
    if "Traceback" in result["stderr"] or "Exception ignored" in result["stderr"]:
        problems.append("traceback on stderr")
    if result["code"] != case.code:
        problems.append(f"exit code {result['code']}, expected {case.code}")
    if case.max_seconds is not None and result["seconds"] > case.max_seconds:
        problems.append(f"took {result['seconds']} s (at most {case.max_seconds} s)")
    if case.max_memory_mb is not None and result["peak_memory_growth_mb"] > case.max_memory_mb:
        problems.append(f"peak memory grew by {result['peak_memory_growth_mb']} MB (at most {case.max_memory_mb})")
    changed = [path for path in result["changed"] if not any(fnmatch(path, pattern) for pattern in case.allow)]
    if changed and (case.code != 0 or case.unchanged):
        problems.append(f"changed or deleted existing output: {changed[:3]}")
    if case.same_as and (
        results is None or result["sha256"] is None or result["sha256"] != results[case.same_as]["sha256"]
    ):
        problems.append(f"{case.fingerprint} differs from case {case.same_as}'s")
    if case.code == 130:
        if not lines or "interrupted" not in lines[-1]:
            problems.append("no 'interrupted' line")
        return problems
    if case.code == 0:
        if case.expect_stderr and case.expect_stderr not in result["stderr"]:
            problems.append(f"stderr lacks {case.expect_stderr!r}")
        return problems
    errors = [line for line in lines if line.startswith("onsft: error:")]
    if len(errors) != 1 or lines[-1] != errors[0]:
        problems.append(f"{len(errors)} error lines; the error must be the one last line")
        return problems
    line = errors[0]
    if case.early and len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr before any model loads, expected only the error")
    if case.expect not in line:
        problems.append(f"message lacks {case.expect!r}")
    if case.where is not None and case.where not in line:
        problems.append(f"message does not name {case.where!r}")
    if case.line is not None and f":{case.line}: " not in line:
        problems.append(f"message does not give line {case.line}")
    if " Fix: " not in line:
        problems.append("message gives no fix")
    left = [path for path in result["created"] if not any(fnmatch(path, pattern) for pattern in case.allow)]
    if left:
        problems.append(f"left output behind: {left[:3]}")
    return problems


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    namespace = namespaces_work()
    full_disk = root / "fs_full"
    read_only = root / "fs_ro" if namespace else root / "data" / "good.jsonl" / "below_a_file"
    full_disk.mkdir()
    cases, models = fault_corpus.build(root, str(full_disk), str(read_only))
    plan = root / "plan.json"
    plan.write_text(
        json.dumps({"full_disk": str(full_disk), "read_only": str(read_only), "cases": [c.to_json() for c in cases]})
    )
    results_path = root / "results.json"
    runner = [sys.executable, str(ROOT / "tests" / "fault_runner.py"), str(plan), str(results_path)]
    if namespace:
        runner = ["unshare", "--user", "--map-root-user", "--mount", *runner]
    started = time.time()
    process = subprocess.Popen(
        runner,
        env={**env(), "ONSFT_FAULTS_NAMESPACE": "1" if namespace else "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # While the runner works, the sample runs as real processes (2 processes on 2 cores).
    by_name = {c.name: c for c in cases}
    sample = {}
    for name in SUBPROCESS_SAMPLE:
        done = subprocess.run(
            [sys.executable, "-m", "onsft.cli", *by_name[name].argv],
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        sample[name] = {"code": done.returncode, "stderr": done.stderr}
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    ran = json.loads(results_path.read_text())
    results = {r["name"]: r for r in ran["results"]}
    REPORT["inputs"] = {
        "mechanism": ran["mechanism"],
        "seconds": round(time.time() - started, 1),
        "root": str(root),
        "cases": [{**c.to_json(), **results[c.name]} for c in cases],
    }
    REPORT["gaps"] = KNOWN_GAPS
    return cases, results, sample, ran["mechanism"]


@pytest.mark.slow
def test_corpus_covers_every_command_with_enough_bad_inputs(corpus):
    cases, *_ = corpus
    bad = [c for c in cases if c.code == 2]
    per_command = {
        name: sum(c.command == name for c in bad) for name in ("train", "audit", "rewrite", "eval", "pairs", "compare")
    }
    assert len(bad) >= 25 and min(per_command.values()) >= 5, per_command


# Issue 15's classes and the commands each must cover with cases that exit 2 (at least MIN_PER_COMMAND each).
CLASSES = {
    "rerun": ("train", "rewrite", "audit", "eval", "pairs", "compare"),
    "lock": ("train", "rewrite", "audit", "eval", "pairs", "compare"),
    "output": ("rewrite", "audit", "eval", "pairs"),
    "library": ("train", "audit", "eval", "pairs", "rewrite", "compare"),
    "finite": ("train", "audit", "eval", "pairs", "rewrite", "compare"),
    "early": ("eval", "pairs", "audit"),
    "useless": ("train", "audit", "eval", "pairs", "compare"),
    "huge": ("train", "audit", "eval", "pairs", "rewrite"),
    "message": ("train", "eval", "pairs"),
}


@pytest.mark.slow
def test_corpus_covers_every_class_of_issue_15(corpus):
    cases, *_ = corpus
    bad = [c for c in cases if c.code == 2]
    for kind, commands in CLASSES.items():
        mine = [c for c in bad if c.kind == kind]
        per_command = {name: sum(c.command == name for c in mine) for name in commands}
        assert len(mine) >= 6 and min(per_command.values()) >= 2, (kind, per_command)
    # Every rerun chain: a reference, Ctrl-C, other settings refused, the same command resumed to the reference.
    chains = {c.name.rsplit("_rerun_", 1)[0] for c in cases if "_rerun_" in c.name}
    assert chains == {"train", "rewrite", "audit", "eval", "pairs", "compare"}, chains
    resumed = [c for c in cases if c.same_as]
    assert {c.command for c in resumed} == chains and all(c.fingerprint for c in resumed)


@pytest.mark.slow
def test_resumed_training_reports_the_loss_of_the_whole_run(corpus):
    """After a Ctrl-C and a resume, train_summary.json's train_loss is the mean over all 16 steps (the loss
    transformers reports covers only the steps since the resume), equal to the uninterrupted run's."""
    cases, results, *_ = corpus
    assert results["train_rerun_interrupted"]["code"] == 130
    folders = {c.name: Path(c.watch) for c in cases}
    resumed = json.loads((folders["train_rerun_resumed"] / "train_summary.json").read_text())
    reference = json.loads((folders["train_rerun_reference"] / "train_summary.json").read_text())
    assert resumed["resumed_from"] is not None and reference["resumed_from"] is None
    assert resumed["global_step"] == reference["global_step"] == 16
    assert resumed["train_loss_this_run"] != pytest.approx(reference["train_loss"], rel=1e-3)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-6)
    said = results["train_rerun_resumed"]["stderr"]
    assert re.search(r"^onsft train: resuming: (\d+) of 16 done \(steps, checkpoint-\1\)$", said, re.M), said
    # The compute a resumed run reports is the whole run's: the earlier call's training time comes from its
    # checkpoint (issue 21: a resumed run counted only its resumed part).
    assert reference["cost_before_this_run"] == {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    earlier = resumed["cost_before_this_run"]
    assert earlier["wall_seconds"] > 0 and earlier["cpu_seconds"] > 0
    assert (
        earlier["wall_seconds"] < resumed["train_seconds"] <= earlier["wall_seconds"] + resumed["wall_seconds_this_run"]
    )


@pytest.mark.slow
def test_every_hostile_input_gives_one_line_exit_2_and_no_partial_output(corpus):
    cases, results, _, _ = corpus
    failures, gaps = {}, {}
    reported = {row["name"]: row for row in REPORT["inputs"]["cases"]}
    for case in cases:
        problems = judge(case, results[case.name], results)
        (gaps if case.name in KNOWN_GAPS else failures)[case.name] = problems
        reported[case.name]["problems"] = problems
        reported[case.name]["judged"] = True
    failures = {k: v for k, v in failures.items() if v}
    assert not failures, json.dumps(failures, indent=1)
    fixed = [name for name, problems in gaps.items() if not problems]
    assert not fixed, f"{fixed} now pass: remove them from KNOWN_GAPS"


@pytest.mark.slow
def test_full_disk_run_resumes_to_the_clean_output(corpus):
    _, results, _, mechanism = corpus
    assert mechanism in ("tmpfs", "rlimit")
    stopped = results["disk_full"]
    # Finished records kept with the run's settings record, no final file.
    assert stopped["created"] == ["audit/run.json", "audit/scores.jsonl.partial"]
    assert results["disk_full_rerun"]["sha256"] == results["clean_reference"]["sha256"] is not None


@pytest.mark.slow
def test_real_processes_print_the_same_line(corpus):
    _, results, sample, _ = corpus
    for name, done in sample.items():
        assert done["code"] == 2 and "Traceback" not in done["stderr"], (name, done["stderr"][-2000:])
        assert error_lines(done["stderr"]) == error_lines(results[name]["stderr"]), name
    REPORT["subprocess"] = [
        {"name": name, "code": done["code"], "line": error_lines(done["stderr"])[-1]} for name, done in sample.items()
    ]


# -------------------------------------------------------------------------------------------- kills


def partial_rows(path: Path) -> int:
    """Complete records in a resumable .partial file (its first line is the settings fingerprint)."""
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def checkpoints(folder: Path, complete: bool) -> int:
    steps = [
        int(p.name.split("-")[1])
        for p in folder.glob("checkpoint-*")
        if not complete or (p / "trainer_state.json").is_file()
    ]
    return max(steps, default=0)


def run_killed(argv: list[str], progress, target: int, delay: float, timeout: float = 300) -> dict:
    """Start `onsft argv`; SIGKILL it `delay` seconds after progress() reaches `target`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "onsft.cli", *argv], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + timeout
    reached = None
    while process.poll() is None and time.time() < deadline:
        if progress() >= target:
            time.sleep(delay)
            reached = progress()
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    _, stderr = process.communicate(timeout=120)
    killed = process.returncode == -signal.SIGKILL
    assert killed or process.returncode == 0, stderr.decode()[-3000:]
    return {"target": target, "delay_ms": round(1000 * delay), "progress_at_kill": reached, "killed": killed}


class Job:
    """One command to kill and resume: its argv for an output folder, its progress measure and outputs."""

    def __init__(self, name, argv, total, progress, outputs, targets):
        self.name, self.argv, self.total, self.progress, self.outputs = name, argv, total, progress, outputs
        self.targets = targets  # (target, max delay) per kill

    def left(self, out: Path) -> str:
        """What the kill left on disk, for the report."""
        if self.name == "train":
            present, complete = checkpoints(out, complete=False), checkpoints(out, complete=True)
            if present == complete:
                return f"newest checkpoint-{present} complete" if present else "no checkpoint yet"
            return f"checkpoint-{present} torn (no trainer_state.json), checkpoint-{complete} complete"
        partials = list(out.glob("*.partial"))
        finals = sorted(p.name for p in out.glob("*.jsonl"))
        return f"{sum(partial_rows(p) for p in partials)} records in .partial" + (
            f"; final {', '.join(finals)}" if finals else ""
        )

    def chain(self, out: Path, seed: int) -> list[dict]:
        rng = random.Random(seed)
        kills = []
        for target, max_delay in self.targets(rng):
            kill = run_killed(self.argv(out), lambda: self.progress(out), target, rng.uniform(0, max_delay))
            kill["left"] = self.left(out)
            kills.append(kill)
        done = subprocess.run(
            [sys.executable, "-m", "onsft.cli", *self.argv(out)], env=env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return kills


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    tokenizer = fault_corpus.tiny_tokenizer()
    model = fault_corpus.save(fault_corpus.talker(len(tokenizer)), tokenizer, root / "model")
    rows = fault_corpus.good_rows(40)
    data = root / "data.jsonl"
    data.write_text(fault_corpus.jsonl(rows))
    short = root / "short.jsonl"
    short.write_text(fault_corpus.jsonl(rows[:16]))
    # The tiny model answers nothing right and rarely ends within 12 tokens: a rewrite keeping none is exit 2,
    # so this verifier accepts some of its responses (cut ones kept).
    lenient = root / "lenient.py"
    lenient.write_text("def check(response, answer):\n    return len(response) % 3 != 0\n")
    common = ["--model", model]
    jobs = [
        Job(
            "audit",
            lambda out: [
                "audit",
                *common,
                "--data",
                str(data),
                "--out",
                str(out),
                "--score_batch_size",
                "1",
                "--progress",
                "false",
                "--worst",
                "2",
            ],
            40,
            lambda out: partial_rows(out / "scores.jsonl.partial") + 100 * (out / "scores.jsonl").exists(),
            ["scores.jsonl", "kept.jsonl"],
            # first mid-scoring, then anywhere up to the report (100 = scores.jsonl final, writing the report)
            lambda rng: [(rng.randint(1, 20), 0.01), (rng.choice([rng.randint(21, 39), 100]), 0.05)],
        ),
        Job(
            "eval",
            lambda out: [
                "eval",
                *common,
                "--data",
                str(short),
                "--out",
                str(out),
                "--batch_size",
                "2",
                "--samples",
                "2",
                "--max_new_tokens",
                "12",
                "--verifier",
                "exact",
                "--plot",
                "false",
            ],
            16,
            lambda out: partial_rows(out / "generations.jsonl.partial"),
            ["generations.jsonl"],
            lambda rng: [(rng.randint(1, 7), 0.02), (rng.randint(9, 15), 0.02)],
        ),
        Job(
            "rewrite",
            lambda out: [
                "rewrite",
                *common,
                "--data",
                str(short),
                "--out",
                str(out),
                "--chunk_size",
                "2",
                "--own_samples",
                "2",
                "--max_new_tokens",
                "12",
                "--verifier",
                f"{lenient}:check",
                "--keep_truncated",
                "true",
                "--hint_template",
                "Q: {question} R: {reference}",
                "--hint_system",
                "",
                "--progress",
                "false",
            ],
            16,
            lambda out: partial_rows(out / "records.jsonl.partial"),
            ["records.jsonl", "train.jsonl"],
            lambda rng: [(rng.randint(1, 7), 0.02), (rng.randint(9, 15), 0.02)],
        ),
        Job(
            "train",
            lambda out: [
                "train",
                *common,
                "--data",
                str(short),
                "--output_dir",
                str(out),
                "--max_steps",
                "12",
                "--save_steps",
                "2",
                "--per_device_train_batch_size",
                "2",
                "--learning_rate",
                "1e-2",
                "--max_length",
                "64",
                "--use_cpu",
                "true",
                "--disable_tqdm",
                "true",
                "--report_to",
                "none",
                "--seed",
                "3",
                "--logging_steps",
                "1",
            ],
            12,
            None,
            ["model/model.safetensors"],
            None,
        ),
    ]
    train = jobs[3]
    # Kill 1 the moment a checkpoint folder appears (mid-save: a torn checkpoint), kill 2 at a random moment
    # after a later checkpoint completed.
    train.progress = lambda out: checkpoints(out, complete=False)
    train.targets = lambda rng: [(2 * rng.randint(1, 3), 0.0), (2 * rng.randint(4, 5), 0.1)]
    # References in this process while the killed chains run in a thread pool (2 processes at a time).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        chains = {job.name: pool.submit(job.chain, root / f"{job.name}-killed", seed=len(job.name)) for job in jobs}
        for job in jobs:
            assert cli.main(job.argv(root / f"{job.name}-reference")) == 0
        kills = {name: future.result() for name, future in chains.items()}
    return root, {job.name: job for job in jobs}, kills


@pytest.mark.slow
@pytest.mark.parametrize("name", ["audit", "eval", "rewrite", "train"])
def test_sigkill_twice_then_finish_equals_the_uninterrupted_run(kill_runs, name):
    root, jobs, kills = kill_runs
    job, killed, reference = jobs[name], root / f"{name}-killed", root / f"{name}-reference"
    assert kills[name][0]["killed"], kills[name]  # the first kill always lands mid-run
    assert not list(killed.glob("*.partial"))
    for output in job.outputs:
        if (reference / output).exists() or output.endswith("safetensors"):
            if output.endswith("safetensors"):
                from safetensors.torch import load_file

                ours, theirs = load_file(killed / output), load_file(reference / output)
                assert ours.keys() == theirs.keys()
                assert all(torch.equal(ours[k], theirs[k]) for k in ours), "final weights differ"
            else:
                assert (killed / output).read_bytes() == (reference / output).read_bytes(), output
    if name == "train":
        summary = json.loads((killed / "train_summary.json").read_text())
        assert summary["global_step"] == 12 and summary["resumed_from"] is not None
    else:
        first = {"audit": "scores.jsonl", "eval": "generations.jsonl", "rewrite": "records.jsonl"}[name]
        records = [json.loads(line) for line in (killed / first).read_text().splitlines()]
        assert [r["id"] for r in records] == list(range(job.total))  # every record once, in input order
    REPORT.setdefault("kills", {})[name] = kills[name]


# ---------------------------------------------------------------------------------------- numeric


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    tokenizer = fault_corpus.tiny_tokenizer()
    tilde = tokenizer.convert_tokens_to_ids("~")
    model = fault_corpus.save(fault_corpus.talker(len(tokenizer), nan_token=tilde), tokenizer, tmp_path / "nan")
    rows = fault_corpus.good_rows(6)
    rows[1]["prompt"], rows[4]["completion"] = "Copy a~b.", "It is a~b."  # NaN in a prompt, and in a response
    data = tmp_path / "data.jsonl"
    data.write_text(fault_corpus.jsonl(rows))
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        model,
        "--data",
        str(data),
        "--output_dir",
        str(out),
        "--max_steps",
        "12",
        "--per_device_train_batch_size",
        "1",
        "--learning_rate",
        "1e-2",
        "--max_length",
        "64",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--nonfinite",
        "skip",
    ]
    assert cli.main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    # 12 steps of one row = 2 epochs of 6 rows: each of the 2 NaN rows is met twice, every time skipped.
    assert summary["global_step"] == 12 and summary["skipped_nonfinite"] == 4
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(v == 0.0 for v in losses) == 4  # the skipped micro-batches contribute exactly nothing
    from safetensors.torch import load_file

    weights = load_file(out / "model" / "model.safetensors")
    for name, tensor in weights.items():
        finite = torch.isfinite(tensor)
        if name == "model.embed_tokens.weight":
            assert not finite[tilde].any() and finite[torch.arange(len(tensor)) != tilde].all()
        else:
            assert finite.all(), name  # nothing else caught the NaN
    REPORT["nonfinite"] = {
        "rows": 6,
        "nan_rows": 2,
        "steps": 12,
        "skipped_nonfinite": summary["skipped_nonfinite"],
        "losses_finite": True,
    }


def organism_available() -> bool:
    from onsft.runtime.aliases import organism_path

    return (organism_path() / "config.json").is_file() and (organism_path() / "model.safetensors").is_file()


def test_bf16_agrees_with_fp32(tmp_path):
    """Audit scores and a short training run in bf16 against fp32: the stated tolerances are what bf16's
    8-bit mantissa allows on these models (measured, with ~3x margin)."""
    from onsft.data.rows import parse_example
    from onsft.pipeline.audit.auditing import AuditConfig, score_examples
    from onsft.runtime.models import load_model, load_tokenizer

    if organism_available():
        from onsft.organism.tasks import new_skill_train

        model_name, rows, subject = "organism", new_skill_train(8, 0), "organism"
    else:  # the organism checkpoint has not landed: the tiny talker instead, and the report says so
        tokenizer = fault_corpus.tiny_tokenizer()
        model_name = fault_corpus.save(fault_corpus.talker(len(tokenizer)), tokenizer, tmp_path / "tiny")
        rows, subject = fault_corpus.good_rows(32), "tiny model (organism checkpoint missing)"
    examples = [parse_example(r, i, i + 1, "rows", True) for i, r in enumerate(rows)]
    tokenizer = load_tokenizer(model_name)
    config = AuditConfig(data="rows", out="unused", max_length=512)
    phi = {}
    for dtype in (torch.float32, torch.bfloat16):
        phi[dtype] = [
            r["mean_phi"] for r in score_examples(load_model(model_name, dtype=dtype), tokenizer, examples, config)
        ]
    gaps = [abs(a - b) for a, b in zip(phi[torch.float32], phi[torch.bfloat16])]
    mean32, mean16 = (sum(v) / len(v) for v in phi.values())
    # Per response, a short response's mean phi moves by up to ~0.08 nats/token (bf16 keeps 8 bits of mantissa);
    # the dataset mean, what the audit's verdicts rest on, by ~0.002.
    assert max(gaps) < 0.15 and abs(mean32 - mean16) < 0.02, (max(gaps), mean32, mean16)

    data = tmp_path / "train.jsonl"
    data.write_text(fault_corpus.jsonl(rows))
    losses = {}
    for bf16 in ("false", "true"):
        out = tmp_path / f"bf16-{bf16}"
        argv = [
            "train",
            "--model",
            model_name,
            "--data",
            str(data),
            "--output_dir",
            str(out),
            "--loss",
            "nll",
            "--max_steps",
            "6",
            "--save_steps",
            "100",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-3",
            "--max_length",
            "512",
            "--use_cpu",
            "true",
            "--disable_tqdm",
            "true",
            "--report_to",
            "none",
            "--logging_steps",
            "1",
            "--seed",
            "0",
            "--bf16",
            bf16,
        ]
        assert cli.main(argv) == 0
        losses[bf16] = [
            r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        ]
    relative = [abs(a - b) / abs(a) for a, b in zip(losses["false"], losses["true"])]
    assert len(relative) == 6 and relative[0] < 0.02 and max(relative) < 0.1, relative
    REPORT["bf16"] = {
        "subject": subject,
        "rows": len(rows),
        "max_abs_mean_phi_gap": max(gaps),
        "mean_phi_fp32": mean32,
        "mean_phi_bf16": mean16,
        "loss_fp32": losses["false"],
        "loss_bf16": losses["true"],
        "max_rel_loss_gap": max(relative),
    }
