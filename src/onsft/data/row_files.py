"""Local data files read into raw rows with their line numbers: JSON lines (or one JSON array), CSV, Parquet and
saved `datasets` folders. Rows are validated by `onsft.data.rows`; what is refused here is the file itself (not
UTF-8, malformed JSON, ragged CSV), each with the file and line. A JSON object that repeats a key is read as
json reads it (the last value wins) with one warning per file naming the first such line."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import Any

from onsft.errors import UserError, warn


class _RepeatedKeys:
    """json's object_pairs_hook: a dict as json.loads builds it (the last value of a repeated key wins), noting
    every repeated key, so the reader can say which line had one instead of dropping a value silently."""

    def __init__(self):
        self.found: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict:
        row = dict(pairs)
        if len(row) < len(pairs):
            seen: set[str] = set()
            self.found += [k for k, _ in pairs if k in seen or seen.add(k)]
        return row


def _warn_repeated(path: Path, repeated: list[tuple[int | None, list[str]]]) -> None:
    """One warning per file: the first line with a repeated key, and how many lines have one."""
    if not repeated:
        return
    line, keys = repeated[0]
    more = f" ({len(repeated)} lines have repeated keys; this is the first)" if len(repeated) > 1 else ""
    shown = ", ".join(f"`{k}`" for k in dict.fromkeys(keys))
    warn(f"a JSON object repeats the key {shown}; only its last value is read{more}", where=str(path), line=line)


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    hook, repeated = _RepeatedKeys(), []
    raw = path.read_bytes()
    # Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first row.
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    stripped = raw.lstrip()
    if path.suffix == ".json" and stripped.startswith(b"["):
        try:
            rows = json.loads(raw.decode("utf-8"), object_pairs_hook=hook)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(
                f"not valid JSON ({error})", where=str(path), fix="write a JSON array or JSON lines."
            ) from None
        except RecursionError:
            raise UserError("JSON nested too deeply to read", where=str(path), fix="write flat rows.") from None
        for i, row in enumerate(rows):
            _check_encodable(row, str(path), i + 1)
        _warn_repeated(path, [(None, hook.found)] if hook.found else [])
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
            rows.append((number, json.loads(text, object_pairs_hook=hook)))
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
        if hook.found:
            repeated.append((number, hook.found))
            hook.found = []
        if "\\u" in text:
            _check_encodable(rows[-1][1], str(path), number)
    _warn_repeated(path, repeated)
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


def read_csv(path: Path) -> list[tuple[int, Any]]:
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


def read_table(path: Path, split: str = "train") -> list[tuple[int, Any]]:
    try:
        if path.is_dir():
            import datasets  # imports pandas and pyarrow machinery: only for folders

            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table and split != "train":
                    raise UserError(
                        f"no split `{split}` (splits: {', '.join(table)})",
                        where=str(path),
                        fix="pass one of them with --split.",
                    )
                table = table[split if split in table else next(iter(table))]
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
