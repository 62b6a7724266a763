"""Run fingerprints: what makes two runs the same, and the guard every resumable command puts on its output.

A command's *settings* are everything that changes its results (its options, the identity of its data,
the model, the dtype; not the output path, progress bars or batch sizes that do not change results).
Records are compared by `onsft.runtime.fingerprints.changed_keys`: an option added since a record was
written (absent from it) matches when it holds its default now, so an upgrade does not redo finished runs.
`RunGuard` keeps them in a small record beside the outputs and, before any work:
  - the same settings, finished: returns the saved summary (a rerun does nothing);
  - the same settings, unfinished: lets the command resume from what it wrote;
  - other settings: refuses with one line naming what changed (`--overwrite` deletes that run's outputs
    and starts over), so a run never mixes two settings into one output;
  - another live process writing there: refuses (a lock holds the owner's pid and host);
  - an input file that is (or resolves to) one of the outputs: refuses, before anything is written, so a
    run never replaces or deletes the data it reads (`pairs --out data.jsonl --data data.jsonl`).
Used as a context manager, it claims on entry (the value is the finished summary, or None), marks the run
finished when the block completes and releases the lock however the block ends:

    with RunGuard(out / "run.json", "eval", settings, OUTPUTS, out / "metrics.json") as finished:
        if finished is not None:
            return finished
        ...  # the work, which writes the summary last
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onsft.errors import UserError
from onsft.runtime.fingerprints import changed_keys, config_defaults, group_defaults, normalized, same_settings
from onsft.runtime.progress import configure_output
from onsft.runtime.records import check_writable, output_error, write_json_atomic

__all__ = [
    "RunArguments",
    "RunGuard",
    "changed_keys",
    "config_defaults",
    "data_identity",
    "group_defaults",
    "normalized",
    "same_settings",
]


def data_identity(path: str) -> dict:
    """What makes a dataset 'the same' for resuming: its bytes (files), names and sizes (folders), or its
    Hub name with the resolved snapshot folder (which names the revision)."""
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                digest.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
    elif p.is_file():
        with open(p, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(str(path).encode())
    return {"path": str(p), "sha256": digest.hexdigest()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunGuard:
    """The settings record and the writer's lock of one run's outputs.

    `record` is the JSON file holding {command, settings, finished}; `outputs` are the glob patterns (in
    the record's folder) of what the command writes, deleted by `--overwrite`; `untracked` (default: all the
    outputs) are those whose presence without a record means a file onsft did not write for this run,
    refused unless `--overwrite`; `summary` is the file whose JSON a finished run returns when `reuse` is on.
    `inputs` maps each input's flag to its path (refused when an output would replace it); `files` are
    outputs outside the record's folder (`rewrite --train_out`). `defaults` holds, shaped like `settings`, the
    defaults of its options: a record saved before an option existed matches when the option holds its default
    now (`onsft.runtime.fingerprints`).
    `active=False` (non-main processes of a launch) makes every method a no-op."""

    def __init__(
        self,
        record: Path,
        command: str,
        settings: dict,
        outputs: list[str],
        summary: Path,
        *,
        overwrite: bool = False,
        active: bool = True,
        untracked: list[str] | None = None,
        reuse: bool = True,
        inputs: dict[str, str | None] | None = None,
        files: list[Path] = (),
        defaults: dict | None = None,
    ):
        self.record, self.command, self.summary = Path(record), command, Path(summary)
        self.settings, self.defaults = normalized(settings), normalized(defaults or {})
        self.outputs, self.overwrite, self.active = outputs, overwrite, active
        # By default every output: a file named like one in a folder with no record is someone else's.
        self.untracked, self.reuse = list(outputs if untracked is None else untracked), reuse
        self.inputs, self.files = dict(inputs or {}), [Path(f) for f in files]
        self.lock = self.record.with_name(f".{self.record.name}.lock")
        self.locked = self.created = self.finished = False
        self.reused: dict | None = None
        self.written: list[str] = []  # outputs outside the folder that this run writes (kept in the record)

    # -- before the work ------------------------------------------------------------------------

    def claim(self) -> dict | None:
        """Take the lock and check the folder: the finished run's summary, or None to (re)start."""
        if not self.active:
            return None
        self._check_inputs()
        self._acquire()
        try:
            saved = self._saved()
            changed = changed_keys(saved.get("settings"), self.settings, defaults=self.defaults) if saved else []
            if changed:
                if not self.overwrite:
                    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
                    raise UserError(
                        f"this output already holds a run with different settings ({saved.get('command')}; "
                        f"changed: {shown})",
                        where=str(self.record.parent),
                        fix="rerun with the same settings to resume or reuse it, choose another output, or pass "
                        "--overwrite to delete that run's outputs and start over.",
                    )
                self._clear()
                saved = None
            elif saved is None and (foreign := self._unrecorded()):
                if not self.overwrite:
                    raise UserError(
                        "this output already holds files that no recorded onsft run wrote (not onsft's, or an earlier run's)",
                        where=str(foreign[0]),
                        fix="choose another output, or pass --overwrite to delete them and start over.",
                    )
                self._clear()
            self._check_files(saved)
            if self.reuse and saved is not None and saved.get("finished") and self.summary.is_file():
                with contextlib.suppress(OSError, ValueError):
                    summary = json.loads(self.summary.read_text(encoding="utf-8"))
                    if set(self.written) - set(saved.get("files") or []):  # a file it may now write elsewhere
                        write_json_atomic(self.record, self._entry(True))
                    self.release()
                    return summary
            self.created = saved is None
            write_json_atomic(self.record, self._entry(False))
        except BaseException:
            self.release()
            raise
        return None

    def __enter__(self) -> dict | None:
        self.reused = self.claim()
        return self.reused

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None and self.reused is None:
            self.finish()
        else:
            self.release()

    def finish(self) -> None:
        """Mark the run finished (after its summary is written) and release the lock."""
        if self.active:
            write_json_atomic(self.record, self._entry(True))
            self.finished = True
        self.release()

    def release(self) -> None:
        """Release the lock; a record this claim created for a run that wrote nothing goes too, so a run
        that failed on its input leaves the folder as it found it."""
        if self.created and not self.finished and not self._existing_outputs(self.outputs):
            with contextlib.suppress(OSError):
                self.record.unlink()
            self.created = False
        if self.locked:
            with contextlib.suppress(OSError):
                self.lock.unlink()
            self.locked = False

    # -- internals ------------------------------------------------------------------------------

    def _check_inputs(self) -> None:
        """Refuse an input that this run would overwrite, or delete under --overwrite: a file named like one
        of the outputs in the output folder (or inside such a folder), or one of the outputs elsewhere."""
        folder = self.record.parent.resolve()
        patterns = [*self.outputs, self.record.name, self.lock.name]
        elsewhere = {f.resolve(): f for f in self.files}
        for flag, given in self.inputs.items():
            if not given or not Path(given).exists():
                continue  # a Hub dataset name, or a missing file the command reports itself
            real = Path(given).resolve()
            hit = elsewhere.get(real)
            for path in (real, *real.parents):
                if hit is None and path.parent == folder and any(fnmatch.fnmatch(path.name, p) for p in patterns):
                    hit = self.record.parent / path.name
            if hit is not None:
                raise UserError(
                    f"this input (given to {flag}) is also an output of this run ({hit}); writing it would "
                    "destroy the data",
                    where=str(given),
                    fix="write the output somewhere else, or copy the input elsewhere first.",
                )

    def _check_files(self, saved: dict | None) -> None:
        """An output outside the folder (`rewrite --train_out`) that exists and that no run recorded here wrote
        is someone else's file: refused unless --overwrite, as a folder's unrecorded outputs are."""
        mine = set((saved or {}).get("files") or [])
        folder = self.record.parent.resolve()
        elsewhere = [
            f
            for f in self.files
            if f.resolve().parent != folder or not any(fnmatch.fnmatch(f.name, p) for p in self.outputs)
        ]  # (one named like an output in the folder is the folder's, under its rule)
        self.written = sorted(mine | {str(f.resolve()) for f in elsewhere})
        for path in elsewhere:
            if path.exists() and str(path.resolve()) not in mine and not self.overwrite:
                raise UserError(
                    "this output file exists and onsft did not write it for this run",
                    where=str(path),
                    fix="choose another output path, or pass --overwrite to replace it.",
                )

    def _entry(self, finished: bool) -> dict:
        return {"command": self.command, "settings": self.settings, "finished": finished, "files": self.written}

    def _saved(self) -> dict | None:
        try:
            saved = json.loads(self.record.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"command": "unreadable", "settings": None}
        return saved if isinstance(saved, dict) else {"command": "unreadable", "settings": None}

    def _unrecorded(self) -> list[Path]:
        """The `untracked` outputs present with no record; a resumable `.partial` file is not one of them (it
        carries its own fingerprint, which `ResumableJsonl` checks before resuming from it)."""
        return [p for p in self._existing_outputs(self.untracked) if not p.name.endswith(".partial")]

    def _existing_outputs(self, patterns: list[str]) -> list[Path]:
        mine = {self.record.name, self.lock.name}
        found = {path for pattern in patterns for path in self.record.parent.glob(pattern)}
        return sorted(path for path in found if path.name not in mine)

    def _clear(self) -> None:
        for path in self._existing_outputs(self.outputs):
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as error:
                raise output_error(error, path) from None
        self.record.unlink(missing_ok=True)

    def _acquire(self) -> None:
        """Take the lock: a symbolic link whose target names the owner (`host:pid`). Creating a link is atomic
        and fails when it exists, and a short link needs no data block, so the lock works on a full disk."""
        me = f"{socket.gethostname()}:{os.getpid()}"
        try:
            self.lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise output_error(error, self.lock.parent) from None
        for _ in range(2):
            try:
                os.symlink(me, self.lock)
            except FileExistsError:
                try:
                    host, _, pid = os.readlink(self.lock).rpartition(":")
                except OSError:
                    host, pid = "", ""
                here = host == socket.gethostname()
                if (here and pid.isdigit() and _alive(int(pid))) or (host and not here):
                    raise UserError(
                        f"another onsft process (pid {pid} on {host}) is writing this output now",
                        where=str(self.record.parent),
                        fix="wait for it to finish, or choose another output folder.",
                    ) from None
                self.lock.unlink(missing_ok=True)  # its owner died without releasing it: take it over
                continue
            except OSError as error:
                raise output_error(error, self.lock) from None
            self.locked = True
            return
        raise UserError(
            "could not take the output's lock",
            where=str(self.lock),
            fix="delete the lock if no onsft process is running, then rerun.",
        )


@dataclass
class RunArguments:
    """How a command treats its output and the terminal."""

    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Delete the outputs of an earlier run with other settings at this output and start over "
            "(without it such a rerun is refused; the same settings resume)."
        },
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars with rate and ETA (on stderr)."})
    verbose: bool = field(default=False, metadata={"help": "Show the libraries' warnings and loading messages."})


def open_run(kinds: tuple[type, ...], given: tuple, writes: tuple = ()) -> tuple:
    """The opening every stage's `run` shares, before it reads any input: each settings object not given (None)
    takes its type's defaults, the libraries' output follows `RunArguments.verbose`, every object validates
    itself (in order), and every path of `writes` must be writable. `kinds` are the run's settings types in its
    order (the stage's CONFIGS), RunArguments last; returns the objects in that order."""
    if len(kinds) != len(given):
        raise TypeError(f"{len(given)} settings objects for {len(kinds)} settings types")
    filled = tuple(part if part is not None else kind() for part, kind in zip(given, kinds))
    *parts, run_args = filled
    configure_output(run_args.verbose)
    for part in parts:
        part.validate()
    for path in writes:
        check_writable(path)
    return filled


def settings_record(name: str, config, data: dict, model_args, leave_out: tuple = ("out",), **groups) -> dict:
    """What a run's results depend on, as its run.json and resumable files record it: the command's own settings
    under `name` (without its output names, `leave_out`), its data by content, the model as runs record it
    (`ModelArguments.recorded`), then each of `groups` whole (a dataclass) or as given (a dict: a group
    without the fields that do not change results, e.g. a batch size), in the order given."""
    own = {k: v for k, v in asdict(config).items() if k not in leave_out}
    return {
        name: own,
        "data": data,
        "model": model_args.recorded(),
        **{k: v if isinstance(v, dict) else asdict(v) for k, v in groups.items()},
    }
