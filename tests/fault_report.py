"""docs/reliability.md from the results of tests/test_faults.py (see tests/fault_table.py).

Only the framing text is written here; every row of every table comes from a run of the suite.
"""

from __future__ import annotations

from collections import Counter

COMMANDS = ("train", "audit", "rewrite", "eval", "pairs", "compare")
# The fault classes, in the order of the table (see tests/fault_corpus.py and tests/fault_corpus_runs.py).
KINDS = {
    "input": "hostile input files and options",
    "rerun": "a rerun into an output holding other settings (refused); the same command resumes exactly",
    "lock": "another live process writing the same output",
    "output": "an output that is (or resolves to) an input",
    "library": "values the libraries reject late (TrainingArguments, optimiser, peft) and chat templates that "
    "reject a row",
    "finite": "NaN / infinite numbers in float options",
    "early": "inputs checked before the first forward pass (models, lengths)",
    "useless": "runs that would end with exit 0 on a useless result",
    "huge": "a 50 MB line: refused from its length, before tokenising",
    "message": "messages that named the wrong option",
}

# Where each guarantee is tested (static: the files and test names, checked by hand when tests move).
GUARANTEES = [
    (
        "Bad input: one line naming file, line and fix; exit 2; no traceback; nothing left behind",
        "tests/test_faults.py::test_every_hostile_input_gives_one_line_exit_2_and_no_partial_output (the table "
        "below); per command also tests/test_train_cli.py, test_audit.py, test_rewrite.py, test_evaluate.py, "
        "test_preference.py, test_compare.py (bad input / bad options)",
    ),
    (
        "The same line and exit code from a real `python -m onsft.cli` process",
        "tests/test_faults.py::test_real_processes_print_the_same_line",
    ),
    (
        "Full disk: one line, finished records kept in the .partial, the rerun after freeing space equals a clean run",
        "tests/test_faults.py::test_full_disk_run_resumes_to_the_clean_output (cases disk_full*)",
    ),
    (
        "SIGKILL at random points (twice), restart: every record exactly once, output bytes equal an "
        "uninterrupted run; training: final fp32 weights bitwise equal",
        "tests/test_faults.py::test_sigkill_twice_then_finish_equals_the_uninterrupted_run[audit|eval|rewrite|train]; "
        "single SIGKILL of rewrite: tests/test_rewrite.py::test_sigkill_at_a_random_point_then_restart_gives_every_row_once",
    ),
    (
        "Kill between two writes / torn last line of a .partial (simulated), refusal of a .partial from other settings",
        "tests/test_audit.py::test_resume_after_kill_gives_the_same_output, "
        "tests/test_evaluate.py::test_killed_run_resumes_without_loss_or_duplicates, "
        "tests/test_rewrite.py::test_resume_after_a_simulated_kill_and_refusal_of_other_settings",
    ),
    (
        "Training resume reproduces the uninterrupted run (optimizer, scheduler, RNG, IDFT schedule)",
        "tests/test_trainer.py::test_resume_reproduces_the_uninterrupted_run; with a torn newest checkpoint: "
        "the train SIGKILL test above (its first kill lands while a checkpoint is being written)",
    ),
    (
        "Rerunning a finished run does nothing",
        "tests/test_train_cli.py::test_train_writes_a_loadable_model_and_metrics, "
        "tests/test_evaluate.py::test_eval_command_outputs, tests/test_rewrite.py::"
        "test_cli_end_to_end_and_a_finished_rerun_does_nothing",
    ),
    (
        "Non-finite loss: `--nonfinite stop` exits 2 with one line; `skip` skips and counts (train_summary.json "
        "`skipped_nonfinite`)",
        "tests/test_faults.py::test_nonfinite_loss_is_skipped_and_counted, corpus case "
        "nonfinite_loss_stop, tests/test_trainer.py::test_nonfinite_loss_stops_or_skips",
    ),
    ("Non-finite audit scores stop the run naming the row (never written as scores)", "corpus case nonfinite_scores"),
    ("bf16 agrees with fp32 within the stated tolerance", "tests/test_faults.py::test_bf16_agrees_with_fp32"),
    (
        "Every class of issue 15 has bad cases over its commands; a rerun with other settings is refused for train, "
        "rewrite, audit, eval, pairs and compare cells, and the same command resumes a Ctrl-C'd run to the "
        "uninterrupted run's bytes",
        "tests/test_faults.py::test_corpus_covers_every_class_of_issue_15 and the corpus cases *_rerun_* "
        "(tests/fault_corpus_runs.py)",
    ),
    (
        "A resumed training run reports the loss over all of its steps",
        "tests/test_faults.py::test_resumed_training_reports_the_loss_of_the_whole_run",
    ),
    (
        "A real second writer (another process) is refused while the first finishes byte-identical to a run alone",
        "tests/test_guards.py::test_a_second_writer_is_refused_while_the_first_finishes_intact[eval|train]; "
        "a live lock for every command: corpus cases *_rerun_locked",
    ),
    (
        "No input is overwritten or deleted by an output (named like an output, inside an output folder, through "
        "a link); every JSON file is valid JSON (non-finite numbers as null)",
        "tests/test_guards.py::test_the_guard_refuses_inputs_that_an_output_would_replace, "
        "test_every_json_writer_writes_valid_json; corpus class `output`",
    ),
    (
        "Quiet by default: training shows a bar and step lines on stderr, its result alone on stdout; `--verbose` "
        "shows the libraries' messages",
        "tests/test_guards.py::test_train_shows_progress_and_step_lines_on_stderr_and_only_its_result_on_stdout",
    ),
]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _message(result: dict, root: str) -> str:
    lines = [line for line in result["stderr"].replace("\r", "\n").splitlines() if line.strip()]
    if not lines:
        return ""
    errors = [line for line in lines if line.startswith("onsft: error:")]
    shown = errors[-1] if errors else ("Traceback ... " + lines[-1] if "Traceback" in result["stderr"] else lines[-1])
    shown = shown.replace(root, "$CORPUS")
    # A run that succeeds ends with a progress or log line: its start says enough.
    return shown if errors or len(shown) <= 160 else shown[:160] + " ..."


def render(report: dict) -> str:
    out = [
        "# Reliability: hostile inputs, killed runs, numeric faults",
        "",
        "Produced by `python tests/fault_table.py` (runs `tests/test_faults.py` with "
        "`ONSFT_RELIABILITY_DOC=docs/reliability.md`); do not edit by hand. Paths of the generated corpus "
        "are shown as `$CORPUS`.",
        "",
    ]
    inputs = report.get("inputs")
    if inputs:
        cases = inputs["cases"]
        bad = [c for c in cases if c["code"] == 2]
        counts = Counter(c["command"] for c in bad)
        passed = sum(c.get("judged", False) and not c.get("problems") for c in cases)
        out += [
            "## Hostile inputs",
            "",
            f"{len(cases)} cases ({len(bad)} that must fail, {len(cases) - len(bad)} odd-but-valid inputs or "
            f"reruns that must succeed); bad inputs per command: "
            + ", ".join(f"{name} {counts[name]}" for name in COMMANDS)
            + f". {passed} of {len(cases)} behave "
            f"as promised; known gaps (listed at the end): {len(report.get('gaps') or {})}. Run in one process by tests/fault_runner.py (`onsft.cli.main` per case, fds 1 and 2 "
            f"captured), {inputs['seconds']} s for all.",
            "",
            "Full disk and read-only output: "
            + (
                "a 1 MB tmpfs filled up before the case (writes fail with ENOSPC) and a read-only tmpfs, "
                "mounted in a private mount namespace (`unshare --user --map-root-user --mount`)."
                if inputs["mechanism"] == "tmpfs"
                else "user namespaces were not available, so RLIMIT_FSIZE stood in for the full disk (writes "
                "fail with EFBIG) and an output path below a regular file for the read-only file system."
            ),
            "",
            "A case passes when: the exit code is as expected; stderr holds no traceback; the last line "
            "is the only `onsft: error:` line and names the file (and line) and a fix; cases failing before a "
            "model loads print nothing else; no file is left under the output except resumable "
            "`.partial` files (and torn checkpoints) of a run stopped mid-way; and no file that existed "
            "before the case was changed or deleted (every file under the case's folder is hashed before and "
            "after). Cases of a rerun chain (Ctrl-C, exit 130, then the same command) must also end in an "
            "output byte-identical to an uninterrupted run's; a bounded case (`huge`) must stay within its "
            "time and peak-memory growth.",
            "",
            "Cases per class (bad inputs that must exit 2 / all cases):",
            "",
            "| class | " + " | ".join(COMMANDS) + " | what |",
            "|---|" + "---|" * len(COMMANDS) + "---|",
        ]
        for kind, what in KINDS.items():
            mine = [c for c in cases if c.get("kind", "input") == kind]
            if not mine:
                continue
            cells = [
                f"{sum(c['code'] == 2 for c in mine if c['command'] == name)}/{sum(c['command'] == name for c in mine)}"
                for name in COMMANDS
            ]
            out.append(f"| {kind} | " + " | ".join(cells) + f" | {_cell(what)} |")
        out += [
            "",
            "| case | class | command | input tried | exit | message (stderr) | left behind | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        root = inputs.get("root", "$$")
        for c in cases:
            left = ", ".join(c["created"][:2]) + (f" (+{len(c['created']) - 2})" if len(c["created"]) > 2 else "")
            verdict = (
                "not judged"
                if not c.get("judged")
                else "yes"
                if not c["problems"]
                else ("NO (known gap): " if c["name"] in (report.get("gaps") or {}) else "NO: ")
                + "; ".join(c["problems"])
            )
            out.append(
                f"| {c['name']} | {c.get('kind', 'input')} | {c['command']} | {_cell(c['input'])} | {c['code']} | "
                f"{_cell(_message(c, root))} | {_cell(left) or '-'} | {_cell(verdict)} |"
            )
        out.append("")
    sample = report.get("subprocess")
    if sample:
        out += [
            "## The same cases as real processes",
            "",
            "`python -m onsft.cli ...` as a user runs it; the line must equal the in-process runner's.",
            "",
            "| case | exit | stderr |",
            "|---|---|---|",
        ]
        root = (inputs or {}).get("root", "$$")
        out += [f"| {s['name']} | {s['code']} | {_cell(s['line'].replace(root, '$CORPUS'))} |" for s in sample]
        out.append("")
    kills = report.get("kills")
    if kills:
        out += [
            "## Killed runs",
            "",
            "Each command was SIGKILLed twice (seeded random points: after a random amount of progress, "
            "then a random delay), restarted with the same command each time, then run to the end. The final "
            "outputs equal those of an uninterrupted run byte for byte (training: every weight tensor "
            "bitwise, fp32), with every record exactly once, in input order. Progress is records in the "
            "`.partial` file (audit: 100 = scores.jsonl final, the report being written), or for train the "
            "newest checkpoint folder (kill 1 fires the moment it appears, i.e. while it is written).",
            "",
            "| command | kill | progress target | delay (ms) | progress at kill | killed | left on disk |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rows in kills.items():
            for i, row in enumerate(rows, 1):
                out.append(
                    f"| {name} | {i} | {row['target']} | {row['delay_ms']} | {row['progress_at_kill']} | "
                    f"{'yes' if row['killed'] else 'finished first'} | {_cell(row.get('left', ''))} |"
                )
        out.append("")
    numeric = report.get("nonfinite")
    bf16 = report.get("bf16")
    if numeric or bf16:
        out += ["## Numeric faults", ""]
    if numeric:
        out += [
            f"`--nonfinite skip`: a model whose input embedding of `~` is NaN, trained {numeric['steps']} steps "
            f"of one row on {numeric['rows']} rows ({numeric['nan_rows']} holding `~`): "
            f"`skipped_nonfinite` = {numeric['skipped_nonfinite']} in train_summary.json, every logged loss "
            "finite (0 for a skipped micro-batch), every weight finite except the NaN row itself. "
            "`--nonfinite stop` (the default): case nonfinite_loss_stop above.",
            "",
        ]
    if bf16:
        loss32 = ", ".join(f"{v:.4f}" for v in bf16["loss_fp32"])
        loss16 = ", ".join(f"{v:.4f}" for v in bf16["loss_bf16"])
        out += [
            f"bf16 against fp32 on the {bf16['subject']}, {bf16['rows']} teacher rows:",
            "",
            f"- audit mean phi per response: largest gap {bf16['max_abs_mean_phi_gap']:.4f} nats/token "
            f"(tolerance 0.15); dataset mean {bf16['mean_phi_fp32']:.4f} (fp32) vs {bf16['mean_phi_bf16']:.4f} "
            "(bf16) (tolerance 0.02). In the bf16 run the model and the LM-head matmul run in bf16; softmax "
            "statistics are float32 and per-response sums float64, as in fp32 runs.",
            f"- training loss (nll, 6 steps, lr 1e-3, bf16 autocast on CPU vs fp32): fp32 {loss32}; bf16 "
            f"{loss16}; largest relative gap {bf16['max_rel_loss_gap']:.2%} (tolerance 2% at step 1, 10% over "
            "the run).",
            "",
        ]
    out += ["## Where each guarantee is tested", "", "| guarantee | test |", "|---|---|"]
    out += [f"| {_cell(what)} | {_cell(where)} |" for what, where in GUARANTEES]
    out.append("")
    gaps = report.get("gaps")
    if gaps:
        out += ["## Known gaps", ""] + [f"- {name}: {why}" for name, why in gaps.items()] + [""]
    return "\n".join(out)
