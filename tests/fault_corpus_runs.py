"""Fault cases of issue 15 ("nothing lost, nothing silent"), added to tests/fault_corpus.py's corpus.

Each class of the issue has cases over the commands it concerns; every bad case must exit 2 with one line and
leave every existing output unchanged (the runner hashes the case's folder before and after):
  - rerun   an output folder holding a run with other settings: refused (train, rewrite, audit, eval, pairs
            and compare cells); the same command resumes an interrupted run exactly (the finished output
            equals an uninterrupted run's, byte for byte) and a finished one is left as it is;
  - lock    another live process writing the same output: refused, its files untouched;
  - output  an output that is (or resolves to) an input file;
  - library values the libraries reject late (TrainingArguments, torch's optimiser, peft, data loaders) and
            chat templates that reject a row;
  - finite  NaN / infinite numbers in float options (flags, config files, experiments);
  - early   late validation: inputs (models, files, lengths) checked before the first forward pass;
  - useless runs that would exit 0 on a useless result (nothing to train, only unknown tokens, identical
            DPO pairs, a negative LoRA rank);
  - huge    a 50 MB line: refused from its length before tokenising (little memory, little time);
  - message messages that named the wrong option.
Issue 21 adds cases to these classes (`_issue21`): devices this machine or this PyTorch lacks (early), compare's
experiment values of the wrong type and flags blamed on the experiment file (input, message), a mistyped model
alias, the offline message and a negative number list read as a flag (message, input).
"""

from __future__ import annotations

import json
from pathlib import Path

import fault_corpus
from tiny import CHAT_TEMPLATE, tiny_tokenizer

HUGE = 50 * 2**20  # one 50 MB line
# A hint short enough for the tiny models' 256 positions (the default instruction is longer).
SHORT_HINT = ("--hint_template", "Q: {question} R: {reference}", "--hint_system", "")
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_models(root: Path) -> dict[str, str]:
    """Models whose chat template rejects rows, and one with another vocabulary (a wrong --base_model)."""
    models = {}
    for name, template in (("no_system", NO_SYSTEM_TEMPLATE), ("alternating", ALTERNATING_TEMPLATE)):
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = template
        models[name] = fault_corpus.save(fault_corpus.talker(len(tokenizer)), tokenizer, root / name)
    tokenizer = tiny_tokenizer()
    assert tokenizer.chat_template == CHAT_TEMPLATE
    models["other_vocab"] = fault_corpus.save(fault_corpus.talker(len(tokenizer) + 7), tokenizer, root / "other_vocab")
    return models


def add_cases(c) -> None:
    """Append the cases to the corpus `c` (its helpers and paths: fault_corpus.build's namespace)."""
    models = {**c.models, **build_models(c.root / "models")}
    _reruns(c, c.write("sixteen.jsonl", fault_corpus.good_rows(16)))
    _outputs(c)
    _library(c, models)
    _finite(c)
    _early(c, models)
    _useless(c)
    _rewrite_options(c)
    _huge(c)
    _messages(c)
    _issue21(c)
    _issue21_runs(c, models)


# ----------------------------------------------------------------------------------- rerun and lock


def _sequence(c, command, folder: Path, argv, target, progress_file, lines, changed, lock, what, data, edited):
    """The rerun and lock cases of one command writing to `target` (a folder, or pairs' file) under `folder`:
    an uninterrupted reference; the same run interrupted (Ctrl-C once `progress_file` holds `lines` lines);
    other settings into it, and the same flags over the `data` file edited in place (refused, nothing
    changed); a live writer's lock, and one of a writer on another host (refused); the same command again
    (resumes; equals the reference); and once more over a dead writer's lock (finished: nothing to do)."""
    run, reference = folder / "run", folder / "reference"

    def args(where: Path, *extra):
        return [command, *argv(where), *extra]

    fingerprint = target
    name = f"{command}_rerun"
    common = dict(kind="rerun", early=False)
    c.cases.append(
        c.Case(
            f"{name}_reference",
            command,
            f"{what}: an uninterrupted run (the reference)",
            args(reference),
            code=0,
            watch=str(reference),
            fingerprint=fingerprint,
            **common,
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_interrupted",
            command,
            "the same run, stopped by Ctrl-C part-way",
            args(run),
            expect="interrupted",
            code=130,
            watch=str(run),
            steps=[["interrupt_when", str(run / progress_file), str(lines)]],
            **common,
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_other_settings",
            command,
            f"rerun into the unfinished output with other settings ({' '.join(changed)})",
            args(run, *changed),
            expect="different settings",
            where=str(run),
            watch=str(run),
            **common,
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_data_edited",
            command,
            "the same command, its data file edited in place since (same path, other rows)",
            args(run),
            expect="different settings",
            where=str(run),
            watch=str(run),
            steps=[["replace", data, edited]],
            after=[["restore", data]],
            **common,
        )
    )
    lock_path = run / lock
    c.cases.append(
        c.Case(
            f"{name}_locked_elsewhere",
            command,
            "the same command while a process on another host holds the lock (a shared folder)",
            args(run),
            expect="another onsft process (pid 4242 on another-host.example)",
            watch=str(run),
            steps=[["lock_elsewhere", str(lock_path)]],
            after=[["unlock", str(lock_path)]],
            **{**common, "kind": "lock"},
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_locked",
            command,
            "the same command while another live process holds the output's lock",
            args(run),
            expect="another onsft process",
            watch=str(run),
            steps=[["lock", str(lock_path)]],
            after=[["unlock", str(lock_path)]],
            **{**common, "kind": "lock"},
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_resumed",
            command,
            "the same command again: resumes and finishes",
            args(run),
            code=0,
            watch=str(run),
            fingerprint=fingerprint,
            same_as=f"{name}_reference",
            expect_stderr=f"onsft {command}: resuming: ",  # every resumable command says so in one line
            **common,
        )
    )
    c.cases.append(
        c.Case(
            f"{name}_finished",
            command,
            "the same command once more, over the lock of a writer that died: the finished run is left as it is",
            args(run),
            code=0,
            watch=str(run),
            steps=[["stale_lock", str(lock_path)]],
            allow=["*.lock"],  # the dead writer's lock is taken over and released
            fingerprint=fingerprint,
            same_as=f"{name}_reference",
            unchanged=command != "audit",  # audit rebuilds its summary and report from the kept scores
            **common,
        )
    )


def _edited(c, name: str, path: str) -> str:
    """`path`'s rows with the first response changed: the same file edited in place, for the `replace` step."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    rows[0] = {**rows[0], "completion": rows[0]["completion"] + " (edited)"}
    return c.write(name, rows)


def _reruns(c, sixteen: str) -> None:
    tiny, many, out = c.tiny, c.many, c.out
    sixteen_edited, many_edited = _edited(c, "sixteen_edited.jsonl", sixteen), _edited(c, "many_edited.jsonl", many)
    lenient = c.write("lenient_verifier.py", "def check(response, answer):\n    return len(response) % 3 != 0\n")
    lenient += ":check"
    _sequence(
        c,
        "train",
        out / "rerun_train",
        lambda where: [
            "--model",
            tiny,
            "--data",
            sixteen,
            "--output_dir",
            str(where),
            "--max_steps",
            "16",
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
        "model/model.safetensors",
        "checkpoint-4/trainer_state.json",
        0,
        ["--learning_rate", "5e-3"],
        ".run.json.lock",
        "train 16 steps",
        sixteen,
        sixteen_edited,
    )
    _sequence(
        c,
        "rewrite",
        out / "rerun_rewrite",
        lambda where: [
            "--model",
            tiny,
            "--data",
            sixteen,
            "--out",
            str(where),
            "--chunk_size",
            "2",
            "--own_samples",
            "2",
            "--max_new_tokens",
            "8",
            # The tiny model answers nothing right and rarely ends within 8 tokens: a verifier that accepts
            # some of its responses, cut ones included, so the run keeps rows (keeping none is exit 2).
            "--verifier",
            lenient,
            "--keep_truncated",
            "true",
            "--hint_template",
            "Q: {question} R: {reference}",
            "--hint_system",
            "",
            "--progress",
            "false",
        ],
        "records.jsonl",
        "records.jsonl.partial",
        3,
        ["--hint_beta", "2.0"],
        ".run.json.lock",
        "rewrite 16 rows",
        sixteen,
        sixteen_edited,
    )
    _sequence(
        c,
        "audit",
        out / "rerun_audit",
        lambda where: [
            "--model",
            tiny,
            "--data",
            many,
            "--out",
            str(where),
            "--score_batch_size",
            "1",
            "--progress",
            "false",
        ],
        "scores.jsonl",
        "scores.jsonl.partial",
        3,
        ["--tau", "0.5"],
        ".run.json.lock",
        "audit 40 rows",
        many,
        many_edited,
    )
    _sequence(
        c,
        "eval",
        out / "rerun_eval",
        lambda where: [
            "--model",
            tiny,
            "--data",
            many,
            "--out",
            str(where),
            "--batch_size",
            "2",
            "--samples",
            "2",
            "--max_new_tokens",
            "8",
            "--verifier",
            "exact",
            "--plot",
            "false",
        ],
        "generations.jsonl",
        "generations.jsonl.partial",
        3,
        ["--max_new_tokens", "9"],
        ".run.json.lock",
        "eval 40 rows",
        many,
        many_edited,
    )
    _sequence(
        c,
        "pairs",
        out / "rerun_pairs",
        lambda where: [
            "--model",
            tiny,
            "--data",
            many,
            "--out",
            str(where / "pairs.jsonl"),
            "--batch_size",
            "2",
            "--samples",
            "2",
            "--max_new_tokens",
            "8",
            "--verifier",
            "exact",
        ],
        "pairs.jsonl",
        "pairs.samples.jsonl.partial",
        3,
        ["--samples", "3"],
        ".pairs.run.json.lock",
        "pairs 40 rows",
        many,
        many_edited,
    )
    # compare: the grid's cell trains through train's guard; other train options refuse that cell.
    grid = out / "rerun_compare"
    teacher = c.write("compare_teacher.jsonl", fault_corpus.good_rows())
    teacher_edited = _edited(c, "compare_teacher_edited.jsonl", teacher)
    experiment = {
        "model": tiny,
        "train_data": teacher,
        "in_domain": c.good,
        "methods": ["sft"],
        "seeds": [0],
        "train": {"max_steps": 2, "use_cpu": True, "disable_tqdm": True},
        "eval": {"max_new_tokens": 4},
        "kl_limit": 2,
        "out": str(grid),
    }
    first = c.write("rerun_compare.yaml", json.dumps(experiment))
    other = c.write(
        "rerun_compare_lr.yaml", json.dumps({**experiment, "train": {**experiment["train"], "learning_rate": 1e-3}})
    )
    cell = grid / "cells" / "sft-s0" / "train"
    common = dict(kind="rerun", early=False, watch=str(grid))
    c.cases += [
        c.Case(
            "compare_rerun_first",
            "compare",
            "a one-cell grid (sft, 2 steps)",
            ["compare", "--config", first],
            code=0,
            fingerprint="cells/sft-s0/train/model/model.safetensors",
            **common,
        ),
        c.Case(
            "compare_rerun_other_settings",
            "compare",
            "the grid again with another learning rate for its cells",
            ["compare", "--config", other],
            expect="different settings",
            where=str(cell),
            **common,
        ),
        c.Case(
            "compare_rerun_data_edited",
            "compare",
            "the first grid again, its train_data edited in place since",
            ["compare", "--config", first],
            expect="different settings",
            where=str(cell),
            steps=[["replace", teacher, teacher_edited]],
            after=[["restore", teacher]],
            **common,
        ),
        c.Case(
            "compare_rerun_locked_elsewhere",
            "compare",
            "the grid while a process on another host trains its cell",
            ["compare", "--config", other, "--overwrite"],
            expect="another onsft process (pid 4242 on another-host.example)",
            steps=[["lock_elsewhere", str(cell / ".run.json.lock")]],
            after=[["unlock", str(cell / ".run.json.lock")]],
            **{**common, "kind": "lock"},
        ),
        c.Case(
            "compare_rerun_locked",
            "compare",
            "the grid while another live process trains its cell",
            ["compare", "--config", other, "--overwrite"],
            expect="another onsft process",
            steps=[["lock", str(cell / ".run.json.lock")]],
            after=[["unlock", str(cell / ".run.json.lock")]],
            **{**common, "kind": "lock"},
        ),
        c.Case(
            "compare_rerun_same",
            "compare",
            "the first grid again: every cell is cached, nothing changes",
            ["compare", "--config", first],
            code=0,
            fingerprint="cells/sft-s0/train/model/model.safetensors",
            same_as="compare_rerun_first",
            unchanged=True,
            **common,
        ),
    ]


# ----------------------------------------------------------------------------------- outputs = inputs


def _copy(c, name: str, file: str = "data.jsonl", rows: list | None = None) -> str:
    """A copy of the good rows in the case's own folder (so the runner sees any change to it)."""
    folder = c.out / name
    (folder / file).parent.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows or fault_corpus.good_rows()))
    return str(folder / file)


def _outputs(c) -> None:
    good, out = c.good, c.out
    kind = dict(kind="output")
    data = _copy(c, "pairs_out_is_data")
    c.pairs(
        "pairs_out_is_data",
        "--out naming the --data file",
        data,
        "also an output",
        extra=("--out", data),
        where=data,
        **kind,
    )
    real = Path(_copy(c, "pairs_out_through_a_link", "real/data.jsonl"))
    (real.parent.parent / "link").symlink_to(real.parent, target_is_directory=True)
    c.pairs(
        "pairs_out_through_a_link",
        "--out: the --data file reached through a symbolic link to its folder",
        str(real),
        "also an output",
        extra=("--out", str(real.parent.parent / "link" / "data.jsonl")),
        where=str(real),
        **kind,
    )
    rewrites = _copy(c, "pairs_out_is_rewrites", "rewrites.jsonl")
    c.pairs(
        "pairs_out_is_rewrites",
        "--out naming the --rewrites file",
        good,
        "given to --rewrites",
        extra=("--rewrites", rewrites, "--out", rewrites),
        where=rewrites,
        **kind,
    )
    data = _copy(c, "rewrite_train_out_is_data")
    c.rewrite(
        "rewrite_train_out_is_data",
        "--train_out naming the --data file",
        data,
        "also an output",
        extra=("--train_out", data, *SHORT_HINT),
        where=data,
        **kind,
    )
    previous = out / "rewrite_data_in_out" / "rewrite"
    previous.mkdir(parents=True)
    (previous / "train.jsonl").write_text(Path(good).read_text())
    c.rewrite(
        "rewrite_data_in_out",
        "--data: a train.jsonl inside --out (rewriting a previous rewrite in place)",
        str(previous / "train.jsonl"),
        "also an output",
        extra=SHORT_HINT,
        where="train.jsonl",
        **kind,
    )
    folder = out / "eval_data_in_out" / "eval"
    folder.mkdir(parents=True)
    (folder / "generations.jsonl").write_text(Path(good).read_text())
    c.evaluate(
        "eval_data_in_out",
        "--data: generations.jsonl of the same --out (an earlier eval's output)",
        str(folder / "generations.jsonl"),
        "also an output",
        where="generations.jsonl",
        **kind,
    )
    folder = out / "eval_retention_in_out" / "eval"
    folder.mkdir(parents=True)
    (folder / "retention.jsonl").write_text(Path(good).read_text())
    c.evaluate(
        "eval_retention_in_out",
        "--retention_data: retention.jsonl inside --out",
        good,
        "given to --retention_data",
        extra=("--retention_data", str(folder / "retention.jsonl")),
        where="retention.jsonl",
        **kind,
    )
    folder = out / "audit_data_in_out" / "audit"
    folder.mkdir(parents=True)
    (folder / "kept.jsonl").write_text(Path(good).read_text())
    c.audit(
        "audit_data_in_out",
        "--data: kept.jsonl of the same --out (re-auditing kept rows in place)",
        str(folder / "kept.jsonl"),
        "also an output",
        where="kept.jsonl",
        **kind,
    )
    folder = out / "audit_compare_in_out" / "audit"
    folder.mkdir(parents=True)
    (folder / "scores.jsonl").write_text(Path(good).read_text())
    c.audit(
        "audit_compare_in_out",
        "--compare_data: scores.jsonl inside --out",
        good,
        "given to --compare_data",
        extra=("--compare_data", str(folder / "scores.jsonl")),
        where="scores.jsonl",
        **kind,
    )
    folder = out / "train_data_in_out" / "run"
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(Path(good).read_text())
    c.train(
        "train_data_in_out",
        "--data: a file inside --output_dir named like one of its outputs (metrics.jsonl)",
        str(folder / "metrics.jsonl"),
        "also an output",
        where="metrics.jsonl",
        **kind,
    )
    folder = out / "train_model_in_out" / "run"
    (folder / "model").mkdir(parents=True)
    for item in Path(c.tiny).iterdir():
        (folder / "model" / item.name).write_bytes(item.read_bytes())
    c.train(
        "train_model_in_out",
        "--model: the model folder inside --output_dir (training a model into itself)",
        good,
        "given to --model",
        model=str(folder / "model"),
        where="model",
        **kind,
    )


# ----------------------------------------------------------------------------------- library values


def _library(c, models) -> None:
    good, write = c.good, c.write
    kind = dict(kind="library")
    for flag, value, expect in (
        ("--per_device_train_batch_size", "0", "must be at least 1"),
        ("--gradient_accumulation_steps", "0", "must be at least 1"),
        ("--adam_beta1", "1.5", "must be in [0, 1)"),
        ("--adam_epsilon", "-1", "must be >= 0"),
        ("--dataloader_num_workers", "-1", "must be >= 0"),
        ("--seed", "-1", "must be in [0, 2**32)"),
        ("--save_steps", "0", "must be > 0"),
        ("--weight_decay", "-0.1", "must be >= 0"),
    ):
        c.train(
            f"train_{flag[2:]}_{value}",
            f"{flag} {value}",
            good,
            expect,
            extra=(flag, value),
            where="command line",
            **kind,
        )
    c.train(
        "train_eval_batch_size_0",
        "--per_device_eval_batch_size 0 with --eval_data",
        good,
        "must be at least 1",
        extra=("--eval_data", good, "--per_device_eval_batch_size", "0"),
        where="command line",
        **kind,
    )
    for value in ("1.5", "-0.1"):
        c.train(
            f"train_lora_dropout_{value}",
            f"--lora_dropout {value} (LoRA)",
            good,
            "`lora_dropout` must be in",
            extra=("--lora_r", "4", "--lora_dropout", value),
            where="command line",
            **kind,
        )
    pairs = write("pairs_ok.jsonl", [{"prompt": "Copy ab.", "chosen": "ab", "rejected": "ba"}] * 2)
    c.train(
        "dpo_batch_size_0",
        "--method dpo --per_device_train_batch_size 0",
        pairs,
        "must be at least 1",
        extra=("--method", "dpo", "--per_device_train_batch_size", "0"),
        where="command line",
        **kind,
    )
    c.compare(
        "experiment_batch_size_0",
        "experiment with train: {per_device_train_batch_size: 0}",
        {"train": {"max_steps": 1, "use_cpu": True, "per_device_train_batch_size": 0}},
        "must be at least 1",
        where="experiment (train options of sft)",
        **kind,
    )
    c.train(
        "train_config_grad_accum_0",
        "--config with gradient_accumulation_steps: 0",
        good,
        "must be at least 1",
        extra=("--config", write("accum.yaml", "gradient_accumulation_steps: 0\n")),
        where="accum.yaml",
        **kind,
    )
    # chat templates that reject a row
    system_row = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Copy ab."},
                {"role": "assistant", "content": "ab"},
            ],
            "answer": "ab",
        }
    ]
    with_system = write("with_system.jsonl", [fault_corpus.good_rows(1)[0], *system_row])
    c.train(
        "template_no_system_train",
        "chat template without a system role, a row with one",
        with_system,
        "template rejects this row",
        model=models["no_system"],
        where="with_system.jsonl",
        line=2,
        **kind,
    )
    c.audit(
        "template_no_system_audit",
        "the same, audited",
        with_system,
        "System role not supported",
        model=models["no_system"],
        where="with_system.jsonl",
        line=2,
        **kind,
    )
    c.evaluate(
        "template_no_system_eval",
        "the same, evaluated",
        with_system,
        "template rejects this row",
        model=models["no_system"],
        where="with_system.jsonl",
        line=2,
        **kind,
    )
    c.pairs(
        "template_no_system_pairs",
        "the same, sampled for pairs",
        with_system,
        "template rejects this row",
        model=models["no_system"],
        where="with_system.jsonl",
        line=2,
        **kind,
    )
    c.rewrite(
        "template_no_system_rewrite",
        "hinted context with a system turn, template without a system role",
        c.good,
        "--hint_system",
        model=models["no_system"],
        **kind,
    )
    twice = write(
        "user_twice.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ],
    )
    twice_answered = write(
        "user_twice_answer.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "answer": "c"}],
    )
    for helper, name in ((c.audit, "audit"), (c.evaluate, "eval"), (c.pairs, "pairs")):
        helper(
            f"template_alternation_{name}",
            f"two user turns in a row, template that needs alternation ({name})",
            twice if name == "audit" else twice_answered,
            "roles must alternate",
            model=models["alternating"],
            where="user_twice",
            line=1,
            **kind,
        )
    c.rewrite(
        "template_alternation_rewrite",
        "hinted context opening with a system turn, template that needs user first",
        c.good,
        "roles must alternate",
        model=models["alternating"],
        **kind,
    )
    c.compare(
        "experiment_adam_beta2",
        "experiment with train: {adam_beta2: 1.0}",
        {"train": {"max_steps": 1, "use_cpu": True, "adam_beta2": 1.0}},
        "must be in [0, 1)",
        where="experiment (train options of sft)",
        **kind,
    )
    c.train(
        "template_alternation",
        "two user turns in a row, template that needs alternation",
        twice,
        "roles must alternate",
        model=models["alternating"],
        where="user_twice.jsonl",
        line=1,
        **kind,
    )


# ----------------------------------------------------------------------------------- non-finite numbers


def _finite(c) -> None:
    good, write = c.good, c.write
    kind = dict(kind="finite", where="command line")
    c.train(
        "nan_learning_rate",
        "--learning_rate nan",
        good,
        "must be a finite number",
        extra=("--learning_rate", "nan"),
        **kind,
    )
    c.train(
        "nan_idft_beta",
        "--loss idft --idft_beta nan",
        good,
        "`idft_beta` must be a finite number",
        extra=("--loss", "idft", "--idft_beta", "nan"),
        **kind,
    )
    pairs = write("pairs_beta.jsonl", [{"prompt": "Copy ab.", "chosen": "ab", "rejected": "ba"}])
    c.train(
        "nan_dpo_beta",
        "--method dpo --beta nan",
        pairs,
        "`beta` must be a finite number",
        extra=("--method", "dpo", "--beta", "nan"),
        **kind,
    )
    c.train(
        "inf_config_gamma_max",
        "--config with gamma_max: .inf",
        good,
        "`gamma_max` must be a finite number",
        extra=("--config", write("inf.yaml", "gamma_max: .inf\n")),
        kind="finite",
        where="inf.yaml",
    )
    c.audit(
        "nan_threshold",
        "--threshold nan",
        good,
        "`threshold` must be a finite number",
        extra=("--threshold", "nan"),
        **kind,
    )
    c.audit("inf_alpha", "--alpha inf", good, "`alpha` must be a finite number", extra=("--alpha", "inf"), **kind)
    c.evaluate(
        "nan_temperature",
        "--temperature nan --samples 2",
        good,
        "`temperature` must be a finite number",
        extra=("--temperature", "nan", "--samples", "2"),
        **kind,
    )
    c.evaluate(
        "inf_kl_temperature",
        "--kl_temperature inf",
        good,
        "`kl_temperature` must be a finite number",
        extra=("--kl_temperature", "inf"),
        **kind,
    )
    c.pairs(
        "nan_pairs_temperature",
        "--temperature nan",
        good,
        "`temperature` must be a finite number",
        extra=("--temperature", "nan"),
        **kind,
    )
    c.pairs("nan_top_p", "--top_p -nan", good, "`top_p` must be a finite number", extra=("--top_p=-nan",), **kind)
    c.rewrite(
        "nan_beta",
        "--hint_beta nan (hinted decoding)",
        good,
        "`beta` must be a finite number",
        extra=("--hint_beta", "nan"),
        **kind,
    )
    c.rewrite(
        "inf_own_temperature",
        "--own_temperature inf",
        good,
        "`own_temperature` must be a finite number",
        extra=("--own_temperature", "inf"),
        **kind,
    )
    experiment = (
        f"model: {c.tiny}\ntrain_data: {good}\nin_domain: {good}\nmethods: [sft]\nseeds: [0]\n"
        f"out: {c.out / 'experiment_nan_learning_rate' / 'grid'}\ntrain: {{learning_rate: .nan, use_cpu: true}}\n"
    )
    c.compare(
        "experiment_nan_learning_rate",
        "experiment with train: {learning_rate: .nan}",
        experiment,
        "must be a finite number",
        where="experiment (train options of sft)",
        kind="finite",
    )
    c.compare(
        "experiment_inf_temperature",
        "experiment with eval: {temperature: .inf}",
        {"eval": {"temperature": float("inf")}},
        "must be a finite number",
        where="experiment",
        kind="finite",
    )


# ----------------------------------------------------------------------------------- late validation


def _early(c, models) -> None:
    good, write, root = c.good, c.write, c.root
    kind = dict(kind="early")
    c.evaluate(
        "base_model_truncated",
        "--base_model: weights cut in half (checked before generating)",
        good,
        "cannot load the model",
        extra=("--base_model", models["truncated_weights"]),
        where="truncated_weights",
        **kind,
    )
    c.evaluate(
        "base_model_missing",
        "--base_model: a folder that does not exist",
        good,
        "unknown model",
        extra=("--base_model", str(root / "models" / "gone")),
        where="gone",
        **kind,
    )
    c.evaluate(
        "base_model_other_vocabulary",
        "--base_model with another vocabulary (KL needs one)",
        good,
        "vocabulary",
        extra=("--base_model", models["other_vocab"]),
        where="other_vocab",
        **kind,
    )
    c.evaluate(
        "base_model_no_config",
        "--base_model: a folder with no model",
        good,
        "not a model",
        extra=("--base_model", models["not_a_model"]),
        where="not_a_model",
        **kind,
    )
    long_prompt = write("long_prompt.jsonl", [fault_corpus.good_rows(1)[0], {"prompt": "x" * 60, "answer": "x"}])
    c.evaluate(
        "eval_prompt_over_context",
        "a prompt past a 32-position model's context",
        long_prompt,
        "the model's context is 32",
        model=models["short_context"],
        where="long_prompt.jsonl",
        line=2,
        **kind,
    )
    c.evaluate(
        "retention_prompt_over_context",
        "--retention_data with a prompt past the context",
        good,
        "the model's context is 32",
        model=models["short_context"],
        extra=("--retention_data", long_prompt),
        where="long_prompt.jsonl",
        line=2,
        **kind,
    )
    c.evaluate(
        "kl_prompt_over_context",
        "--kl_data with a prompt past the context",
        good,
        "the model's context is 32",
        model=models["short_context"],
        extra=("--base_model", models["short_context"], "--kl_data", long_prompt),
        where="long_prompt.jsonl",
        line=2,
        **kind,
    )
    c.pairs(
        "pairs_prompt_over_context",
        "a prompt past a 32-position model's context",
        long_prompt,
        "the model's context is 32",
        model=models["short_context"],
        where="long_prompt.jsonl",
        line=2,
        **kind,
    )
    c.pairs(
        "pairs_model_truncated",
        "--model: weights cut in half (fails before any sample or output)",
        good,
        "cannot load the model",
        model=models["truncated_weights"],
        where="truncated_weights",
        **{**kind, "early": False},
    )
    c.audit(
        "compare_data_over_context",
        "--compare_model with a 32-position context and --compare_data past it (checked before scoring)",
        good,
        "longer than the model's context",
        extra=(
            "--compare_model",
            models["short_context"],
            "--compare_data",
            c.write("long_compare.jsonl", [{"prompt": "a", "completion": "b" * 60}]),
        ),
        where="long_compare.jsonl",
        line=1,
        **{**kind, "early": False},
    )
    c.audit(
        "compare_model_truncated",
        "--compare_model: weights cut in half (checked before scoring)",
        good,
        "cannot load the model",
        extra=("--compare_model", models["truncated_weights"]),
        where="truncated_weights",
        **kind,
    )


# ----------------------------------------------------------------------------------- useless results


def _useless(c) -> None:
    good, write = c.good, c.write
    kind = dict(kind="useless")
    c.train(
        "epochs_0",
        "--num_train_epochs 0 (and no --max_steps)",
        good,
        "nothing would train",
        extra=("--max_steps", "-1", "--num_train_epochs", "0"),
        where="command line",
        **kind,
    )
    pairs = write("pairs_epochs.jsonl", [{"prompt": "Copy ab.", "chosen": "ab", "rejected": "ba"}])
    c.train(
        "dpo_epochs_0",
        "--method dpo --num_train_epochs 0",
        pairs,
        "nothing would train",
        extra=("--method", "dpo", "--max_steps", "-1", "--num_train_epochs", "0"),
        where="command line",
        **kind,
    )
    c.compare(
        "experiment_epochs_0",
        "experiment with train: {num_train_epochs: 0}",
        {"train": {"num_train_epochs": 0, "use_cpu": True}},
        "nothing would train",
        where="experiment (train options of sft)",
        **kind,
    )
    for name, extra in (("train_lora_rank_negative", ()), ("dpo_lora_rank_negative", ("--method", "dpo"))):
        data = pairs if extra else good
        c.train(
            name,
            f"--lora_r -4{' ' + ' '.join(extra) if extra else ''} (not full fine-tuning in disguise)",
            data,
            "`lora_r` must be >= 0",
            extra=("--lora_r", "-4", *extra),
            where="command line",
            **kind,
        )
    c.compare(
        "experiment_lora_rank_negative",
        "experiment with train: {lora_r: -8}",
        {"train": {"lora_r": -8, "max_steps": 1, "use_cpu": True}},
        "`lora_r` must be >= 0",
        where="experiment (train options of sft)",
        **kind,
    )
    foreign = [{"prompt": f"Copy {w}.", "completion": w, "answer": w} for w in ("漢字", "かな", "한글", "кот")]
    unknown = write("unknown_script.jsonl", foreign)
    c.train(
        "unknown_tokens_train",
        "responses in scripts the vocabulary lacks (every token unknown)",
        unknown,
        "nothing but unknown tokens",
        where="unknown_script.jsonl",
        line=1,
        **kind,
    )
    c.audit(
        "unknown_tokens_audit",
        "the same, audited",
        unknown,
        "nothing but unknown tokens",
        where="unknown_script.jsonl",
        line=1,
        **kind,
    )
    asked = write("unknown_prompts.jsonl", [{"prompt": w, "answer": "x"} for w in ("漢字", "かな", "кот")])
    c.evaluate(
        "unknown_tokens_eval",
        "prompts in scripts the vocabulary lacks",
        asked,
        "nothing but unknown tokens",
        where="unknown_prompts.jsonl",
        line=1,
        **kind,
    )
    c.pairs(
        "unknown_tokens_pairs",
        "the same, sampled for pairs",
        asked,
        "nothing but unknown tokens",
        where="unknown_prompts.jsonl",
        line=1,
        **kind,
    )
    chat_foreign = write(
        "unknown_chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Copy."}, {"role": "assistant", "content": "🙂🙂"}]},
            {"messages": [{"role": "user", "content": "Copy."}, {"role": "assistant", "content": "üé"}]},
        ],
    )
    c.audit(
        "unknown_tokens_audit_chat",
        "chat rows whose answers are emoji and accented letters only",
        chat_foreign,
        "nothing but unknown tokens",
        where="unknown_chat.jsonl",
        line=1,
        **kind,
    )
    c.evaluate(
        "unknown_tokens_retention",
        "--retention_data whose prompts are all in an unknown script",
        good,
        "nothing but unknown tokens",
        extra=("--retention_data", asked),
        where="unknown_prompts.jsonl",
        line=1,
        **kind,
    )
    emoji = write("emoji_prompts.jsonl", [{"messages": [{"role": "user", "content": "🙂"}], "answer": "x"}])
    c.pairs(
        "unknown_tokens_pairs_chat",
        "chat prompts of emoji only",
        emoji,
        "nothing but unknown tokens",
        where="emoji_prompts.jsonl",
        line=1,
        **kind,
    )
    some = write("some_unknown.jsonl", [*fault_corpus.good_rows(3), foreign[0]])
    c.train(
        "unknown_tokens_some",
        "1 of 4 responses in an unknown script: trains, with a warning and the count",
        some,
        "",
        code=0,
        expect_stderr="1 of 4 responses map to nothing but unknown tokens",
        early=False,
        **kind,
    )
    same = write("identical_pairs.jsonl", [{"prompt": f"Copy {w}.", "chosen": w, "rejected": w} for w in ("ab", "cd")])
    c.train(
        "dpo_identical_pairs",
        "--method dpo on pairs whose chosen equals rejected",
        same,
        "chosen equal to rejected",
        extra=("--method", "dpo"),
        where="identical_pairs.jsonl",
        line=1,
        **kind,
    )
    c.train(
        "simpo_identical_pairs",
        "--method simpo on the same pairs",
        same,
        "chosen equal to rejected",
        extra=("--method", "simpo"),
        where="identical_pairs.jsonl",
        line=1,
        **kind,
    )
    mixed = write(
        "some_identical.jsonl",
        [
            {"prompt": "Copy ab.", "chosen": "ab", "rejected": "ab"},
            {"prompt": "Copy cd.", "chosen": "cd", "rejected": "dc"},
        ],
    )
    c.train(
        "dpo_some_identical_pairs",
        "1 of 2 pairs identical: trains on the other, with a warning and the count",
        mixed,
        "",
        code=0,
        extra=("--method", "dpo", "--max_steps", "1"),
        early=False,
        expect_stderr="1 of 2 pairs have chosen equal to rejected",
        **kind,
    )
    never = c.write("never_verifier.py", "def check(response, answer):\n    return False\n") + ":check"
    nothing = c.out / "rewrite_keeps_nothing"
    c.rewrite(
        "rewrite_keeps_nothing",
        "a rewrite in which no response verifies (0 rows kept)",
        good,
        "the rewrite kept 0 of 8 rows (8 not verified)",
        extra=("--verifier", never, *SHORT_HINT),
        where="records.jsonl.partial",
        early=False,
        allow=["rewrite/records.jsonl.partial", "rewrite/run.json"],  # the finished rows, for inspection
        **kind,
    )
    c.rewrite(
        "rewrite_keeps_nothing_again",
        "the same command again: fails at once, nothing written",
        good,
        "the rewrite kept 0 of 8 rows (8 not verified)",
        extra=("--verifier", never, *SHORT_HINT, "--out", str(nothing / "rewrite")),
        where="records.jsonl.partial",
        early=False,
        watch=str(nothing),
        **kind,
    )


def _rewrite_options(c) -> None:
    """Bad values of the rewrite's options (truncation, best-of-n, step check): one line naming the option."""
    for name, what, extra, expect in (
        ("keep_truncated_not_bool", "--keep_truncated maybe", ("--keep_truncated", "maybe"), "keep_truncated"),
        ("samples_per_prompt_0", "--samples_per_prompt 0", ("--samples_per_prompt", "0"), "`samples_per_prompt`"),
        ("step_check_unknown", "--step_check maybe", ("--step_check", "maybe"), "step_check"),
        ("keep_unknown", "--keep most", ("--keep", "most"), "invalid choice: 'most'"),
        ("beta_ladder_word", "--beta_ladder 1,high", ("--beta_ladder", "1,high"), "`beta_ladder` entry `high`"),
        ("beta_ladder_nan", "--beta_ladder 0.5,nan", ("--beta_ladder", "0.5,nan"), "`beta_ladder` entry `nan`"),
        ("beta_ladder_negative", "--beta_ladder -1", ("--beta_ladder=-1",), "`beta_ladder` entry `-1`"),
    ):
        # Values argparse rejects are the command line's; values a settings group rejects are its `config`'s.
        where = "config" if name.startswith(("samples_per_prompt", "beta_ladder")) else "command line"
        c.rewrite(f"rewrite_{name}", what, c.good, expect, extra=extra, where=where)
    c.rewrite(
        "rewrite_step_checker_unknown",
        "--step_checker sympy",
        c.good,
        "unknown step checker `sympy`",
        extra=("--step_checker", "sympy"),
        where="--step_checker",
    )
    missing = str(c.root / "data" / "no_steps.py") + ":check"
    c.rewrite(
        "rewrite_step_checker_missing",
        "--step_checker naming a missing file",
        c.good,
        "step checker file not found",
        extra=("--step_checker", missing),
        where="no_steps.py",
    )


# ----------------------------------------------------------------------------------- a 50 MB line


def _huge(c) -> None:
    write = c.write
    kind = dict(kind="huge", max_seconds=30.0, max_memory_mb=1500)
    word = "abcdefgh" * (HUGE // 8)
    rows = fault_corpus.good_rows(2)
    huge_response = write("huge_response.jsonl", [rows[0], {**rows[1], "completion": word}])
    huge_prompt = write("huge_prompt.jsonl", [rows[0], {"prompt": word, "answer": "x"}])
    huge_reference = write("huge_reference.jsonl", [rows[0], {**rows[1], "reference": word}])
    huge_chosen = write("huge_chosen.jsonl", [{"prompt": "Copy ab.", "chosen": word, "rejected": "ba"}])
    c.train(
        "huge_line_train",
        "a 50 MB response (one line)",
        huge_response,
        "longer than max_length=64",
        where="huge_response.jsonl",
        line=2,
        **kind,
    )
    c.audit(
        "huge_line_audit",
        "the same, audited",
        huge_response,
        "longer than max_length",
        where="huge_response.jsonl",
        line=2,
        **kind,
    )
    c.evaluate("huge_line_eval", "a 50 MB prompt", huge_prompt, "cannot fit", where="huge_prompt.jsonl", line=2, **kind)
    c.pairs(
        "huge_line_pairs",
        "the same, sampled for pairs",
        huge_prompt,
        "cannot fit",
        where="huge_prompt.jsonl",
        line=2,
        **kind,
    )
    c.rewrite(
        "huge_line_rewrite",
        "a 50 MB reference solution",
        huge_reference,
        "cannot fit",
        where="huge_reference.jsonl",
        line=2,
        **kind,
    )
    c.train(
        "huge_line_dpo",
        "--method dpo, a 50 MB chosen response",
        huge_chosen,
        "longer than max_length=64",
        extra=("--method", "dpo"),
        where="huge_chosen.jsonl",
        line=1,
        **kind,
    )
    huge_chat = write("huge_chat.jsonl", [{"messages": [{"role": "user", "content": word}], "answer": "x"}, rows[0]])
    c.audit(
        "huge_line_compare_data",
        "the 50 MB response as --compare_data",
        c.good,
        "longer than max_length",
        extra=("--compare_data", huge_response),
        where="huge_response.jsonl",
        line=2,
        **kind,
    )
    c.evaluate(
        "huge_line_retention",
        "a 50 MB prompt in --retention_data",
        c.good,
        "cannot fit",
        extra=("--retention_data", huge_prompt),
        where="huge_prompt.jsonl",
        line=2,
        **kind,
    )
    c.pairs(
        "huge_line_pairs_chat",
        "a 50 MB chat turn",
        huge_chat,
        "cannot fit",
        where="huge_chat.jsonl",
        line=1,
        **kind,
    )
    c.rewrite(
        "huge_line_rewrite_prompt",
        "a 50 MB prompt to rewrite",
        write("huge_rewrite_prompt.jsonl", [rows[0], {**rows[1], "prompt": word}]),
        "cannot fit",
        where="huge_rewrite_prompt.jsonl",
        line=2,
        **kind,
    )
    c.train(
        "huge_line_truncate",
        "--overlong truncate on the 50 MB response: cut before tokenising, trains",
        huge_response,
        "",
        code=0,
        extra=("--overlong", "truncate"),
        early=False,
        **kind,
    )
    c.audit(
        "huge_line_drop",
        "--overlong drop on the 50 MB response: skipped unread by the tokenizer, audits the rest",
        huge_response,
        "",
        code=0,
        extra=("--overlong", "drop"),
        early=False,
        **kind,
    )


# ----------------------------------------------------------------------------------- messages


def _messages(c) -> None:
    good, root = c.good, c.root
    kind = dict(kind="message")
    missing = str(root / "data" / "missing.jsonl")
    for command, flag, extra in (
        ("eval", "--retention_data", ()),
        ("eval", "--kl_data", ("--base_model", c.tiny)),
        ("audit", "--compare_data", ()),
        ("train", "--eval_data", ()),
        ("pairs", "--rewrites", ()),
    ):
        helper = {"eval": c.evaluate, "audit": c.audit, "train": c.train, "pairs": c.pairs}[command]
        helper(
            f"missing_{flag[2:]}",
            f"{flag} naming a missing file (not blamed on --data)",
            good,
            f"check the path given to {flag}.",
            extra=(flag, missing, *extra),
            where="missing.jsonl",
            **kind,
        )
    c.pairs(
        "missing_rewrite_field",
        "--rewrite_field naming a column the --rewrites rows lack",
        good,
        "--rewrite_field",
        extra=("--rewrites", good, "--rewrite_field", "answer_text"),
        where="good.jsonl",
        line=1,
        **kind,
    )
    pairs = c.write("pairs_loss.jsonl", [{"prompt": "Copy ab.", "chosen": "ab", "rejected": "ba"}])
    c.train(
        "loss_with_dpo",
        "--loss idft with --method dpo (an sft option, not an unknown one)",
        pairs,
        "applies to --method sft only",
        extra=("--method", "dpo", "--loss", "idft"),
        where="command line",
        **kind,
    )


# ----------------------------------------------------------------------------------- issue 21


def _issue21(c) -> None:
    good = c.good
    for command, device in (("eval", "mps"), ("audit", "xpu"), ("rewrite", "mps"), ("pairs", "xpu")):
        helper = {"eval": c.evaluate, "audit": c.audit, "rewrite": c.rewrite, "pairs": c.pairs}[command]
        helper(
            f"{command}_device_{device}",
            f"--device {device} on a machine (and a PyTorch) without one: refused before any output",
            good,
            f"device `{device}` requested but no",
            extra=("--device", device),
            where="--device",
            kind="early",
        )
    c.case(
        "replay_device_mps",
        "data",
        "data replay --device mps without one",
        ["replay", "--model", c.tiny, "--data", good, "--out", "{out}/replay.jsonl", "--device", "mps"],
        "device `mps` requested but no",
        where="--device",
        kind="early",
    )
    c.compare("compare_device_xpu", "experiment with device: xpu, without one", {"device": "xpu"}, "requested but no",
              where="--device", kind="early")  # fmt: skip
    c.compare(
        "compare_train_not_an_int",
        "experiment with train: {max_steps: four} (was: '<=' not supported between 'str' and 'int')",
        {"train": {"max_steps": "four", "use_cpu": True}},
        "option `max_steps`: invalid int value: 'four'",
        where="experiment (train options of sft)",
    )
    experiment = {"model": c.tiny, "train_data": good, "in_domain": good, "methods": ["sft"], "out": str(c.out / "x")}
    c.case(
        "compare_methods_flag_unknown",
        "compare",
        "--methods sfx on the command line (was blamed on the experiment file)",
        ["--config", c.write("methods_flag.yaml", json.dumps(experiment)), "--methods", "sfx"],
        "unknown method `sfx`",
        where="--methods",
        kind="message",
    )
    c.evaluate(
        "model_alias_typo",
        "--model organsim (a typo of the alias; was: tried the Hub and blamed the network)",
        good,
        "did you mean organism?",
        model="organsim",
        where="organsim",
        kind="message",
    )
    c.evaluate(
        "model_offline_not_cached",
        "--offline with a Hub id that is not cached (the fix's command in closed backticks)",
        good,
        "`hf download someone/not-cached`), or pass",
        model="someone/not-cached",
        extra=("--offline", "true"),
        where="someone/not-cached",
        kind="message",
    )
    c.rewrite(
        "beta_ladder_negative",
        "--beta_ladder -1,2 (was: read as a flag, 'expected one argument')",
        good,
        "`beta_ladder` entry `-1` is not a finite number >= 0",
        extra=("--beta_ladder", "-1,2", "--samples_per_prompt", "2"),
    )
    _issue21_rows(c)
    _issue21_outputs(c)


def _issue21_outputs(c) -> None:
    """Output files that onsft did not write, and an output over the input (item 2)."""
    notes = c.write("notes.jsonl", [{"mine": "not onsft's"}])
    c.case("gym_out_foreign", "data", "data gym --out a file onsft did not write (was: replaced without a word)",
           ["gym", "--task", "chain_sum", "--size", "3", "--out", notes], "no recorded onsft run wrote",
           where="notes.jsonl", kind="output")  # fmt: skip
    c.case("replay_out_is_data", "data", "data replay --out the --data file (was: replaced the prompts)",
           ["replay", "--model", c.tiny, "--data", c.good, "--out", c.good], "is also an output of this run",
           where="good.jsonl", kind="output")  # fmt: skip
    c.pairs("pairs_out_foreign", "pairs --out a file onsft did not write (was: replaced without a word)", c.good,
            "no recorded onsft run wrote", extra=("--out", notes), where="notes.jsonl", kind="output")  # fmt: skip


def _issue21_rows(c) -> None:
    """Chat rows and JSON lines that used to change without a word (item 4)."""
    turns = [{"role": "user", "content": "Copy ab."}, {"role": "assistant", "content": "It is ab. \\boxed{ab}"}]
    c.train(
        "chat_trailing_user_turn",
        "`messages` ending with a user turn after the last assistant turn (was: trained on the earlier answer)",
        c.write(
            "trailing_user.jsonl",
            [{"messages": turns}, {"messages": [*turns, {"role": "user", "content": "And cd?"}]}],
        ),
        "end with a user turn after the last assistant turn",
        where="trailing_user.jsonl",
        line=2,
    )
    rows = [json.dumps(r) for r in fault_corpus.good_rows(4)]
    rows[2] = rows[2].replace('{"id": 2,', '{"id": 2, "answer": "first",')
    c.audit(
        "json_repeated_key",
        "a JSON line repeating a key (was: the last value kept silently)",
        c.write("repeated_key.jsonl", rows),
        "",
        code=0,
        early=False,
        expect_stderr="repeated_key.jsonl:3: a JSON object repeats the key `answer`",
    )


def _issue21_runs(c, models) -> None:
    """Runs that used to abort, leave files behind or refuse, and now go on or end cleanly (items 5 and 8)."""
    long_prompt = c.write("long_prompt_drop.jsonl", [*fault_corpus.good_rows(2), {"prompt": "x" * 60, "answer": "x"}])
    c.evaluate(
        "eval_overlong_drop",
        "--overlong drop with one prompt past a 32-position context (was: the whole run aborted, and the fix "
        "suggested --limit)",
        long_prompt,
        "",
        model=models["short_context"],
        extra=("--overlong", "drop"),
        code=0,
        early=False,
        expect_stderr="1 row(s) with a prompt of 32+ tokens left out (line 3); the others are evaluated",
        kind="early",
    )
    always = c.write("always_verifier.py", "def check(response, answer):\n    return True\n") + ":check"
    c.pairs(
        "pairs_no_pair",
        "every own sample verifies, so no prompt has a rejected answer (was: a Python dict in the message, and "
        "a summary of a run that made nothing)",
        c.good,
        "no preference pairs from 8 prompts (8 with every sample right)",
        extra=("--verifier", always),
        where="good.jsonl",
        early=False,
        allow=["pairs.samples.jsonl.partial", "pairs.run.json"],
        kind="useless",
    )
    experiment = {"model": c.tiny, "train_data": c.good, "in_domain": c.good, "methods": ["sft", "idft"],
                  "contrasts": [["idft", "sft"]], "seeds": [0], "train": {"max_steps": 1, "use_cpu": True},
                  "eval": {"max_new_tokens": 4}, "out": str(c.out / "compare_methods_drops_contrasts" / "grid")}  # fmt: skip
    c.case(
        "compare_methods_drops_contrasts",
        "compare",
        "--methods sft on an experiment whose contrasts name idft (was: refused, with a fix repeating the YAML)",
        ["--config", c.write("drops_contrasts.yaml", json.dumps(experiment)), "--methods", "sft"],
        code=0,
        early=False,
        expect_stderr="1 contrast(s) of",
        kind="message",
    )
