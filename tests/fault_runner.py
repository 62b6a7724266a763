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
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
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


def snapshot(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != FILLER}


class Runner:
    def __init__(self, mechanism: str):
        self.mechanism = mechanism
        self.fsize_limit: int | None = None

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
                code = cli.main(list(case["argv"]))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught error
                traceback.print_exc()
                code = 1
            finally:
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
        created = sorted(snapshot(watch) - before)
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
            "seconds": round(seconds, 2),
            "sha256": digest,
            "mechanism": self.mechanism,
        }


def main(plan_path: str, results_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE then fails with EFBIG
    plan = json.loads(Path(plan_path).read_text())
    runner = Runner(mount_file_systems(plan["full_disk"], plan["read_only"]))
    results = [runner.run(case) for case in plan["cases"]]
    Path(results_path).write_text(json.dumps({"mechanism": runner.mechanism, "results": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
