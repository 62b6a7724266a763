"""Crash-safe output: every file onsft writes goes through this module (tests/test_layout.py checks it).

Whole files are written to a temporary file beside their final name (`.<name>.tmp`), fsynced and renamed
into place (`atomic_open`, `write_text_atomic`, `write_bytes_atomic`, `write_json_atomic`,
`write_jsonl_atomic`); a temporary file is removed when the write fails. Folders are built under a
temporary name and renamed into place (`atomic_directory`). The one writer that is not atomic is the
append-only JSONL of resumable jobs (`open_for_append`, used by `ResumableJsonl`):

Long jobs (rewrite, audit, eval) write one JSON object per input record into `<out>.partial`,
flushed and fsynced after every record, keyed by the record's `_index` (its position in the input).
A restart with the same command reads the partial file, drops a torn last line (a SIGKILL mid-write),
skips the indices already done, and finally renames the partial file to `<out>` in one step. So a
reader never sees a half-written output under the final name, and no record is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from onsft.errors import UserError
from onsft.runtime.clock import plus, seconds_since, start
from onsft.runtime.fingerprints import same_settings


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any compute, creating nothing) when `path` could not be written.

    Walks up to the nearest existing folder and checks it is a writable folder, so a bad output path
    is reported before a long job starts instead of after it.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError("output path is a folder, expected a file", where=str(path), fix="name a file.")
    ancestor = path.parent.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write output here ({ancestor} is not a writable folder)",
            where=str(path),
            fix="choose an output path in a folder you can write to.",
        )
    return path


def _fsync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def output_error(error: OSError, path: str | os.PathLike) -> UserError:
    """A failed write (full disk, quota, read-only file system) as a one-line error naming the file."""
    return UserError(
        f"cannot write output ({error.strerror or error})",
        where=str(path),
        fix="free disk space or choose another output folder, then rerun the same command "
        "(finished work is kept and resumed).",
    )


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside `path` (`.<name>.tmp`; mode "w", UTF-8 text, or "wb"), fsynced and renamed
    onto `path` when the block succeeds and removed when it fails: readers see the old file or the new one."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file (mode 'w' or 'wb'), not mode {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding="utf-8" if mode == "w" else None) as handle:
            yield handle
            _fsync(handle)
        os.replace(tmp, path)
    except OSError as error:
        _discard(tmp)
        raise output_error(error, path) from None
    except BaseException:
        _discard(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it into place."""
    with atomic_open(path) as handle:
        handle.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: readers see the old file or the new one."""
    write_text_atomic(path, dumps(obj, indent=2) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line, written to a temporary file beside `path`, then renamed into place."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(dumps(row, ensure_ascii=False) + "\n")


def open_for_append(path: str | os.PathLike) -> IO:
    """The one writer that is not atomic: the append-only `.partial` JSONL of a resumable job, fsynced row by
    row (`ResumableJsonl`); a torn last line is dropped on resume and the finished file is renamed into place."""
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as error:
        raise output_error(error, path) from None


def finite_json(value: Any) -> Any:
    """`value` as plain JSON values, with NaN and infinities as None. JSON has no literal for them: Python's
    `NaN` / `Infinity` extensions make a file that strict readers (jq, JavaScript, most other languages)
    reject, so every file and line onsft writes goes through here."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return finite_json(value.tolist())  # numpy / torch scalars and arrays end up in records
    return value


def dumps(value: Any, **kwargs) -> str:
    """json.dumps of `finite_json(value)`: always valid JSON (allow_nan=False would catch a miss)."""
    return json.dumps(finite_json(value), allow_nan=False, default=_json_default, **kwargs)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


CLOCK = "_clock"  # the key of a partial file's time lines


def partial_rows(lines: list[str]) -> list[dict]:
    """The rows of a partial file's lines after its fingerprint (its time lines left out)."""
    return [row for row in map(json.loads, lines) if CLOCK not in row]


class ResumableJsonl:
    """Append-only JSONL keyed by `_index`, finalised by an atomic rename.

    Usage:
        store = ResumableJsonl(out_path, fingerprint={...})
        for i, item in enumerate(items):
            if i in store.done: continue
            store.append({"_index": i, ...})
        store.finalize(order=range(len(items)))
    The fingerprint (command settings that change results) is stored in the first line; a restart with
    different settings refuses to mix outputs instead of silently merging them (`defaults`, shaped like the
    fingerprint: options added since the partial file was written match when they hold their defaults).
    After each write a `{"_clock": ...}` line records the seconds spent since the first run opened the file,
    so a resumed run knows what its earlier runs cost (`seconds_before`; the final file holds rows only).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict | None = None, defaults: dict | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.fingerprint, self.defaults = fingerprint or {}, defaults
        self.done: dict[int, dict] = {}
        self.seconds_before = {"wall_seconds": 0.0, "cpu_seconds": 0.0}  # earlier runs', up to their last write
        check_writable(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise output_error(error, self.path.parent) from None
        self._load_existing()
        self._handle = open_for_append(self.partial)
        if self._handle.tell() == 0:
            self._write(dumps({"_fingerprint": self.fingerprint}) + "\n")
        self._opened = start()

    def elapsed(self) -> dict[str, float]:
        """Wall and CPU seconds of this output's runs: the earlier ones' and this one's so far."""
        return plus(self.seconds_before, seconds_since(self._opened))

    def _write(self, text: str) -> None:
        try:
            self._handle.write(text)
            _fsync(self._handle)
        except OSError as error:
            # Close now: a buffer left for the interpreter to flush at exit would print a second error.
            with contextlib.suppress(OSError):
                self._handle.close()
            raise output_error(error, self.partial) from None

    def _load_existing(self) -> None:
        if not self.partial.exists():
            return
        raw = self.partial.read_bytes()
        # A SIGKILL can leave a torn last line: keep everything up to the last newline.
        cut = raw.rfind(b"\n") + 1
        if cut < len(raw):
            with open(self.partial, "r+b") as handle:
                handle.truncate(cut)
        lines = raw[:cut].decode("utf-8").splitlines()
        if not lines:
            return
        header = json.loads(lines[0])
        stored = header.get("_fingerprint", {})
        if not same_settings(stored, json.loads(dumps(self.fingerprint)), self.defaults):
            raise UserError(
                "an unfinished earlier run with different settings left this partial output",
                where=str(self.partial),
                fix="rerun with the same settings to resume, or delete the .partial file to start over.",
            )
        for text in lines[1:]:
            row = json.loads(text)
            if CLOCK in row:
                self.seconds_before = row[CLOCK]  # the last one: the time up to the last rows written
            else:
                self.done[row["_index"]] = row

    def append(self, row: dict) -> None:
        if row["_index"] in self.done:
            return
        self._write(dumps(row, ensure_ascii=False) + "\n" + self._clock_line())
        self.done[row["_index"]] = row

    def append_many(self, rows: list[dict]) -> None:
        fresh = {}
        for row in rows:
            if row["_index"] not in self.done:
                fresh[row["_index"]] = row
        if fresh:
            self._write("".join(dumps(row, ensure_ascii=False) + "\n" for row in fresh.values()) + self._clock_line())
        self.done.update(fresh)

    def _clock_line(self) -> str:
        return dumps({CLOCK: self.elapsed()}) + "\n"

    def rows(self, order) -> list[dict]:
        return [self.done[i] for i in order if i in self.done]

    def finalize(self, order, keep_index: bool = False) -> list[dict]:
        """Write the final file in input order (atomic), remove the partial file, return the rows."""
        self._handle.close()
        rows = self.rows(order)
        if not keep_index:
            rows = [{k: v for k, v in row.items() if k != "_index"} for row in rows]
        write_jsonl_atomic(self.path, rows)
        self.partial.unlink(missing_ok=True)
        return rows

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, unique: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only if the block succeeds.

    The temporary folder is `.<name>.building` beside `path` (a run's list of its outputs names it), or with
    `unique` a fresh `.<name>.<random>.building`, so processes building the same folder at once (a shared
    cache) never share one. An existing `path` is replaced, or with `keep_existing` kept (the first to finish
    wins) and this build dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".building", dir=path.parent))
    else:
        tmp = path.with_name(f".{path.name}.building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        shutil.rmtree(path)
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (keep_existing and path.is_dir()):  # another process renamed its build into place first
            raise
