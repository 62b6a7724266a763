"""Datasets in, validated examples out, and their tokenisation with the model's chat template.

Accepted files: JSONL (`.jsonl`, or `.json` holding one object per line or one array), Parquet, CSV,
or a folder written by `datasets.Dataset.save_to_disk`. Accepted layouts, as TRL and LLaMA-Factory use:
  - `messages`: a list of {role, content} turns; the last assistant turn is the response and every
    turn before it is the prompt;
  - `prompt` (a string or a list of turns) + `completion` (a string or a list with one assistant turn).
Optional columns: `answer` (gold final answer, for verification) and `reference` (a reference solution,
for hinted decoding). Every other column is kept untouched and copied into outputs.

Every problem is reported as a `UserError` naming the file and line (1-based line for JSONL, data row
+ 1 for CSV after its header, row number for Parquet / saved datasets) together with the fix.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onsft.errors import UserError

Messages = list[dict[str, str]]
VALID_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class DataConfig:
    data: str = field(
        default="", metadata={"help": "Dataset: .jsonl/.json/.parquet/.csv file or a saved `datasets` folder."}
    )
    max_length: int = field(default=1024, metadata={"help": "Maximum tokens of prompt + response."})
    overlong: str = field(
        default="reject",
        metadata={
            "help": "Rows longer than max_length: `reject` (stop with a count, the default), `truncate` "
            "(cut the response's tail, never the prompt), or `drop` (skip them, with a count)."
        },
    )


@dataclass
class Example:
    """One validated row. `index` is the position in the file (0-based), `line` what error messages show."""

    index: int
    line: int
    record: dict[str, Any]
    prompt: Messages
    response: str | None = None
    answer: str | None = None
    reference: str | None = None

    @property
    def question(self) -> str:
        """The last user turn: what a hinted-decoding template calls the question."""
        return next(m["content"] for m in reversed(self.prompt) if m["role"] == "user")


# --------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    raw = path.read_bytes()
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first row.
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    stripped = raw.lstrip()
    if path.suffix == ".json" and stripped.startswith(b"["):
        try:
            rows = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(
                f"not valid JSON ({error})", where=str(path), fix="write a JSON array or JSON lines."
            ) from None
        except RecursionError:
            raise UserError("JSON nested too deeply to read", where=str(path), fix="write flat rows.") from None
        for i, row in enumerate(rows):
            _check_encodable(row, str(path), i + 1)
        return [(i + 1, row) for i, row in enumerate(rows)]
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(
                f"not valid UTF-8 (byte {error.start})",
                where=str(path),
                line=number,
                fix="re-encode the file as UTF-8.",
            ) from None
        try:
            rows.append((number, json.loads(text)))
        except RecursionError:
            raise UserError(
                "JSON nested too deeply to read",
                where=str(path),
                line=number,
                fix="each line must be one flat JSON object.",
            ) from None
        except json.JSONDecodeError as error:
            truncated = number == raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1) and not raw.endswith(b"\n")
            hint = (
                "the last line looks truncated; remove it or finish writing the file."
                if truncated
                else "each line must be one complete JSON object."
            )
            raise UserError(
                f"malformed JSON ({error.msg} at column {error.colno})", where=str(path), line=number, fix=hint
            ) from None
        if "\\u" in text:
            _check_encodable(rows[-1][1], str(path), number)
    return rows


def _check_encodable(row: Any, where: str, line: int) -> None:
    """JSON may escape half of a UTF-16 surrogate pair (`\\ud800`): valid JSON, but not text that a tokenizer
    or a UTF-8 output file accepts, so it is refused here rather than deep inside a run."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(
            f"text holds an unpaired surrogate escape ({error.object[error.start]!r}), which is not valid Unicode",
            where=where,
            line=line,
            fix="remove or replace that escape (often left by cutting text in the middle of an emoji).",
        ) from None


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, dict(row)) for row in reader]
    except UnicodeDecodeError:
        raise UserError("not valid UTF-8", where=str(path), fix="re-encode the file as UTF-8.") from None
    except csv.Error as error:
        raise UserError(f"malformed CSV ({error})", where=str(path), fix="check quoting in the file.") from None
    # Chat turns cannot live in a CSV cell except as JSON text.
    for line, row in rows:
        # DictReader files surplus cells under the key None and fills missing ones with None.
        if None in row or None in row.values():
            more = None in row
            raise UserError(
                f"row has {'more' if more else 'fewer'} cells than the header",
                where=str(path),
                line=line,
                fix="give every row one cell per header column (quote cells holding commas).",
            )
        for key in ("messages", "prompt", "completion"):
            value = row.get(key)
            if isinstance(value, str) and value.lstrip().startswith("[{"):
                try:
                    row[key] = json.loads(value)
                except json.JSONDecodeError:
                    raise UserError(
                        f"column `{key}` looks like JSON but does not parse",
                        where=str(path),
                        line=line,
                        fix="write valid JSON in the cell, or plain text.",
                    ) from None
    return rows


def _read_table(path: Path) -> list[tuple[int, Any]]:
    try:
        if path.is_dir():
            import datasets

            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                split = "train" if "train" in table else next(iter(table))
                table = table[split]
            rows = table.to_list()
        else:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
    except UserError:
        raise
    except Exception as error:  # pyarrow / datasets raise many types for a bad file
        raise UserError(
            f"cannot read dataset ({type(error).__name__}: {error})",
            where=str(path),
            fix="pass a valid Parquet file or a folder made by `Dataset.save_to_disk`.",
        ) from None
    return [(i + 1, row) for i, row in enumerate(rows)]


def read_rows(source: str | Path) -> list[tuple[int, Any]]:
    """Raw rows with their line numbers. Rows are not validated here (see `load_examples`)."""
    path = Path(source)
    if not path.exists():
        raise UserError("dataset not found", where=str(path), fix="check the path given to --data.")
    if path.is_dir():
        return _read_table(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix in (".parquet", ".pq"):
        return _read_table(path)
    raise UserError(
        f"unknown dataset format `{suffix or 'no extension'}`",
        where=str(path),
        fix="use .jsonl, .json, .parquet, .csv or a saved `datasets` folder.",
    )


# ------------------------------------------------------------------------------------------ validation


def _as_messages(value: Any, column: str, where: str, line: int) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(
            f"column `{column}` must be a string or a non-empty list of chat turns, got {type(value).__name__}",
            where=where,
            line=line,
            fix=f"write `{column}` as text or turns.",
        )
    turns = []
    for turn in value:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("content"), str)
            or turn.get("role") not in VALID_ROLES
        ):
            raise UserError(
                f"column `{column}` has a turn that is not {{role, content}} with a known role",
                where=where,
                line=line,
                fix=f"each turn needs `role` in {', '.join(VALID_ROLES)} and a string `content`.",
            )
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _optional_text(row: dict, column: str, where: str, line: int) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(
            f"column `{column}` must be text, got {type(value).__name__}",
            where=where,
            line=line,
            fix=f"write `{column}` as a string.",
        )
    return str(value)


def parse_example(row: Any, index: int, line: int, where: str, require_response: bool) -> Example:
    if not isinstance(row, dict):
        raise UserError(
            f"row is a JSON {type(row).__name__}, not an object",
            where=where,
            line=line,
            fix='write one object per line, e.g. {"prompt": "...", "completion": "..."}.',
        )
    response: str | None = None
    if "messages" in row and row["messages"] is not None:
        turns = _as_messages(row["messages"], "messages", where, line)
        last_assistant = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last_assistant is None:
            if require_response:
                raise UserError(
                    "chat has no assistant turn to learn from",
                    where=where,
                    line=line,
                    fix="end `messages` with an assistant turn.",
                )
            prompt = turns
        else:
            prompt, response = turns[:last_assistant], turns[last_assistant]["content"]
    elif "prompt" in row and row["prompt"] is not None:
        prompt = _as_messages(row["prompt"], "prompt", where, line)
        completion = row.get("completion")
        if isinstance(completion, list):
            assistant = [t for t in _as_messages(completion, "completion", where, line) if t["role"] == "assistant"]
            completion = assistant[-1]["content"] if assistant else None
        elif completion is not None and not isinstance(completion, str):
            raise UserError(
                f"column `completion` must be text, got {type(completion).__name__}",
                where=where,
                line=line,
                fix="write `completion` as a string.",
            )
        response = completion
    else:
        present = ", ".join(sorted(row)) or "none"
        raise UserError(
            f"row has neither `messages` nor `prompt` (columns: {present})",
            where=where,
            line=line,
            fix="rename your columns to `messages`, or `prompt` + `completion`.",
        )
    if not any(t["role"] == "user" and t["content"].strip() for t in prompt):
        raise UserError("prompt is empty", where=where, line=line, fix="give every row a non-empty user prompt.")
    if require_response:
        if response is None:
            raise UserError(
                "row has no response (`completion` or a final assistant turn)",
                where=where,
                line=line,
                fix="add a `completion` column.",
            )
        if not response.strip():
            raise UserError(
                "response is empty", where=where, line=line, fix="remove the row or give it a non-empty response."
            )
    return Example(
        index=index,
        line=line,
        record=row,
        prompt=prompt,
        response=response,
        answer=_optional_text(row, "answer", where, line),
        reference=_optional_text(row, "reference", where, line),
    )


def load_examples(
    source: str | Path, *, require_response: bool = True, require_answer: bool = False, require_reference: bool = False
) -> list[Example]:
    """Read and validate every row; the first problem stops with a `UserError` naming its line."""
    where = str(source)
    rows = read_rows(source)
    if not rows:
        raise UserError("dataset has no rows", where=where, fix="pass a file with at least one example.")
    examples = [parse_example(row, i, line, where, require_response) for i, (line, row) in enumerate(rows)]
    for column, required in (("answer", require_answer), ("reference", require_reference)):
        if required:
            missing = [e for e in examples if not getattr(e, column) or not getattr(e, column).strip()]
            if missing:
                raise UserError(
                    f"{len(missing)} row(s) have no `{column}` column value",
                    where=where,
                    line=missing[0].line,
                    fix=f"add `{column}` to every row (needed by this command).",
                )
    seen: dict[Any, int] = {}
    for example in examples:
        key = example.record.get("id")
        if key is None:
            continue
        if not isinstance(key, (str, int, float)):
            raise UserError(
                f"`id` must be a string or a number, got {type(key).__name__}",
                where=where,
                line=example.line,
                fix="write `id` as a string or a number, or remove the column.",
            )
        if key in seen:
            raise UserError(
                f"duplicate id {key!r} (first on line {seen[key]})",
                where=where,
                line=example.line,
                fix="make `id` unique or remove the column.",
            )
        seen[key] = example.line
    return examples


# -------------------------------------------------------------------------------------------- tokenising


def _check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        # The model folder is what needs fixing, not the data file the caller was reading.
        where = getattr(tokenizer, "name_or_path", None) or where
        raise UserError(
            "the model's tokenizer has no chat template",
            where=where,
            fix="use an instruction model, or set `chat_template` in its tokenizer_config.json.",
        )


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer, prompt: Messages, where: str = "model") -> list[int]:
    """Token ids of the chat prompt ending with the assistant header: what the model sees at test time."""
    _check_chat_template(tokenizer, where)
    return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def encode_response(tokenizer, prompt: Messages, response: str, prompt_ids: list[int] | None = None) -> list[int]:
    """Token ids the model must emit after the prompt, end-of-turn tokens included.

    Where the template renders the full chat with the prompt as a prefix (most templates), the response is
    the rest of the rendered chat, so end-of-turn markers are learned exactly as the template writes them.
    Otherwise (templates that rewrite earlier turns) it falls back to the text plus EOS.
    """
    prompt_ids = prompt_ids if prompt_ids is not None else encode_prompt(tokenizer, prompt)
    full = _ids(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True))
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens
    prompt_length: int
    truncated: bool = False
    line: int | None = None  # the row's line in its file, for error messages
    index: int | None = None  # the row's position in its file


def _fit(
    prompt_ids: list[int], response_ids: list[int], example: Example, max_length: int, overlong: str, where: str
) -> Encoded | None:
    """Apply the over-long policy to one row (None = dropped). `reject` is handled by the caller, which counts."""
    truncated = False
    if len(prompt_ids) + len(response_ids) > max_length:
        if overlong == "drop":
            return None
        if len(prompt_ids) >= max_length:
            raise UserError(
                f"prompt alone has {len(prompt_ids)} tokens, so the whole response is past max_length={max_length}",
                where=where,
                line=example.line,
                fix="raise --max_length, shorten the prompt, or use --overlong drop.",
            )
        response_ids = response_ids[: max_length - len(prompt_ids)]
        truncated = True
    return Encoded(
        prompt_ids + response_ids,
        [-100] * len(prompt_ids) + response_ids,
        len(prompt_ids),
        truncated,
        example.line,
        example.index,
    )


def encode_examples(
    tokenizer, examples: Sequence[Example], max_length: int, overlong: str = "reject", where: str = "data"
) -> tuple[list[Encoded], dict[str, int]]:
    """Encode all rows. Under `reject`, every over-long row is counted before stopping, so one run says how many."""
    if overlong not in ("reject", "truncate", "drop"):
        raise UserError(
            f"unknown --overlong value `{overlong}`", where="command line", fix="use reject, truncate or drop."
        )
    encoded, stats = [], {"rows": len(examples), "dropped": 0, "truncated": 0}
    too_long: list[tuple[int, int]] = []
    for example in examples:
        prompt_ids = encode_prompt(tokenizer, example.prompt, where)
        response_ids = encode_response(tokenizer, example.prompt, example.response or "", prompt_ids)
        total = len(prompt_ids) + len(response_ids)
        if overlong == "reject" and total > max_length:
            too_long.append((example.line, total))
            continue
        item = _fit(prompt_ids, response_ids, example, max_length, overlong, where)
        if item is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += int(item.truncated)
        encoded.append(item)
    if too_long:
        line, n = too_long[0]
        raise UserError(
            f"{len(too_long)} of {len(examples)} rows are longer than max_length={max_length} (first: {n} tokens)",
            where=where,
            line=line,
            fix="raise --max_length, or pass --overlong truncate (cut responses) or drop (skip rows).",
        )
    if not encoded:
        raise UserError("no rows left after dropping over-long rows", where=where, fix="raise --max_length.")
    return encoded, stats
