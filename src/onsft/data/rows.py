"""Datasets in, validated examples out (their tokenisation is `onsft.data.chat`).

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onsft.data.row_files import read_csv, read_jsonl, read_table
from onsft.errors import UserError
from onsft.runtime import hub
from onsft.runtime.runs import data_identity

Messages = list[dict[str, str]]
VALID_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class DataArguments:
    """The dataset a command reads, declared once for every command (their own configs extend it)."""

    data: str = field(
        default="",
        metadata={
            "help": "Dataset: a .jsonl/.json/.parquet/.csv file, a saved `datasets` folder, or a Hugging Face "
            "Hub dataset NAME[:CONFIG[:SPLIT]] (downloaded and cached on first use)."
        },
    )
    split: str = field(default="train", metadata={"help": "Split of a Hub dataset or a saved DatasetDict."})


def limit_field() -> Any:
    """`limit`, declared once for every command that may read only the first rows of its inputs."""
    return field(default=0, metadata={"help": "Use only the first N rows of each input file (0 = all)."})


def check_limit(limit: int) -> None:
    if limit < 0:
        raise UserError("`limit` must be >= 0", where="command line", fix="pass --limit 0 for all rows.")


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


def parse_hub_spec(source: str, split: str = "train") -> tuple[str, str | None, str]:
    """`name`, `name:config` or `name:config:split` -> (name, config or None, split); a split written in the
    spec wins over `split`."""
    name, _, rest = source.partition(":")
    config, _, named_split = rest.partition(":")
    return name, config or None, named_split or split


def _read_hub(source: str, split: str, offline: bool) -> list[tuple[int, Any]]:
    """Rows of a Hub dataset split, fetched once into the Hugging Face cache (`onsft.runtime.hub`)."""
    import datasets  # the Hub path needs it; local JSONL / CSV files never import it

    name, config, split = parse_hub_spec(source, split)
    folder = hub.snapshot(name, "dataset", offline=offline)
    try:
        table = datasets.load_dataset(str(folder), name=config, split=split)
    except ValueError as error:  # an unknown config or split
        raise UserError(
            f"cannot read {source}: {str(error).strip().splitlines()[0]}",
            where=source,
            fix="name an existing config and split: --data NAME:CONFIG --split SPLIT.",
        ) from None
    except Exception as error:  # datasets raises many types for a repository it cannot read
        raise UserError(
            f"cannot read Hub dataset {source} ({type(error).__name__}: {error})",
            where=source,
            fix="check that the repository holds data files (parquet, json, csv).",
        ) from None
    return [(i + 1, row) for i, row in enumerate(table.to_list())]


def is_hub_dataset(source: str | Path) -> bool:
    """A dataset name that is not a local path: looked up on the Hugging Face Hub."""
    text = str(source)
    return not Path(text).exists() and hub.looks_like_repo_id(parse_hub_spec(text)[0])


def check_sources(sources: dict[str, str | None]) -> None:
    """Every local dataset a command will read exists, checked up front; a missing one is named with the
    option that gave it (`--retention_data`, not `--data`). Hub names are looked up when read."""
    for flag, source in sources.items():
        if source and not is_hub_dataset(source) and not Path(source).exists():
            raise UserError("dataset not found", where=str(source), fix=f"check the path given to {flag}.")


def read_rows(
    source: str | Path, split: str = "train", offline: bool = False, flag: str = "--data"
) -> list[tuple[int, Any]]:
    """Raw rows with their line numbers (1-based rows for tables). Rows are not validated here. `flag` is the
    option that named the source, for the message when it is missing."""
    path = Path(source)
    if is_hub_dataset(source):
        return _read_hub(str(source), split, offline)
    if not path.exists():
        raise UserError("dataset not found", where=str(path), fix=f"check the path given to {flag}.")
    if path.is_dir():
        return read_table(path, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix in (".parquet", ".pq"):
        return read_table(path)
    raise UserError(
        f"unknown dataset format `{suffix or 'no extension'}`",
        where=str(path),
        fix="use .jsonl, .json, .parquet, .csv, a saved `datasets` folder, or a Hub dataset name.",
    )


def dataset_identity(source: str | Path, split: str = "train") -> dict:
    """What makes a dataset 'the same' for resuming: a file's bytes, or a Hub dataset's name, split and cached
    snapshot (the folder name is the commit)."""
    if is_hub_dataset(source):
        name, config, split = parse_hub_spec(str(source), split)
        folder = hub.snapshot(name, "dataset", offline=True)
        return {"hub": name, "config": config, "split": split, "snapshot": folder.name}
    return data_identity(str(source))


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
            trailing = [t["role"] for t in turns[last_assistant + 1 :]]
            if "user" in trailing:
                # Taking the earlier assistant turn as the response would train on (or score) an answer to
                # another question than the row's last one, and drop that question without a word.
                raise UserError(
                    f"`messages` end with a user turn after the last assistant turn ({len(trailing)} turn(s) "
                    "after it); the row's last question has no answer",
                    where=where,
                    line=line,
                    fix="drop the trailing turn(s), or add the assistant's answer after them.",
                )
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
    source: str | Path,
    *,
    require_response: bool = True,
    require_answer: bool = False,
    require_reference: bool = False,
    split: str = "train",
    offline: bool = False,
    flag: str = "--data",
) -> list[Example]:
    """Read and validate every row; the first problem stops with a `UserError` naming its line."""
    where = str(source)
    rows = read_rows(source, split, offline, flag)
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
