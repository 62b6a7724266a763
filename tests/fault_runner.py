"""Run the fault cases of tests/fault_corpus.py in one process: `python tests/fault_runner.py PLAN RESULTS`.

Each case calls `onsft.cli.main(argv)`, the function `python -m onsft.cli` runs, with file descriptors 1
and 2 redirected to files, so everything the case prints (our error line, progress bars, library
warnings, C-level output) is captured. An exception escaping `main` is printed as the interpreter would
print it (a traceback) and counted as exit code 1: that is what a user would see. Importing torch,
transformers and TRL once for all cases, instead of once per case, saves ~5-10 s a case; the test runs a
sample of the same cases as real subprocesses and checks that they print the same line.

A full disk is simulated for real where the kernel allows it: the test starts this runner under
`unshare --user --map-root-user --mount`, and the runner mounts a 1 MB tmpfs (filled up by a `fill`
step so that writes fail with ENOSPC) and a read-only tmpfs. Without user namespaces it falls back to
RLIMIT_FSIZE (writes past the limit fail with EFBIG, SIGXFSZ ignored) and to an output path below a
regular file; the results say which mechanism ran.

Other steps: `interrupt_when` presses Ctrl-C (a KeyboardInterrupt in the main thread, as SIGINT gives) once a
file appears (and holds enough lines), to leave a run unfinished for the next case to resume; `lock` and
`unlock` put and take away a lock held by another live process (a `sleep`), as a concurrent writer holds it;
`lock_elsewhere` and `stale_lock` leave the lock of a writer on another host, or of one that died;
`replace` and `restore` edit an input file in place and put it back.
Before and after each case every file under the case's folder is hashed, so a case that changes or deletes
an existing output is seen; the growth of the runner's peak memory is reported too.
"""

from __future__ import annotations

import _thread
import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

FILLER = ".filler"


def mount_file_systems(full_disk: str, read_only: str) -> str:
    """'tmpfs' when both mounts worked (inside a private mount namespace), else 'rlimit'."""
    if os.environ.get("ONSFT_FAULTS_NAMESPACE") != "1":
        return "rlimit"
    for args in (["-o", "size=1m", "tmpfs", full_disk], ["-o", "ro,size=64k", "tmpfs", read_only]):
        Path(args[-1]).mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", *args], capture_output=True).returncode != 0:
            return "rlimit"
    return "tmpfs"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (symbolic links: their target), by relative path."""
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.rglob("*"):
        if p.name == FILLER:
            continue
        if p.is_symlink():
            found[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():
            found[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


class Interrupter:
    """Presses Ctrl-C in the main thread once `path` exists holding at least `lines` lines (0: exists), while
    the command runs (`armed`, set only around the call)."""

    def __init__(self, path: str, lines: int):
        self.path, self.lines, self.stop, self.fired = Path(path), lines, threading.Event(), False
        self.armed = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _ready(self) -> bool:
        try:
            return self.path.exists() and (not self.lines or self.path.read_bytes().count(b"\n") >= self.lines)
        except OSError:
            return False

    def _watch(self) -> None:
        while not self.stop.is_set():
            if self.armed and self._ready():
                self.fired = True
                _thread.interrupt_main()
                return
            time.sleep(0.002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class Runner:
    def __init__(self, mechanism: str):
        self.mechanism = mechanism
        self.fsize_limit: int | None = None
        self.interrupter: Interrupter | None = None
        self.holders: dict[str, subprocess.Popen] = {}
        self.originals: dict[str, bytes] = {}

    def step(self, step: list[str]) -> None:
        action, *args = step
        if action == "fill":
            folder, keep = Path(args[0]), int(args[1])
            if self.mechanism == "tmpfs":
                stats = os.statvfs(folder)
                free = stats.f_bavail * stats.f_frsize
                with open(folder / FILLER, "wb") as handle:
                    handle.write(b"\0" * max(0, free - keep))
            else:
                self.fsize_limit = keep
        elif action == "free":
            (Path(args[0]) / FILLER).unlink(missing_ok=True)
            self.fsize_limit = None
        elif action == "clear":
            for path in Path(args[0]).iterdir():
                if path.name != FILLER:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif action == "interrupt_when":
            self.interrupter = Interrupter(args[0], int(args[1]))
        elif action == "lock":
            holder = subprocess.Popen(["sleep", "600"])
            Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f"{socket.gethostname()}:{holder.pid}", args[0])
            self.holders[args[0]] = holder
        elif action == "unlock":
            holder = self.holders.pop(args[0], None)
            if holder is not None:
                holder.kill()
                holder.wait()
            Path(args[0]).unlink(missing_ok=True)
        elif action in ("lock_elsewhere", "stale_lock"):
            # A writer on another machine sharing the folder, or one on this machine that died holding it.
            if action == "stale_lock":
                gone = subprocess.Popen(["true"])
                gone.wait()
                owner = f"{socket.gethostname()}:{gone.pid}"
            else:
                owner = "another-host.example:4242"
            Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(owner, args[0])
        elif action == "replace":  # edit an input in place (its original is put back by `restore`)
            path = Path(args[0])
            self.originals[args[0]] = path.read_bytes()
            path.write_bytes(Path(args[1]).read_bytes())
        elif action == "restore":
            Path(args[0]).write_bytes(self.originals.pop(args[0]))
        elif action == "stale_partial":
            path = Path(args[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"_fingerprint": {"command": "audit", "tau": [0.5]}}) + "\n")
        else:
            raise ValueError(f"unknown step {action}")

    def run(self, case: dict) -> dict:
        from onsft import cli

        watch = Path(case["watch"])
        for step in case["steps"]:
            self.step(step)
        before = snapshot(watch)
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            started = time.time()
            try:
                if self.fsize_limit is not None:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, limit[1]))
                if self.interrupter is not None:
                    self.interrupter.armed = True
                try:
                    code = cli.main(list(case["argv"]))
                finally:
                    if self.interrupter is not None:
                        self.interrupter.armed = False
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught error
                traceback.print_exc()
                code = 1
            finally:
                code = self._stop_interrupter(code)
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)
                self.fsize_limit = None  # the simulated full disk lasts for one case
                gc.collect()  # "Exception ignored in ..." from half-closed files belongs to this case
                sys.stdout.flush()
                sys.stderr.flush()
                seconds = time.time() - started
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        after = snapshot(watch)
        created = sorted(set(after) - set(before))
        changed = sorted(path for path, digest in before.items() if after.get(path) != digest)
        for step in case.get("after", []):
            self.step(step)
        digest = None
        if case["fingerprint"]:
            target = Path(case["fingerprint"])
            target = target if target.is_absolute() else watch / target
            digest = hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else None
        return {
            "name": case["name"],
            "code": code,
            "stderr": stderr,
            "stdout": stdout[-2000:],
            "created": created,
            "changed": changed,
            "seconds": round(seconds, 2),
            "peak_memory_growth_mb": round((peak_after - peak_before) / 1024),
            "sha256": digest,
            "mechanism": self.mechanism,
        }

    def _stop_interrupter(self, code):
        """Stop the Ctrl-C watcher of the case; a Ctrl-C that fired after the command returned is absorbed
        here (and the case then counts as finished before it)."""
        if self.interrupter is None:
            return code
        try:
            self.interrupter.close()
            time.sleep(0.05)  # a pending KeyboardInterrupt is delivered by now
        except KeyboardInterrupt:
            pass
        self.interrupter = None
        return code


def main(plan_path: str, results_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG
    # Ctrl-C must raise KeyboardInterrupt here even when started in the background (where SIGINT is ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    plan = json.loads(Path(plan_path).read_text())
    runner = Runner(mount_file_systems(plan["full_disk"], plan["read_only"]))
    results = [runner.run(case) for case in plan["cases"]]
    Path(results_path).write_text(json.dumps({"mechanism": runner.mechanism, "results": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
