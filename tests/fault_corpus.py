"""The hostile-input corpus of tests/test_faults.py: tiny models, bad files, and one `Case` per attempt.

`build(root)` writes everything under `root` and returns the cases. A case is one invocation of
`onsft <command> ...` and what must come of it:
  - `code` 2 (the default): exactly one line `onsft: error: <where>[:<line>]: <message> Fix: <fix>` on
    stderr, naming `where` (a file, or `command line` / `experiment` / `config` for options), the 1-based
    `line` when the input has lines, containing `expect`; no traceback; and no output file left behind
    under `watch` except the ones matching `allow` (the resumable `.partial` files and run.json record of a run stopped
    mid-way, which the same command resumes);
  - `code` 0: input that is odd but valid (a byte-order mark, an answer math-verify cannot parse), or a
    rerun after a fault, which must succeed.
`early` cases fail before any model is loaded, so stderr must hold that one line and nothing else.
`steps` are actions of tests/fault_runner.py before a case (`after`: after it): fill or free the small file
system that simulates a full disk, write a stale partial file, press Ctrl-C part-way (code 130: a run left
unfinished for the next case), or hold the output's lock from another live process.
A bad case must also leave every file that existed under `watch` unchanged (`unchanged` asks the same of a
case that succeeds); `same_as` names a case whose `fingerprint` file must be byte-identical to this one's;
`expect_stderr` is a fragment a succeeding case must print; `max_seconds` and `max_memory_mb` bound the
case's time and the growth of the runner's peak memory. `kind` is the class of fault (tests/fault_corpus_runs.py
adds the classes of issue 15; "input" is a hostile input file or option).
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fault_corpus_runs
from tiny import tiny_tokenizer


@dataclass
class Case:
    name: str
    command: str
    input: str  # what was tried, as the table shows it
    argv: list[str]
    expect: str = ""  # a fragment of the message
    code: int = 2
    where: str | None = None  # must appear in the error line (None: not checked)
    line: int | None = None
    watch: str = ""  # folder whose new files are checked
    allow: list[str] = field(default_factory=list)  # glob patterns of files that may be left (resumable)
    early: bool = True
    steps: list[list[str]] = field(default_factory=list)  # runner actions before the case
    fingerprint: str = ""  # output file whose sha256 the runner reports (for comparisons)
    kind: str = "input"
    after: list[list[str]] = field(default_factory=list)  # runner actions after the case
    unchanged: bool = False  # a succeeding case must not change existing files either
    same_as: str = ""  # a case whose fingerprint must equal this one's
    expect_stderr: str = ""  # printed by a succeeding case
    max_seconds: float | None = None
    max_memory_mb: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- models


def talker(vocab_size: int, seed: int = 0, nan_token: int | None = None) -> LlamaForCausalLM:
    """A tiny Llama with an untied, peaked head: it writes varied characters (a tied random head only
    repeats its last input). With `nan_token`, that token's input embedding is NaN, so every sequence
    holding it gives NaN logits and loss while the others stay finite."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
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
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
        model.lm_head.weight[[0, 2, 3, 4]] = 0.0  # chat specials other than EOS are never likely
        if nan_token is not None:
            model.model.embed_tokens.weight[nan_token] = float("nan")
    return model.eval()


def save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_models(root: Path) -> dict[str, str]:
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    models = {"tiny": save(talker(vocab), tokenizer, root / "tiny")}
    bare = tiny_tokenizer()
    bare.chat_template = None
    models["no_template"] = save(talker(vocab), bare, root / "no_template")
    models["nan"] = save(talker(vocab, nan_token=tokenizer.convert_tokens_to_ids("~")), tokenizer, root / "nan")
    short = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=32,
            n_embd=32,
            n_layer=1,
            n_head=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    )
    models["short_context"] = save(short, tokenizer, root / "short_context")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "README.md").write_text("notes, no weights\n")
    models["not_a_model"] = str(root / "not_a_model")
    truncated = Path(save(talker(vocab), tokenizer, root / "truncated_weights"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    models["truncated_weights"] = str(truncated)
    broken = Path(save(talker(vocab), tokenizer, root / "broken_config"))
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    models["broken_config"] = str(broken)
    no_tokenizer = Path(save(talker(vocab), tokenizer, root / "no_tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tokenizer / name).unlink(missing_ok=True)
    models["no_tokenizer"] = str(no_tokenizer)
    return models


# --------------------------------------------------------------------------------------------- data


def good_rows(n: int = 8) -> list[dict]:
    words = [a + b for a in string.ascii_lowercase[:8] for b in string.ascii_lowercase[8:16]][:n]
    return [
        {
            "id": i,
            "prompt": f"Copy {w}.",
            "completion": f"It is {w}. \\boxed{{{w}}}",
            "answer": w,
            "reference": f"It is {w}. \\boxed{{{w}}}",
        }
        for i, w in enumerate(words)
    ]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


class Files:
    """Writes input files under one folder and returns their paths as strings."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, content: str | bytes | list) -> str:
        path = self.folder / name
        if isinstance(content, list):
            content = jsonl(content)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)


# -------------------------------------------------------------------------------------------- cases


def build(root: Path, full_disk: str, read_only: str) -> tuple[list[Case], dict[str, str]]:
    """All cases. `full_disk` is a folder on a small file system the runner fills up (or, without one, a
    folder whose writes the runner caps with RLIMIT_FSIZE); `read_only` a folder that cannot be written."""
    models = build_models(root / "models")
    write = Files(root / "data")
    out = root / "out"
    good = write("good.jsonl", good_rows())
    many = write("many.jsonl", good_rows(40))
    tiny = models["tiny"]
    cases: list[Case] = []

    def case(name, command, what, args, expect="", **kw):
        watch = out / name
        argv = [command, *[a.replace("{out}", str(watch)) for a in args]]
        kw.setdefault("watch", str(watch))
        cases.append(Case(name, command, what, argv, expect, **kw))

    def audit(name, what, data, expect, model=tiny, extra=(), **kw):
        case(
            name,
            "audit",
            what,
            ["--model", model, "--data", data, "--out", "{out}/audit", "--progress", "false", *extra],
            expect,
            **kw,
        )

    def train(name, what, data, expect, model=tiny, extra=(), **kw):
        case(
            name,
            "train",
            what,
            [
                "--model",
                model,
                "--data",
                data,
                "--output_dir",
                "{out}/run",
                "--max_steps",
                "2",
                "--max_length",
                "64",
                "--use_cpu",
                "true",
                "--disable_tqdm",
                "true",
                "--report_to",
                "none",
                *extra,
            ],
            expect,
            **kw,
        )

    def evaluate(name, what, data, expect, model=tiny, extra=(), **kw):
        case(
            name,
            "eval",
            what,
            [
                "--model",
                model,
                "--data",
                data,
                "--out",
                "{out}/eval",
                "--max_new_tokens",
                "6",
                "--plot",
                "false",
                *extra,
            ],
            expect,
            **kw,
        )

    def rewrite(name, what, data, expect, model=tiny, extra=(), **kw):
        case(
            name,
            "rewrite",
            what,
            [
                "--model",
                model,
                "--data",
                data,
                "--out",
                "{out}/rewrite",
                "--max_new_tokens",
                "6",
                "--own_samples",
                "1",
                "--progress",
                "false",
                *extra,
            ],
            expect,
            **kw,
        )

    def pairs(name, what, data, expect, model=tiny, extra=(), **kw):
        case(
            name,
            "pairs",
            what,
            [
                "--model",
                model,
                "--data",
                data,
                "--out",
                "{out}/pairs.jsonl",
                "--samples",
                "2",
                "--max_new_tokens",
                "6",
                *extra,
            ],
            expect,
            **kw,
        )

    def compare(name, what, experiment, expect, **kw):
        if isinstance(experiment, dict):
            experiment = json.dumps(
                {
                    "model": tiny,
                    "train_data": good,
                    "in_domain": good,
                    "methods": ["sft"],
                    "seeds": [0],
                    "train": {"max_steps": 1, "use_cpu": True},
                    "out": str(out / name / "grid"),
                    **experiment,
                }
            )
        kw.setdefault("where", f"{name}.yaml")
        case(name, "compare", what, ["--config", write(f"{name}.yaml", experiment)], expect, **kw)

    rows = good_rows()
    # --- data files: encoding and syntax
    audit(
        "invalid_utf8",
        "JSONL with a 0xFF byte on line 2",
        write("utf8.jsonl", jsonl(rows[:1]).encode() + b'{"prompt": "caf\xff", "completion": "x"}\n'),
        "not valid UTF-8",
        where="utf8.jsonl",
        line=2,
    )
    train(
        "truncated_last_line",
        "JSONL whose last line was cut mid-object (an interrupted copy)",
        write("cut.jsonl", jsonl(rows[:3])[:-25]),
        "last line looks truncated",
        where="cut.jsonl",
        line=3,
    )
    evaluate(
        "row_is_array",
        "a JSON array on a line instead of an object",
        write("array.jsonl", [rows[0], "[1, 2]"]),
        "not an object",
        where="array.jsonl",
        line=2,
    )
    rewrite(
        "row_is_number",
        "a bare number as a row",
        write("number.jsonl", ["42"]),
        "not an object",
        where="number.jsonl",
        line=1,
    )
    train(
        "deep_nesting",
        "a row nested 100000 levels deep",
        write("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n"),
        "nested too deeply",
        where="deep.jsonl",
        line=1,
    )
    evaluate(
        "lone_surrogate",
        "a JSON string with an unpaired surrogate escape (\\ud83d)",
        write("surrogate.jsonl", '{"prompt": "smile \\ud83d", "answer": "1"}\n'),
        "unpaired surrogate",
        where="surrogate.jsonl",
        line=1,
    )
    audit(
        "nan_literal",
        "`prompt: NaN` (JSON extension Python accepts)",
        write("nan.jsonl", '{"prompt": NaN, "completion": "x"}\n'),
        "`prompt` must be a string",
        where="nan.jsonl",
        line=1,
    )
    audit("empty_file", "an empty file", write("empty.jsonl", ""), "dataset has no rows", where="empty.jsonl")
    pairs(
        "blank_lines_only",
        "a file of blank lines",
        write("blank.jsonl", "\n\n  \n"),
        "dataset has no rows",
        where="blank.jsonl",
    )
    audit(
        "unknown_extension",
        "data saved as .txt",
        write("data.txt", jsonl(rows)),
        "unknown dataset format",
        where="data.txt",
    )
    pairs(
        "data_missing",
        "--data naming a file that does not exist",
        str(root / "data" / "nope.jsonl"),
        "dataset not found",
        where="nope.jsonl",
    )
    train(
        "data_is_a_folder",
        "--data naming a folder that is not a saved dataset",
        str(root / "models"),
        "cannot read dataset",
        where="models",
    )
    evaluate(
        "parquet_not_parquet",
        "a .parquet file holding JSON text",
        write("fake.parquet", jsonl(rows)),
        "cannot read dataset",
        where="fake.parquet",
    )
    # --- columns and values
    audit(
        "prompt_wrong_type",
        "`prompt` is a number",
        write("prompt_int.jsonl", [{"prompt": 7, "completion": "x"}]),
        "`prompt` must be a string",
        where="prompt_int.jsonl",
        line=1,
    )
    train(
        "completion_wrong_type",
        "`completion` is an object",
        write("completion_obj.jsonl", [rows[0], {"prompt": "a", "completion": {"text": "b"}}]),
        "`completion` must be text",
        where="completion_obj.jsonl",
        line=2,
    )
    evaluate(
        "answer_wrong_type",
        "`answer` is a list",
        write("answer_list.jsonl", [{"prompt": "a", "answer": [1, 2]}]),
        "`answer` must be text",
        where="answer_list.jsonl",
        line=1,
    )
    pairs(
        "id_wrong_type",
        "`id` is a list",
        write("id_list.jsonl", [{**rows[0], "id": [1]}]),
        "`id` must be a string or a number",
        where="id_list.jsonl",
        line=1,
    )
    train(
        "empty_prompt",
        "a prompt of spaces",
        write("empty_prompt.jsonl", [rows[0], {"prompt": "  ", "completion": "b"}]),
        "prompt is empty",
        where="empty_prompt.jsonl",
        line=2,
    )
    audit(
        "empty_response",
        "an empty completion",
        write("empty_response.jsonl", [rows[0], rows[1], {"prompt": "a", "completion": ""}]),
        "response is empty",
        where="empty_response.jsonl",
        line=3,
    )
    train(
        "longer_than_max_length",
        "a 300-character response with --max_length 64",
        write("long.jsonl", [rows[0], {"prompt": "a", "completion": "b" * 300}]),
        "longer than max_length=64",
        where="long.jsonl",
        line=2,
    )
    audit(
        "longer_than_context",
        "a response past a 32-position model's context (--max_length 1024)",
        write("long_ctx.jsonl", [{"prompt": "a", "completion": "b" * 60}]),
        "longer than the model's context",
        model=models["short_context"],
        where="long_ctx.jsonl",
        line=1,
        early=False,
    )
    rewrite(
        "duplicate_ids",
        "two rows with id 1",
        write("dupes.jsonl", [rows[0], rows[1], {**rows[2], "id": 1}]),
        "duplicate id",
        where="dupes.jsonl",
        line=3,
    )
    train(
        "chat_no_assistant",
        "`messages` with no assistant turn",
        write("no_assistant.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]),
        "no assistant turn",
        where="no_assistant.jsonl",
        line=1,
    )
    audit(
        "chat_content_parts",
        "a turn whose content is a list of parts (OpenAI style)",
        write(
            "parts.jsonl",
            [
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                        {"role": "assistant", "content": "b"},
                    ]
                }
            ],
        ),
        "not {role, content}",
        where="parts.jsonl",
        line=1,
    )
    rewrite(
        "no_reference",
        "rows without the `reference` rewriting needs",
        write("no_reference.jsonl", [{"prompt": "a", "answer": "b"}]),
        "have no `reference`",
        where="no_reference.jsonl",
        line=1,
    )
    rewrite(
        "column_clash",
        "an input column named `provenance` (an output field)",
        write("clash.jsonl", [{**rows[0], "provenance": "teacher"}]),
        "would be overwritten",
        where="clash.jsonl",
        line=1,
    )
    pairs(
        "no_answer",
        "rows without `answer`",
        write("no_answer.jsonl", [{"prompt": "a"}]),
        "have no `answer`",
        where="no_answer.jsonl",
        line=1,
    )
    # --- CSV
    audit(
        "csv_missing_column",
        "CSV with `question` instead of `prompt`",
        write("question.csv", "question,completion\na,b\n"),
        "neither `messages` nor `prompt`",
        where="question.csv",
        line=2,
    )
    evaluate(
        "csv_missing_answer",
        "CSV without an `answer` column",
        write("no_answer.csv", "prompt\nwhat?\n"),
        "have no `answer`",
        where="no_answer.csv",
        line=2,
    )
    train(
        "csv_ragged_row",
        "CSV row with an unquoted comma (one cell too many)",
        write("ragged.csv", "prompt,completion\nCopy ab.,ab\nSay a, b.,a b\n"),
        "more cells than the header",
        where="ragged.csv",
        line=3,
    )
    # --- models
    train(
        "model_not_a_model",
        "--model: a folder with no config or weights",
        good,
        "not a model",
        model=models["not_a_model"],
        where="not_a_model",
    )
    audit(
        "model_missing",
        "--model: a name that is neither local nor cached",
        good,
        "unknown model 'no/such-model'",
        model="no/such-model",
    )
    rewrite(
        "model_broken_config",
        "--model: config.json cut short",
        good,
        "not a valid JSON",
        model=models["broken_config"],
        where="broken_config",
    )
    evaluate(
        "model_truncated_weights",
        "--model: model.safetensors cut in half (an interrupted copy)",
        good,
        "cannot load the model",
        model=models["truncated_weights"],
        where="truncated_weights",
        early=False,
    )
    pairs(
        "model_no_tokenizer",
        "--model: weights but no tokenizer files",
        good,
        "cannot load the tokenizer",
        model=models["no_tokenizer"],
        where="no_tokenizer",
    )
    evaluate(
        "chat_template_missing",
        "--model: tokenizer saved without a chat template",
        good,
        "no chat template",
        model=models["no_template"],
        where="no_template",
    )
    # --- configs and options
    train(
        "config_unknown_key",
        "--config with a misspelt key (learning_rat)",
        good,
        "unknown config key `learning_rat`",
        extra=("--config", write("typo.yaml", "learning_rate: 0.01\nlearning_rat: 1\n")),
        where="typo.yaml",
        line=2,
    )
    audit(
        "config_wrong_type",
        "--config with score_batch_size: ten",
        good,
        "invalid int value",
        extra=("--config", write("type.yaml", "score_batch_size: ten\n")),
        where="type.yaml",
    )
    evaluate(
        "config_list_for_scalar",
        "--config with max_new_tokens: [4, 8]",
        good,
        "must be a single value",
        extra=("--config", write("list.yaml", "max_new_tokens: [4, 8]\n")),
        where="list.yaml",
        line=1,
    )
    rewrite(
        "config_bad_yaml",
        "--config that is not YAML",
        good,
        "invalid YAML",
        extra=("--config", write("broken.yaml", "beta: [1, 2\nmode: linear\n")),
        where="broken.yaml",
    )
    audit(
        "config_is_a_folder",
        "--config naming a folder",
        good,
        "cannot read config",
        extra=("--config", str(root / "data")),
        where=str(root / "data"),
    )
    pairs(
        "config_not_mapping",
        "--config holding a YAML list",
        good,
        "must be a mapping",
        extra=("--config", write("seq.yaml", "- samples\n- 4\n")),
        where="seq.yaml",
    )
    train(
        "config_bad_bool",
        "--config with bf16: maybe",
        good,
        "Truthy value expected",
        extra=("--config", write("bool.yaml", "bf16: maybe\n")),
        where="bool.yaml",
    )
    evaluate(
        "option_typo",
        "--max_new_token (missing s)",
        good,
        "unknown option `--max_new_token`",
        extra=("--max_new_token", "4"),
        where="command line",
    )
    train(
        "learning_rate_negative",
        "--learning_rate=-1e-5",
        good,
        "learning_rate must be a finite number",
        extra=("--learning_rate=-1e-5",),
        where="command line",
    )
    train("loss_unknown", "--loss focal", good, "unknown loss", extra=("--loss", "focal"))
    rewrite(
        "verifier_unknown",
        "--verifier sympy",
        good,
        "unknown verifier `sympy`",
        extra=("--verifier", "sympy"),
        where="--verifier",
    )
    pairs(
        "verifier_file_missing",
        "--verifier naming a missing file",
        good,
        "verifier file not found",
        extra=("--verifier", str(root / "data" / "grader.py") + ":check"),
        where="grader.py",
    )
    raising = write("raising_verifier.py", "def check(response, answer):\n    raise KeyError('score')\n")
    evaluate(
        "verifier_raises",
        "--verifier whose function raises on every call",
        good,
        "raised KeyError",
        extra=("--verifier", raising + ":check"),
        where="raising_verifier.py",
        early=False,
        allow=["eval/generations.jsonl.partial", "eval/run.json"],
    )
    train(
        "dpo_pair_incomplete",
        "--method dpo with a pair missing `rejected`",
        write("pair.jsonl", [{"prompt": "a", "chosen": "b"}]),
        "pair has no `rejected`",
        extra=("--method", "dpo"),
        where="pair.jsonl",
        line=1,
    )
    pairs(
        "rewrites_not_objects",
        "--rewrites file whose rows are arrays",
        good,
        "not an object",
        extra=("--rewrites", write("rewrites.jsonl", ["[1]"])),
        where="rewrites.jsonl",
        line=1,
    )
    # --- outputs
    audit(
        "out_read_only",
        "--out on a read-only file system",
        good,
        "cannot write output here",
        extra=("--out", f"{read_only}/audit"),
        where=read_only,
        watch=read_only,
    )
    evaluate(
        "out_is_a_file",
        "--out naming an existing file",
        good,
        "not a writable folder",
        extra=("--out", good),
        where=good,
    )
    pairs(
        "out_is_a_folder",
        "--out naming a folder",
        good,
        "output path is a folder",
        extra=("--out", str(root / "data")),
        where=str(root / "data"),
    )
    stale = f"{out}/stale_partial/audit"
    audit(
        "stale_partial",
        "a .partial left by an unfinished run with other settings",
        good,
        "different settings",
        where="scores.jsonl.partial",
        early=False,
        steps=[["stale_partial", f"{stale}/scores.jsonl.partial"]],
        allow=["audit/scores.jsonl.partial", "audit/run.json"],
    )
    # --- a full disk: fill the small file system, run, free it, rerun; the rerun must equal a clean run
    audit(
        "clean_reference",
        "valid data (the reference for the full-disk rerun)",
        many,
        "",
        code=0,
        extra=("--score_batch_size", "4", "--per_token", "true"),
        early=False,
        fingerprint="audit/scores.jsonl",
    )
    disk = f"{full_disk}/audit"
    audit(
        "disk_full",
        "--out on a file system with two free pages (one for the run record), 40 scored rows to write",
        many,
        "cannot write output",
        extra=("--out", disk, "--score_batch_size", "4", "--per_token", "true"),
        watch=full_disk,
        early=False,
        steps=[["fill", full_disk, "8192"]],
        allow=["audit/scores.jsonl.partial", "audit/run.json"],
    )
    audit(
        "disk_full_rerun",
        "the same command after freeing space",
        many,
        "",
        code=0,
        extra=("--out", disk, "--score_batch_size", "4", "--per_token", "true"),
        watch=full_disk,
        early=False,
        steps=[["free", full_disk]],
        fingerprint=f"{disk}/scores.jsonl",
    )
    train(
        "disk_full_checkpoint",
        "--output_dir on a file system with 64 kB free (checkpoint > 64 kB)",
        good,
        "failed",
        extra=("--output_dir", f"{full_disk}/run", "--save_steps", "1"),
        watch=full_disk,
        early=False,
        steps=[["clear", full_disk], ["fill", full_disk, "65536"]],
        allow=["run/**"],
    )
    # --- numeric faults
    nan_rows = write("tilde.jsonl", [rows[0], {"prompt": "Copy a~b.", "completion": "a~b", "answer": "a~b"}])
    train(
        "nonfinite_loss_stop",
        "a model whose weights give NaN on rows holding `~` (--nonfinite stop)",
        nan_rows,
        "non-finite loss",
        model=models["nan"],
        extra=("--per_device_train_batch_size", "2"),
        early=False,
        allow=["run/**"],
    )
    audit(
        "nonfinite_scores",
        "the same NaN model, audited",
        nan_rows,
        "non-finite scores",
        model=models["nan"],
        where="tilde.jsonl",
        line=2,
        early=False,
        allow=["audit/scores.jsonl.partial", "audit/run.json"],
    )
    evaluate(
        "nonfinite_generation",
        "the same NaN model, evaluated (decoding from NaN logits)",
        nan_rows,
        "non-finite",
        model=models["nan"],
        early=False,
        allow=["eval/generations.jsonl.partial", "eval/run.json"],
    )
    # --- compare experiments
    compare(
        "experiment_unknown_key",
        "experiment with a misspelt key (seed)",
        {"seed": [0]},
        "unknown experiment key `seed`",
    )
    compare(
        "experiment_wrong_type",
        "experiment with methods: sft (a string, not a list)",
        {"methods": "sft"},
        "must be a list",
    )
    compare("experiment_unknown_method", "experiment with method `sftt`", {"methods": ["sftt"]}, "unknown method")
    compare(
        "experiment_eval_typo",
        "experiment with eval: {max_new_token: 4}",
        {"eval": {"max_new_token": 4}},
        "unknown eval option `max_new_token`",
        where="experiment",
    )
    compare("experiment_not_utf8", "experiment file in Latin-1", b"model: caf\xe9\n", "cannot read the experiment")
    compare(
        "experiment_bad_train_row",
        "experiment whose train_data has an empty response",
        {"train_data": write("bad_train.jsonl", [rows[0], {"prompt": "a", "completion": " "}])},
        "response is empty",
        where="bad_train.jsonl",
        line=2,
    )
    # --- odd but valid input: must work
    audit(
        "bom_jsonl",
        "JSONL starting with a UTF-8 byte-order mark",
        write("bom.jsonl", b"\xef\xbb\xbf" + jsonl(rows[:2]).encode()),
        "",
        code=0,
        early=False,
    )
    evaluate(
        "answer_unparsable",
        "an answer math-verify cannot parse (\\frac{{{)",
        write("odd_answer.jsonl", [{"prompt": "a", "answer": "\\frac{{{"}]),
        "",
        code=0,
        early=False,
    )
    fault_corpus_runs.add_cases(
        SimpleNamespace(
            Case=Case,
            cases=cases,
            case=case,
            audit=audit,
            train=train,
            evaluate=evaluate,
            rewrite=rewrite,
            pairs=pairs,
            compare=compare,
            write=write,
            models=models,
            root=root,
            out=out,
            good=good,
            many=many,
            tiny=tiny,
        )
    )
    for c in cases:
        for s in c.steps:
            if s[0] in ("fill", "free", "clear"):
                c.early = False
    return cases, models
